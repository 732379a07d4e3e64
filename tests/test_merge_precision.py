"""Merge precision in bf16 bases, and the cascade on NF4 (QLoRA/QDoRA) bases."""

import pytest
import torch
from torch import nn
from torchao.dtypes.nf4tensor import to_nf4
from torchtune.modules.peft import DoRALinear, LoRALinear

from lorasc_tune.adapters import init_dora_magnitudes
from lorasc_tune.cascade import CascadeEngine
from lorasc_tune.config import DEFAULT_MERGE_PRECISION, LoRASCConfig, LoRASCConfigError
from lorasc_tune.ops import round_to_dtype_, stream_key


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at ``x`` (float32), i.e. 2**(exponent - 7)."""
    return torch.ldexp(torch.ones_like(x), torch.frexp(x.abs()).exponent - 8)


# ---- stochastic rounding ----------------------------------------------------------------------


def test_stochastic_rounding_is_unbiased():
    # 4096 draws (rows) of the same 256 values: each row gets its own random bits.
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(256, generator=g) * 0.02).float()
    x[:4] = torch.tensor([1.0, -0.5, 0.0, 3.0])  # representable values stay put
    src = x.expand(4096, 256).contiguous()
    out = torch.empty(4096, 256, dtype=torch.bfloat16)
    round_to_dtype_(out, src, "stochastic", key=stream_key(1, 2, 3))
    o = out.float()
    near = x.to(torch.bfloat16).float()
    far = torch.nextafter(x.to(torch.bfloat16),
                          torch.where(x > near, torch.inf, -torch.inf).to(torch.bfloat16)).float()
    # Every draw is one of the two neighbours of x.
    assert bool(((o == near) | (o == far)).all())
    assert torch.equal(o[:, :4], x[:4].expand(4096, 4))
    # The mean over draws is x: each draw has std <= ulp/2, so the mean's std <= ulp/(2·64).
    ulp = bf16_ulp(x)
    z = (o.mean(0) - x) / (ulp / (2 * 4096 ** 0.5))
    assert z.abs().max() < 5.0, z.abs().max()
    assert abs(float(z.mean())) < 5.0 / 256 ** 0.5  # no systematic bias across values
    # Round-to-nearest, by contrast, drops a sub-half-ulp increment every time.
    w = torch.full((64, 64), 0.02).to(torch.bfloat16)
    nearest = w.clone()
    round_to_dtype_(nearest, w.float() + 0.1 * bf16_ulp(w.float()), "nearest")
    assert torch.equal(nearest, w)


def test_stochastic_rounding_is_deterministic_and_shard_invariant():
    g = torch.Generator().manual_seed(1)
    src = torch.randn(40, 24, generator=g) * 0.02
    key = stream_key(7, 3)
    whole = torch.empty(40, 24, dtype=torch.bfloat16)
    round_to_dtype_(whole, src, "stochastic", key=key)
    parts = torch.empty(40, 24, dtype=torch.bfloat16)
    round_to_dtype_(parts[:13], src[:13], "stochastic", key=key, row_start=0)
    round_to_dtype_(parts[13:], src[13:], "stochastic", key=key, row_start=13)
    assert torch.equal(whole, parts)
    other = torch.empty_like(whole)
    round_to_dtype_(other, src, "stochastic", key=stream_key(7, 4))
    assert not torch.equal(whole, other)
    fp32 = torch.empty(40, 24)
    round_to_dtype_(fp32, src, "stochastic", key=key)  # exact for fp32 weights
    assert torch.equal(fp32, src)


# ---- the engine on bf16 bases -----------------------------------------------------------------


class Pair(nn.Module):
    """Two adapted matrices (plain or NF4), W0 ~ N(0, 0.02) like Llama-2-7B's q/v."""

    def __init__(self, dtype, quantize=False, dora=False, shapes=((128, 128), (256, 128))):
        super().__init__()
        cls = DoRALinear if dora else LoRALinear
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            self.q = cls(shapes[0][1], shapes[0][0], rank=4, alpha=8, quantize_base=quantize)
            self.v = cls(shapes[1][1], shapes[1][0], rank=4, alpha=8, quantize_base=quantize)
        finally:
            torch.set_default_dtype(prev)
        for m in (self.q, self.v):
            # Adapters in fp32 everywhere, so only the base's precision differs between runs.
            m.lora_a.float()
            m.lora_b.float()
            m.weight.requires_grad_(False)

    def layers(self):
        return [self.q, self.v]


