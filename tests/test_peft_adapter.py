"""PEFT-format adapters in the epoch folders (lorasc_tune/peft_export.py), each checked against
an independent computation: PEFT + transformers on the base checkpoint, or a plain SVD."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from lorasc_tune import recipe_common as common
from lorasc_tune.config import LoRASCConfigError
from lorasc_tune.recipes.lorasc_lora import LoRASCRecipeSingleDevice
from lorasc_tune.peft_export import lowrank_factors, relative_error
from recipe_utils import TINY_ARGS, load_merged, run_recipe, tiny_cfg

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# Noise off; an expert every 3 of the 12 steps: 4 experts, and the epoch ends at steps 4 and 8
# fall mid-expert, so epoch_0 and epoch_1 also fold the live expert's s·B·A in.
NOISE_OFF = {"lorasc.noise_lambda": 0.0, "lorasc.steps_per_expert": 3}
RANK = 4  # tiny_cfg's lora_rank
TOKENS = torch.randint(0, TINY_ARGS["vocab_size"], (2, 20),
                       generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def noise_off_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("noise_off") / "run"
    run_recipe(tiny_cfg(assets, out, **NOISE_OFF))
    return out


def hf_model(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32).eval()


def peft_model(base_dir: Path, adapter_dir: Path):
    return peft.PeftModel.from_pretrained(hf_model(base_dir), str(adapter_dir)).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def adapter_tensors(folder: Path):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def hf_weights(folder: Path):
    """Every tensor of a Hugging Face checkpoint folder's safetensors files, as written."""
    from safetensors.torch import load_file

    return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def report(folder: Path):
    return json.loads((folder / "adapter_export.json").read_text())


def test_noise_off_adapter_on_the_base_is_the_merged_export(assets, noise_off_run):
    """base + adapter (loaded by PEFT onto the base checkpoint) computes the merged export's
    logits, and merge_and_unload gives its weights, at every epoch (mid-expert ones too)."""
    for epoch, experts in ((0, 2), (2, 4)):
        folder = noise_off_run / f"epoch_{epoch}"
        adapter_dir = folder / "adapter"
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
        assert config["r"] == RANK * experts and config["lora_alpha"] == config["r"]
        assert config["target_modules"] == ["q_proj", "v_proj"]
        keys = set(adapter_tensors(adapter_dir))
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
        assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys

        # The epoch folder as transformers loads it: the merged model, the adapter not applied
        # on top of it a second time (it is in adapter/, not next to config.json).
        merged = hf_model(folder)
        with_adapter = peft_model(assets["ckpt"], adapter_dir)
        torch.testing.assert_close(logits(with_adapter), logits(merged), atol=1e-5, rtol=1e-5)
        base_logits = logits(hf_model(assets["ckpt"]))
        assert (logits(merged) - base_logits).abs().max() > 1e-3  # not vacuous

        unloaded = with_adapter.merge_and_unload().state_dict()
        for key, value in merged.state_dict().items():
            torch.testing.assert_close(unloaded[key], value, atol=1e-6, rtol=0), key


def test_plain_lora_adapter_is_the_trained_adapter(assets, tmp_path):
    """cascade: false: the base is never touched, and the adapter (rank r) is the live one."""
    out = tmp_path / "run"
    recipe = run_recipe(tiny_cfg(assets, out, epochs=1, **{"lorasc.cascade": False}))
    adapter_dir = out / "epoch_0" / "adapter"
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == RANK
    torch.testing.assert_close(logits(peft_model(assets["ckpt"], adapter_dir)),
                               logits(hf_model(out / "epoch_0")), atol=1e-5, rtol=1e-5)
    assert report(adapter_dir)["max_relative_frobenius_error"] < 1e-5
    assert recipe._cascade.engine.expert == 1