def initial_weights(shapes=((128, 128), (256, 128))):
    g = torch.Generator().manual_seed(0)
    return {f"{n}.weight": (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16).float()
            for n, s in zip("qv", shapes)}


def run_cascade(model, T, policy, w0, delta_scale, seed=3, alpha=0.5, lam=1.0):
    """T experts whose 'training' sets A and B deterministically; returns the engine."""
    engine = CascadeEngine(model, LoRASCConfig(merge_precision=policy, slow_alpha=alpha,
                                               noise_lambda=lam), seed=seed, master_source=w0)
    with torch.no_grad():
        if not engine.master_weights():
            for m, k in zip(model.layers(), "qv"):
                m.weight.copy_(w0[f"{k}.weight"])
        for t in range(1, T + 1):
            engine.begin_expert()
            if t == 1:
                init_dora_magnitudes(model)  # as the recipe does (a no-op without DoRA)
            for i, m in enumerate(model.layers()):
                g = torch.Generator().manual_seed(100 * t + i)
                m.lora_a.weight.add_(0.05 * torch.randn(m.lora_a.weight.shape, generator=g))
                # A per-expert direction shared across experts, so the cumulative update grows.
                g0 = torch.Generator().manual_seed(i)
                m.lora_b.weight.copy_(delta_scale * (torch.randn(m.lora_b.weight.shape, generator=g0)
                                                     + 0.5 * torch.randn(m.lora_b.weight.shape,
                                                                         generator=g)))
            engine.end_expert()
    return engine


def weights(model):
    return torch.cat([m.weight.detach().float().flatten() for m in model.layers()])


@pytest.mark.parametrize("policy", ["nearest", "stochastic", "fp32_master"])
def test_fp32_base_is_exact_in_every_mode(policy):
    w0 = initial_weights()
    ref = run_cascade(Pair(torch.float32), 6, "nearest", w0, 1e-3)
    got = run_cascade(Pair(torch.float32), 6, policy, w0, 1e-3)
    assert not got.master_weights()  # no master for an fp32 base
    for a, b in zip(ref.layers, got.layers):
        assert torch.equal(a.weight, b.weight)


def test_bf16_merges_stay_within_the_stated_bound_of_fp32():
    """The documented guarantees after T = 25 merges (each with noise) of sub-ulp deltas."""
    T, scale = 25, 2e-4  # per-merge delta ≈ 0.03 of rms(W): mostly below half an ulp
    w0 = initial_weights()
    ref_model = Pair(torch.float32)
    run_cascade(ref_model, T, "nearest", w0, scale)
    ref = weights(ref_model)
    W0 = torch.cat([w0["q.weight"].flatten(), w0["v.weight"].flatten()])
    D_ref = ref - W0
    ulp = bf16_ulp(ref)
    result = {}
    for policy in ("nearest", "stochastic", "fp32_master"):
        model = Pair(torch.bfloat16)
        engine = run_cascade(model, T, policy, w0, scale)
        W = weights(model)
        result[policy] = (W, float((W - W0) @ D_ref / (D_ref @ D_ref)))
        if policy == "fp32_master":
            # The master is the fp32 reference bit for bit, and W is its nearest bf16 value:
            # |W - ref| <= ulp/2 elementwise, the best a bf16 tensor can do.
            master = torch.cat([m.flatten() for m in engine.master_weights().values()])
            assert torch.equal(master, ref)
            assert torch.equal(W, ref.to(torch.bfloat16).float())
    # Stochastic: 2T independent, zero-mean roundings of at most one ulp each, so the
    # error's rms is at most ulp·sqrt(2T)/2 (bound stated in docs/merge_precision.md).
    W_sr, survival_sr = result["stochastic"]
    rms_err = (W_sr - ref).pow(2).mean().sqrt()
    assert rms_err <= ulp.pow(2).mean().sqrt() * (2 * T) ** 0.5 / 2
    assert survival_sr == pytest.approx(1.0, abs=0.05)  # unbiased: the update survives
    assert result["fp32_master"][1] == pytest.approx(1.0, abs=0.05)
    assert result["nearest"][1] < 0.8  # round-to-nearest loses a large part of it


def test_default_merge_precision_and_validation():
    assert LoRASCConfig().merge_precision == DEFAULT_MERGE_PRECISION
    assert LoRASCConfig.from_config({"merge_precision": "stochastic"}).merge_precision == \
        "stochastic"
    with pytest.raises(LoRASCConfigError, match=r"lorasc\.merge_precision must be one of "
                                                 r"nearest, stochastic, fp32_master"):
        LoRASCConfig.from_config({"merge_precision": "bf16"})


def test_resume_with_another_merge_precision_is_refused():
    w0 = initial_weights()
    state = run_cascade(Pair(torch.bfloat16), 2, "stochastic", w0, 1e-3).state_dict()
    other = CascadeEngine(Pair(torch.bfloat16), LoRASCConfig(merge_precision="nearest"), seed=3)
    with pytest.raises(ValueError, match=r"lorasc\.merge_precision='nearest' differs"):
        other.load_state_dict(state)


# ---- NF4 (QLoRA / QDoRA) bases ----------------------------------------------------------------


def dequant_nf4(x):
    return to_nf4(x.to(torch.bfloat16)).get_original_weight()


@pytest.mark.parametrize("dora", [False, True])
def test_nf4_base_requantizes_from_the_master_without_drift(dora):
    T = 4
    w0 = initial_weights()
    ref_model = Pair(torch.float32, dora=dora)
    run_cascade(ref_model, T, "nearest", w0, 1e-3)
    model = Pair(torch.bfloat16, quantize=True, dora=dora)
    assert type(model.q.weight).__name__ == "NF4Tensor"
    engine = run_cascade(model, T, DEFAULT_MERGE_PRECISION, w0, 1e-3)
    for m, ref_m, name in zip(model.layers(), ref_model.layers(), ("q", "v")):
        ref = ref_m.weight.detach()
        # The master is the fp32 reference exactly; the NF4 weight is one quantization of it.
        assert torch.equal(engine.master_weights()[f"{name}.weight"], ref)
        assert torch.equal(m.weight.get_original_weight(), dequant_nf4(ref))
        assert not torch.equal(ref, w0[f"{name}.weight"])  # the merges did move it

    # Resume: a fresh model + engine, loaded from the state, has the same master and NF4 W.
    state = engine.state_dict()
    fresh = Pair(torch.bfloat16, quantize=True, dora=dora)
    again = CascadeEngine(fresh, LoRASCConfig(slow_alpha=0.5, noise_lambda=1.0), seed=3)
    again.load_state_dict(state)
    for a, b in zip(model.layers(), fresh.layers()):
        assert torch.equal(a.weight.get_original_weight(), b.weight.get_original_weight())
    for k, v in engine.master_weights().items():
        assert torch.equal(again.master_weights()[k], v)


# ---- QLoRA through the single-device recipe ---------------------------------------------------

# NF4 needs matrices of a multiple of 64 x 256 elements: d = 256 is the smallest Llama that fits.
# Short runs (2-row batches of <= 64 tokens, 1-3 steps per expert) keep these tests fast.
QLORA_ARGS = {"model.embed_dim": 256, "model.intermediate_dim": 512, "model.quantize_base": True,
              "dtype": "bf16", "batch_size": 2, "tokenizer.max_seq_len": 64,
              "epochs": 3, "max_steps_per_epoch": 1}