def test_a_rank_beyond_a_matrix_writes_it_at_full_rank_via_rank_pattern(assets, tmp_path):
    """adapter_export_rank: 40 on q (64x64) and v (32x64): q gets rank 40, v its full rank 32
    (listed in rank_pattern/alpha_pattern), and PEFT still computes the merged export."""
    out = tmp_path / "run"
    run_recipe(tiny_cfg(assets, out, epochs=1, **{**NOISE_OFF, "lorasc.adapter_export_rank": 40}))
    adapter_dir = out / "epoch_0" / "adapter"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    v_modules = [f"model.layers.{i}.self_attn.v_proj" for i in range(2)]
    assert config["r"] == 40 and config["rank_pattern"] == {m: 32 for m in v_modules}
    assert config["alpha_pattern"] == config["rank_pattern"]
    assert sorted(report(adapter_dir)["full_rank_modules"]) == v_modules
    torch.testing.assert_close(logits(peft_model(assets["ckpt"], adapter_dir)),
                               logits(hf_model(out / "epoch_0")), atol=1e-5, rtol=1e-5)


def test_noise_on_writes_no_adapter_by_default_and_says_why_once(assets, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        run_recipe(tiny_cfg(assets, out, epochs=2))
    said = [r.getMessage() for r in caplog.records
            if "no PEFT adapter will be written" in r.getMessage()]
    assert len(said) == 1 and "full rank" in said[0] and "adapter_export_rank" in said[0]
    for epoch in range(2):
        assert (out / f"epoch_{epoch}" / "config.json").is_file()
        assert not (out / f"epoch_{epoch}" / "adapter").exists()


def test_noise_on_opt_in_rank_k_reports_the_truncated_svd_error(assets, tmp_path):
    """adapter_export_rank: 3 with noise on: the reported error of each matrix is the rank-3
    truncation error of (merged export - base), from an independent SVD."""
    out, k = tmp_path / "run", 3
    run_recipe(tiny_cfg(assets, out, **{"lorasc.adapter_export_rank": k}))
    adapter_dir = out / "epoch_2" / "adapter"
    rep = report(adapter_dir)
    assert rep["mode"] == "truncated_svd" and json.loads(
        (adapter_dir / "adapter_config.json").read_text())["r"] == k
    merged = load_merged(out / "epoch_2", tmp_path / "reload")
    base = load_merged(assets["ckpt"], tmp_path / "reload_base")
    tensors = adapter_tensors(adapter_dir)
    merged_hf, base_hf = hf_weights(out / "epoch_2"), hf_weights(assets["ckpt"])
    errors = rep["relative_frobenius_error"]
    assert len(errors) == 4
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            delta = (merged[f"layers.{layer}.attn.{proj}.weight"]
                     - base[f"layers.{layer}.attn.{proj}.weight"]).double()
            s = torch.linalg.svdvals(delta)
            want = float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())
            module = f"model.layers.{layer}.self_attn.{proj}"
            assert errors[module] == pytest.approx(want, rel=1e-3), module
            assert 0.05 < want < 1  # noise made the delta far from rank 3
            B = tensors[f"base_model.model.{module}.lora_B.weight"]
            A = tensors[f"base_model.model.{module}.lora_A.weight"]
            assert B.shape[1] == A.shape[0] == k
            # The written factors, in the files' own (Hugging Face, q-permuted) layout, are
            # that truncation of the files' own difference.
            delta_hf = (merged_hf[f"{module}.weight"] - base_hf[f"{module}.weight"]).double()
            got = float(torch.linalg.norm(delta_hf - B.double() @ A.double())
                        / torch.linalg.norm(delta_hf))
            assert got == pytest.approx(want, rel=1e-3), module
    # PEFT loads it, and the rank-3 model is nearer the merged export than the base is.
    approx = logits(peft_model(assets["ckpt"], adapter_dir))
    target, start = logits(hf_model(out / "epoch_2")), logits(hf_model(assets["ckpt"]))
    assert float((approx - target).norm()) < 0.5 * float((start - target).norm())


def test_one_expert_with_noise_on_gets_an_exact_adapter(assets, tmp_path):
    """The first expert gets no noise, so a one-expert run's update is exactly rank r."""
    out = tmp_path / "run"
    run_recipe(tiny_cfg(assets, out, epochs=1, save_adapter_weights_only=True,
                        **{"lorasc.num_experts": 1}))
    adapter_dir = out / "epoch_0" / "adapter"
    rep = report(adapter_dir)
    assert rep["mode"] == "exact" and max(rep["relative_frobenius_error"].values()) < 1e-5
    assert not (out / "epoch_0" / "config.json").exists()  # adapters only