@pytest.fixture(scope="module")
def qlora_assets(tmp_path_factory):
    from lorasc_tune.demo import write_tiny_llama2_hf_checkpoint
    from recipe_utils import TINY_ARGS, make_assets

    root = tmp_path_factory.mktemp("qlora_assets")
    assets = make_assets(root)
    args = dict(TINY_ARGS, embed_dim=256, intermediate_dim=512)
    assets["ckpt"] = write_tiny_llama2_hf_checkpoint(root / "tiny_llama2_d256", args)
    return assets


def qlora_cfg(assets, out, **overrides):
    from recipe_utils import tiny_cfg

    return tiny_cfg(assets, out, **{**QLORA_ARGS, "checkpointer.checkpoint_dir": str(assets["ckpt"]),
                                    **overrides})


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_recipe_merges_into_the_master_and_exports_full_precision(qlora_assets, tmp_path,
                                                                         use_dora):
    from recipe_utils import load_merged, run_recipe

    out = tmp_path / "run"
    recipe = run_recipe(qlora_cfg(qlora_assets, out, **{"model.use_dora": use_dora}))
    engine = recipe._cascade.engine
    assert engine.expert == 3 and len(engine.master_weights()) == 4  # q, v in 2 layers
    merged = load_merged(out / "epoch_2", tmp_path / "reload")
    for layer in engine.layers:
        key = f"{layer.name}.weight"
        master = engine.master_weights()[key]
        assert type(layer.weight).__name__ == "NF4Tensor"
        # No drift: the NF4 weight is exactly one quantization of the fp32 master ...
        assert torch.equal(layer.weight.get_original_weight(), dequant_nf4(master))
        # ... and the export is folded from the master (B = 0 at the epoch boundary), in bf16.
        assert merged[key].dtype == torch.bfloat16
        if not use_dora:
            assert torch.equal(merged[key], master.to(torch.bfloat16))
        assert not torch.equal(merged[key], layer.weight.get_original_weight())


def test_qlora_resume_is_exact(qlora_assets, tmp_path):
    from recipe_utils import load_merged, run_recipe

    # 2 epochs x 2 steps, an expert per step: the crash at step 3 follows two merges.
    overrides = {"epochs": 2, "max_steps_per_epoch": 2, "lorasc.steps_per_expert": 1,
                 "save_every_n_steps": 1}
    run_recipe(qlora_cfg(qlora_assets, tmp_path / "ref", **overrides))
    out = tmp_path / "crashed"
    run_recipe(qlora_cfg(qlora_assets, out, **overrides), crash_at_step=3)
    resumed = run_recipe(qlora_cfg(qlora_assets, out, resume_from_checkpoint=True, **overrides))
    assert resumed._cascade.engine.expert == 4
    expected = load_merged(tmp_path / "ref" / "epoch_1", tmp_path / "r1")
    got = load_merged(out / "epoch_1", tmp_path / "r2")
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_distributed_recipe_refuses_a_quantized_base(qlora_assets, tmp_path):
    from lorasc_tune.recipes.lorasc_lora_distributed import LoRASCRecipeDistributed

    with pytest.raises(ValueError, match=r"QLoRA/QDoRA .* single-device recipe only"):
        LoRASCRecipeDistributed(qlora_cfg(qlora_assets, tmp_path / "run"))


def test_merge_precision_bench_smoke(capsys):
    """bench/merge_precision.py --smoke runs, and its numbers show the documented ordering."""
    import importlib.util

    from shared_paths import REPO_ROOT

    spec = importlib.util.spec_from_file_location("mp_bench", REPO_ROOT / "bench" / "merge_precision.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--smoke"])
    rows = {(r["regime"], r["policy"]): r for r in result["bf16"]}
    small = {p: rows[("7B-scaled", p)] for p in ("nearest", "stochastic", "fp32_master")}
    assert small["nearest"]["survival"] < 0.5 < small["stochastic"]["survival"]
    assert small["fp32_master"]["err/|D_ref|"] <= min(small["nearest"]["err/|D_ref|"],
                                                       small["stochastic"]["err/|D_ref|"])
    assert result["nf4"][0]["naive survival"] < 0.2 < result["nf4"][0]["master survival"]
    assert "### bf16 base" in capsys.readouterr().out