def test_bf16_merges_without_fp32_masters_write_no_exact_adapter(assets, tmp_path, caplog):
    """merge_precision: nearest on a bf16 base rounds every merge into W: W_T - W_0 is then full
    rank, so no adapter is called exact (one labelled exact had 6-7% error before this check)."""
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        run_recipe(tiny_cfg(assets, out, epochs=2, dtype="bf16",
                            **{**NOISE_OFF, "lorasc.merge_precision": "nearest"}))
    said = [r.getMessage() for r in caplog.records
            if "no PEFT adapter will be written" in r.getMessage()]
    assert len(said) == 1 and "below 32 bits" in said[0]
    assert not (out / "epoch_1" / "adapter").exists()
    with pytest.raises(LoRASCConfigError, match="below 32 bits"):
        run_recipe(tiny_cfg(assets, tmp_path / "only", epochs=2, dtype="bf16",
                            save_adapter_weights_only=True,
                            **{**NOISE_OFF, "lorasc.merge_precision": "nearest"}))


def test_adapters_only_with_noise_on_is_refused_before_any_write(assets, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("untouched")
    with pytest.raises(LoRASCConfigError, match=r"save_adapter_weights_only is true, but lorasc "
                                                r"noise is on.*adapter_export_rank"):
        run_recipe(tiny_cfg(assets, out, save_adapter_weights_only=True))
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with pytest.raises(LoRASCConfigError, match=r"DoRA"):
        run_recipe(tiny_cfg(assets, tmp_path / "dora", save_adapter_weights_only=True,
                            **{"model.use_dora": True, **NOISE_OFF}))
    assert not (tmp_path / "dora").exists()
    with pytest.raises(LoRASCConfigError, match=r"adapter_export_rank must be null"):
        run_recipe(tiny_cfg(assets, tmp_path / "bad", **{"lorasc.adapter_export_rank": 0}))


def test_adapters_only_with_noise_off_writes_only_the_adapter(assets, noise_off_run, tmp_path,
                                                              capsys, caplog):
    out = tmp_path / "run"
    # Through the recipes' own entry (common.run_recipe), whose last line names what was written.
    with caplog.at_level(logging.INFO):
        common.run_recipe(LoRASCRecipeSingleDevice,
                          tiny_cfg(assets, out, save_adapter_weights_only=True, **NOISE_OFF))
    printed = capsys.readouterr().out
    assert f"LoRASC: PEFT adapter written to {out / 'epoch_2' / 'adapter'}" in printed
    assert f"Epoch 2: PEFT adapter saved to {out / 'epoch_2'}" in caplog.text
    for epoch in range(3):
        assert sorted(p.name for p in (out / f"epoch_{epoch}").iterdir()) == ["adapter"]
        got = adapter_tensors(out / f"epoch_{epoch}" / "adapter")
        want = adapter_tensors(noise_off_run / f"epoch_{epoch}" / "adapter")
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)


def _oom_after_first_adapter(monkeypatch):
    """Epoch 0's adapter is factored; every later one runs out of memory."""
    real, calls = common.build_peft_adapter, []

    def build(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(common, "build_peft_adapter", build)


def test_an_adapter_out_of_memory_still_writes_the_merged_model(assets, noise_off_run, tmp_path,
                                                               monkeypatch, caplog):
    out = tmp_path / "run"
    _oom_after_first_adapter(monkeypatch)
    with caplog.at_level(logging.WARNING):
        run_recipe(tiny_cfg(assets, out, **NOISE_OFF))
    assert "factoring epoch 1's PEFT adapter ran out of memory on cpu" in caplog.text
    assert (out / "epoch_0" / "adapter").is_dir()
    for epoch in (1, 2):
        assert not (out / f"epoch_{epoch}" / "adapter").exists()
        got = load_merged(out / f"epoch_{epoch}", tmp_path / "reload")
        want = load_merged(noise_off_run / f"epoch_{epoch}", tmp_path / "reload_want")
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)


def test_an_adapter_out_of_memory_in_an_adapters_only_run_names_it(assets, tmp_path,
                                                                  monkeypatch):
    out = tmp_path / "run"
    _oom_after_first_adapter(monkeypatch)
    with pytest.raises(RuntimeError, match=r"epoch 1's PEFT adapter ran out of memory.*"
                                           r"save_adapter_weights_only is true.*intact"):
        run_recipe(tiny_cfg(assets, out, save_adapter_weights_only=True, **NOISE_OFF))
    assert sorted(p.name for p in (out / "epoch_0").iterdir()) == ["adapter"]
    assert not (out / "epoch_1").exists() and not (out / ".staging").exists()


def test_resumed_run_writes_the_same_exact_adapter(assets, noise_off_run, tmp_path):
    """Crash mid-expert in epoch 1, resume: epochs 1 and 2 (written by the resumed process)
    hold the uninterrupted run's adapters, still exact against their merged exports."""
    out = tmp_path / "run"
    run_recipe(tiny_cfg(assets, out, save_every_n_steps=1, **NOISE_OFF), crash_at_step=7)
    assert not (out / "epoch_1").exists()
    run_recipe(tiny_cfg(assets, out, save_every_n_steps=1, resume_from_checkpoint=True,
                        **NOISE_OFF))
    for epoch in (1, 2):
        got = adapter_tensors(out / f"epoch_{epoch}" / "adapter")
        want = adapter_tensors(noise_off_run / f"epoch_{epoch}" / "adapter")
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits(peft_model(assets["ckpt"], out / "epoch_2" / "adapter")),
                               logits(hf_model(out / "epoch_2")), atol=1e-5, rtol=1e-5)


def test_dora_writes_no_adapter_and_says_why(assets, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        run_recipe(tiny_cfg(assets, out, epochs=1, **{"model.use_dora": True, **NOISE_OFF}))
    assert any("no PEFT adapter will be written" in r.getMessage() and "DoRA" in r.getMessage()
               for r in caplog.records)
    assert not (out / "epoch_0" / "adapter").exists()


# ---- every projection, and a family torchtune does not permute ---------------------------------


def _llama(assets, tmp_path):
    from torchtune.models.llama2 import lora_llama2

    return assets["ckpt"], "model-00001-of-00001.safetensors", "LLAMA2", lora_llama2(
        ALL_PROJECTIONS, apply_lora_to_mlp=True, lora_rank=RANK, lora_alpha=8, **TINY_ARGS)


def _qwen2(assets, tmp_path):
    from torchtune.models.qwen2 import lora_qwen2

    config = transformers.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    folder = tmp_path / "qwen2_base"
    transformers.Qwen2ForCausalLM(config).save_pretrained(str(folder))
    return folder, "model.safetensors", "QWEN2", lora_qwen2(
        ALL_PROJECTIONS, apply_lora_to_mlp=True, vocab_size=256, num_layers=2, num_heads=4,
        num_kv_heads=2, embed_dim=64, intermediate_dim=128, max_seq_len=128, lora_rank=RANK,
        lora_alpha=8)


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "output_proj"]


@pytest.mark.parametrize("family", [_llama, _qwen2], ids=["llama2_gqa", "qwen2"])
def test_every_projection_of_a_family_maps_to_its_hf_matrix(assets, tmp_path, family):
    """Random adapters on q, k, v, o and the MLP: base + PEFT adapter computes the merged HF
    export. k under grouped-query attention is permuted per key/value head (Llama), and
    Qwen2, whose weights torchtune does not permute, gets no permutation."""
    from torchtune.training import FullModelHFCheckpointer

    import lorasc_tune.recipe_common as common
    from lorasc_tune.adapters import find_adapters, merged_state_dict
    from lorasc_tune.peft_export import build_peft_adapter

    base_dir, filename, model_type, model = family(assets, tmp_path)
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(base_dir), checkpoint_files=[filename], model_type=model_type,
        output_dir=str(tmp_path / "out"))
    missing, unexpected = model.load_state_dict(checkpointer.load_checkpoint()["model"],
                                                strict=False)
    assert not unexpected and all("lora" in k for k in missing)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in find_adapters(model):
            layer.lora_b.copy_(0.05 * torch.randn(layer.lora_b.shape, generator=gen))
    assert len(find_adapters(model)) == 2 * 7
    adapter = build_peft_adapter(model, checkpointer, experts=1, rank=None)
    folder = common.save_with_checkpointer(checkpointer, merged_state_dict(model),
                                           tmp_path / "out", 0, adapter=adapter)
    assert adapter.report["max_relative_frobenius_error"] < 1e-5
    assert adapter.config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    ids = torch.randint(0, 256, (2, 20), generator=gen)
    with torch.no_grad():
        merged = hf_model(folder)(ids).logits
        with_adapter = peft_model(base_dir, folder / "adapter")(ids).logits
        plain = hf_model(base_dir)(ids).logits
    assert (merged - plain).abs().max() > 1e-3
    torch.testing.assert_close(with_adapter, merged, atol=1e-5, rtol=1e-5)


# ---- the factorization on its own ------------------------------------------------------------


def test_lowrank_factors_exact_truncated_and_full_rank():
    gen = torch.Generator().manual_seed(1)
    d_out, d_in, R = 48, 40, 12
    # A rank-12 matrix whose singular values span four decades (as slow experts can).
    U, _ = torch.linalg.qr(torch.randn(d_out, R, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(d_in, R, generator=gen))
    delta = (U * torch.logspace(0, -4, R)) @ V.T
    B, A = lowrank_factors(delta, R, exact=True)
    assert B.shape == (d_out, R) and A.shape == (R, d_in)
    assert relative_error(delta, B, A) < 1e-5

    # Truncated SVD: Eckart-Young's error, from singular values computed independently.
    full = torch.randn(d_out, d_in, generator=gen)
    s = torch.linalg.svdvals(full.double())
    B, A = lowrank_factors(full, 5, exact=False)
    want = float(s[5:].square().sum().sqrt() / s.square().sum().sqrt())
    assert relative_error(full, B, A) == pytest.approx(want, rel=1e-4)

    # A rank at or above min(d_out, d_in): the matrix itself against an identity, exactly.
    for shape in ((d_out, d_in), (d_in, d_out)):
        m = torch.randn(*shape, generator=gen)
        B, A = lowrank_factors(m, 10_000, exact=True)
        assert A.shape[0] == min(shape) and torch.equal(B @ A, m)


def test_two_fsdp_processes_write_an_exact_adapter(assets, noise_off_run, tmp_path):
    """FSDP2 (2 gloo processes): rank 0 factors the gathered model. Its B·A is its own merged
    export minus the base, both read as Hugging Face files (no torchtune conversion), and its
    ranks are the single-device run's. (The two runs' weights differ by FSDP's rounding, which
    tests/test_distributed.py bounds.)"""
    from safetensors.torch import load_file
    from test_distributed import tune_run_distributed

    out = tmp_path / "fsdp2"
    tune_run_distributed(tiny_cfg(assets, out, batch_size=2, **NOISE_OFF), 2, tmp_path)
    base = load_file(str(assets["ckpt"] / "model-00001-of-00001.safetensors"))
    for epoch in (0, 2):
        merged = load_file(str(out / f"epoch_{epoch}" / "model-00001-of-00001.safetensors"))
        got = adapter_tensors(out / f"epoch_{epoch}" / "adapter")
        single = adapter_tensors(noise_off_run / f"epoch_{epoch}" / "adapter")
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in single.items()}
        for key in merged:
            prefix = f"base_model.model.{key[:-len('.weight')]}"
            if f"{prefix}.lora_A.weight" not in got:
                assert torch.equal(merged[key], base[key]), key
                continue
            product = got[f"{prefix}.lora_B.weight"] @ got[f"{prefix}.lora_A.weight"]
            delta = merged[key] - base[key]
            assert delta.abs().max() > 1e-4  # not vacuous
            torch.testing.assert_close(product, delta, atol=1e-6, rtol=0), key
