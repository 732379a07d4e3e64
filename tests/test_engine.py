"""The cascade engine against an independent re-computation of Algorithm 1 (eqs. 5-12)."""

import math

import pytest
import torch
from torch import nn
from torchtune.modules.peft import DoRALinear, LoRALinear

from lorasc_tune.cascade import CascadeEngine, NonFiniteExpertError
from lorasc_tune.config import LoRASCConfig
from lorasc_tune.ops import (
    counter_kaiming_uniform,
    counter_uniform,
    lowrank_delta_std,
    stream_key,
)


class Toy(nn.Module):
    """Three adapted layers of different shapes, plus a frozen plain Linear."""

    def __init__(self, dora: bool = False, rank: int = 4, alpha: float = 8.0):
        super().__init__()
        cls = DoRALinear if dora else LoRALinear
        self.q = cls(24, 40, rank=rank, alpha=alpha)
        self.v = cls(24, 16, rank=rank, alpha=alpha, use_bias=True)
        self.deep = nn.Sequential(cls(16, 24, rank=rank, alpha=alpha))
        self.other = nn.Linear(8, 8)
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (LoRALinear, DoRALinear)):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                    if dora:
                        m.initialize_dora_magnitude()


def fake_training(layer, t, i):
    """Stand-in for an expert's training: a deterministic move of A and a non-zero B."""
    g = torch.Generator().manual_seed(1000 * t + i)
    with torch.no_grad():
        layer.lora_a.weight.add_(0.1 * torch.randn(layer.lora_a.weight.shape, generator=g))
        layer.lora_b.weight.copy_(0.2 * torch.randn(layer.lora_b.weight.shape, generator=g))


def adapted(model):
    return [model.q, model.v, model.deep[0]]


def reference_noise(W, slow, s, seed, t, i, lam):
    """Algorithm 1's noise, written out: W + U(-λ/2, λ/2)·std(s·B_slow·A_slow), with the engine's
    counter stream for expert t, layer i (stream 2)."""
    A_s, B_s = slow
    std = torch.std(s * B_s @ A_s).item()
    u = counter_uniform(stream_key(seed, t, i, 2), 0, *W.shape).double()
    return W + (u - 0.5) * lam * std


@pytest.mark.parametrize("alpha,lam", [(0.5, 1.0), (0.3, 2.5), (0.0, 0.0)])
def test_engine_matches_reference_algorithm(alpha, lam):
    seed, T = 7, 4
    model = Toy()
    W0 = [m.weight.detach().clone() for m in adapted(model)]
    engine = CascadeEngine(model, LoRASCConfig(slow_alpha=alpha, noise_lambda=lam), seed=seed)

    # Reference state, recomputed from the paper's equations with plain torch ops.
    ref_W = [w.clone().double() for w in W0]
    ref_slow = [None] * 3
    for t in range(1, T + 1):
        before = [m.weight.detach().clone() for m in adapted(model)]
        engine.begin_expert()
        for i, m in enumerate(adapted(model)):
            s = m.alpha / m.rank
            # Fresh fast expert: A from the counter stream, B = 0.
            expect_A = counter_kaiming_uniform(stream_key(seed, t, i, 1), tuple(m.lora_a.weight.shape))
            assert torch.equal(m.lora_a.weight, expect_A)
            assert torch.count_nonzero(m.lora_b.weight) == 0
            bound = 1 / math.sqrt(m.in_dim)
            assert m.lora_a.weight.abs().max() <= bound
            if t == 1:
                ref_slow[i] = (m.lora_a.weight.detach().double().clone(),
                               m.lora_b.weight.detach().double().clone())
                assert torch.equal(m.weight, before[i])  # no noise for the first expert
            else:
                ref_W[i] = reference_noise(ref_W[i], ref_slow[i], s, seed, t, i, lam)
            torch.testing.assert_close(m.weight.double(), ref_W[i], atol=1e-5, rtol=0)
            fake_training(m, t, i)
        fast = [(m.lora_a.weight.detach().double().clone(), m.lora_b.weight.detach().double().clone())
                for m in adapted(model)]
        engine.end_expert()
        for i, m in enumerate(adapted(model)):
            s = m.alpha / m.rank
            A_s, B_s = ref_slow[i]
            A_f, B_f = fast[i]
            ref_slow[i] = (alpha * A_s + (1 - alpha) * A_f, alpha * B_s + (1 - alpha) * B_f)
            ref_W[i] = ref_W[i] + s * ref_slow[i][1] @ ref_slow[i][0]
            torch.testing.assert_close(m.weight.double(), ref_W[i], atol=1e-5, rtol=0)
            torch.testing.assert_close(engine.slow_A[i].double(), ref_slow[i][0], atol=1e-6, rtol=0)
            torch.testing.assert_close(engine.slow_B[i].double(), ref_slow[i][1], atol=1e-6, rtol=0)
            assert torch.count_nonzero(m.lora_b.weight) == 0  # merged: B_fast cleared
    assert engine.expert == T
    if lam > 0:
        # The run actually exercised noise (a vacuous pass would leave W == W0 + merges only).
        assert all(w > 0 for w in engine.noise_widths[2])


def test_noise_range_and_scale():
    seed, lam = 3, 2.0
    layer = LoRALinear(512, 256, rank=8, alpha=16)
    model = nn.Sequential(layer)
    engine = CascadeEngine(model, LoRASCConfig(slow_alpha=0.5, noise_lambda=lam), seed=seed)
    engine.begin_expert()
    with torch.no_grad():
        layer.lora_b.weight.normal_(0, 0.5)
    engine.end_expert()
    std = lowrank_delta_std(engine.slow_B[0], engine.slow_A[0], 2.0)
    assert std == pytest.approx(torch.std(2.0 * engine.slow_B[0] @ engine.slow_A[0]).item(), rel=1e-6)
    before = layer.weight.detach().clone()
    widths = engine.begin_expert()
    noise = (layer.weight - before).double()
    half = lam * std / 2
    assert widths["0"] == pytest.approx(lam * std)
    assert noise.abs().max().item() <= half * (1 + 1e-5)
    assert noise.min().item() < -0.99 * half and noise.max().item() > 0.99 * half
    # U(-h, h) has mean 0 and std h/sqrt(3); 131072 samples pin both to well under 1%.
    assert abs(noise.mean().item()) < 0.01 * half
    assert noise.std().item() == pytest.approx(half / math.sqrt(3), rel=0.01)


def test_rank_grows_with_cascade_and_not_without():
    r, T, d = 2, 4, 32

    def merged_delta(cascade: bool) -> torch.Tensor:
        layer = LoRALinear(d, d, rank=r, alpha=4)
        with torch.no_grad():
            layer.weight.normal_()
        W0 = layer.weight.detach().clone()
        cfg = LoRASCConfig(cascade=cascade, slow_alpha=0.5, noise_lambda=0.0)
        engine = CascadeEngine(nn.Sequential(layer), cfg, seed=0)
        for t in range(1, (T if cascade else 1) + 1):
            engine.begin_expert()
            fake_training(layer, t, 0)
            engine.end_expert()
        from lorasc_tune.adapters import merged_state_dict

        W = merged_state_dict(nn.Sequential(layer))["0.weight"]
        return (W - W0).double()

    # Numerical rank: singular values above 1e-4 of the largest (fp32 rounding of W sits
    # around 1e-7 relative; the experts' directions are orders of magnitude above that).
    rank_on = torch.linalg.matrix_rank(merged_delta(True), rtol=1e-4).item()
    rank_off = torch.linalg.matrix_rank(merged_delta(False), rtol=1e-4).item()
    assert r < rank_on <= T * r
    assert 0 < rank_off <= r


def test_cascade_off_never_touches_the_base():
    model = Toy()
    W0 = [m.weight.detach().clone() for m in adapted(model)]
    engine = CascadeEngine(model, LoRASCConfig(cascade=False), seed=0)
    engine.begin_expert()
    for i, m in enumerate(adapted(model)):
        fake_training(m, 1, i)
    engine.end_expert()
    for m, w in zip(adapted(model), W0):
        assert torch.equal(m.weight, w)
        assert torch.count_nonzero(m.lora_b.weight) > 0  # the expert stays in the adapter
    with pytest.raises(RuntimeError, match="single expert"):
        engine.begin_expert()


def test_non_finite_expert_is_never_merged():
    model = Toy()
    engine = CascadeEngine(model, LoRASCConfig(), seed=0)
    engine.begin_expert()
    for i, m in enumerate(adapted(model)):
        fake_training(m, 1, i)
    with torch.no_grad():
        model.deep[0].lora_b.weight[0, 0] = float("nan")
    W_before = [m.weight.detach().clone() for m in adapted(model)]
    slow_before = [a.clone() for a in engine.slow_A]
    with pytest.raises(NonFiniteExpertError, match="deep.0.lora_b"):
        engine.end_expert()
    for m, w in zip(adapted(model), W_before):
        assert torch.equal(m.weight, w)
    for a, b in zip(engine.slow_A, slow_before):
        assert torch.equal(a, b)


def test_dora_magnitude_is_untouched_by_boundaries():
    model = Toy(dora=True)
    engine = CascadeEngine(model, LoRASCConfig(slow_alpha=0.5, noise_lambda=1.0), seed=0)
    for t in (1, 2, 3):
        engine.begin_expert()
        with torch.no_grad():
            for i, m in enumerate(adapted(model)):
                fake_training(m, t, i)
                m.magnitude.add_(0.01 * t)  # "training" of the magnitude
        mags = [m.magnitude.detach().clone() for m in adapted(model)]
        engine.end_expert()
        for m, mag in zip(adapted(model), mags):
            assert torch.equal(m.magnitude, mag)


def test_engine_state_round_trip_and_mismatch_errors():
    model = Toy()
    engine = CascadeEngine(model, LoRASCConfig(), seed=5)
    engine.begin_expert()
    state = engine.state_dict()
    other = CascadeEngine(Toy(), LoRASCConfig(), seed=5)
    other.load_state_dict(state)
    assert other.expert == 1 and other.expert_open
    assert set(state["slow"]) == {f"{n}.slow_{m}" for n in ("q", "v", "deep.0") for m in "AB"}
    for a, b in zip(other.slow_A, engine.slow_A):
        assert torch.equal(a, b)
    for changed in ({"slow_alpha": 0.2}, {"schedule": "run"}, {"lr_ratio_B": 16.0}):
        (key,) = changed
        with pytest.raises(ValueError, match=f"lorasc.{key}"):
            CascadeEngine(Toy(), LoRASCConfig(**changed), seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        CascadeEngine(Toy(), LoRASCConfig(), seed=6).load_state_dict(state)


def test_engine_state_from_before_the_noise_width_rename_loads():
    """States saved before the rename keep the per-expert noise widths under ``noise_std``."""
    model = Toy()
    engine = CascadeEngine(model, LoRASCConfig(noise_lambda=2.0), seed=5)
    engine.begin_expert()
    with torch.no_grad():
        for m in adapted(model):  # a trained expert, so the slow delta (and the noise) is not 0
            m.lora_b.weight.normal_()
    engine.end_expert()
    engine.begin_expert()
    widths = engine.noise_widths
    assert widths[1] == [0.0] * 3 and all(w > 0 for w in widths[2])
    old = dict(engine.state_dict())
    old["noise_std"] = old.pop("noise_width")
    resumed = CascadeEngine(Toy(), LoRASCConfig(noise_lambda=2.0), seed=5)
    resumed.load_state_dict(old)
    assert resumed.noise_widths == widths


def test_noise_stream_is_independent_of_row_blocking():
    key = stream_key(1, 2, 3, 2)
    full = counter_uniform(key, 0, 10, 7)
    parts = torch.cat([counter_uniform(key, 0, 4, 7), counter_uniform(key, 4, 6, 7)])
    assert torch.equal(full, parts)
    assert not torch.equal(full, counter_uniform(stream_key(1, 3, 3, 2), 0, 10, 7))


def test_inject_keeps_outputs_and_trains_only_adapters():
    from lorasc_tune.adapters import find_adapters, inject

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.query(x) * self.key(x).sigmoid() + self.value(x)

    torch.manual_seed(0)
    model = nn.Sequential(Attn(), nn.ReLU(), Attn())
    x = torch.randn(3, 16)
    before = model(x).detach()
    for use_dora in (False, True):
        m = copy_of(model)
        replaced = inject(m, ["query", "value"], rank=2, alpha=4, use_dora=use_dora)
        assert replaced == ["0.query", "0.value", "2.query", "2.value"]
        torch.testing.assert_close(m(x), before, atol=1e-6, rtol=1e-6)
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        expected = {f"{r}.{p}" for r in replaced for p in ("lora_a.weight", "lora_b.weight")}
        if use_dora:
            expected |= {f"{r}.magnitude" for r in replaced}
        assert trainable == expected
        assert len(find_adapters(m)) == 4
    with pytest.raises(ValueError, match="no nn.Linear named"):
        inject(copy_of(model), ["q_proj"], rank=2, alpha=4)


def copy_of(module):
    import copy

    return copy.deepcopy(module)


# ---- automatic α and λ (slow_alpha: auto / noise_lambda: auto) --------------------------------


def _frobenius_cosine(F1: torch.Tensor, F2: torch.Tensor) -> float:
    n1, n2 = F1.norm().item(), F2.norm().item()
    return 0.0 if n1 == 0 or n2 == 0 else (F1 * F2).sum().item() / (n1 * n2)


@pytest.mark.parametrize("alpha,lam", [("auto", "auto"), ("auto", 1.0), (0.5, "auto")])
def test_auto_alpha_lambda_match_reference(alpha, lam):
    """Algorithm 1 re-run with α_t = (1 - c_t)/2 and λ_t = 1 - c_{t-1}, c from dense B·A products."""
    seed, T = 11, 5
    model = Toy()
    engine = CascadeEngine(model, LoRASCConfig(slow_alpha=alpha, noise_lambda=lam), seed=seed)
    ref_W = [m.weight.detach().clone().double() for m in adapted(model)]
    ref_slow, prev_F, c_last = [None] * 3, [None] * 3, [None] * 3
    used_alpha, used_lambda = {}, {}
    for t in range(1, T + 1):
        engine.begin_expert()
        lams = []
        for i, m in enumerate(adapted(model)):
            s = m.alpha / m.rank
            if t == 1:
                ref_slow[i] = (m.lora_a.weight.detach().double().clone(),
                               m.lora_b.weight.detach().double().clone())
            else:
                lam_t = (1.0 if c_last[i] is None else 1.0 - c_last[i]) if lam == "auto" else lam
                lams.append(lam_t)
                ref_W[i] = reference_noise(ref_W[i], ref_slow[i], s, seed, t, i, lam_t)
            torch.testing.assert_close(m.weight.double(), ref_W[i], atol=1e-5, rtol=0)
            fake_training(m, t, i)
            if t == 3 and i == 0:
                # Expert 3 of layer q repeats expert 2's update exactly (c = 1), so its α is 0
                # and the noise before expert 4 is off; other layers see unrelated draws.
                with torch.no_grad():
                    m.lora_a.weight.copy_(fast_2_q[0])
                    m.lora_b.weight.copy_(fast_2_q[1])
        if t > 1:
            used_lambda[t] = lams
        fast = [(m.lora_a.weight.detach().double().clone(), m.lora_b.weight.detach().double().clone())
                for m in adapted(model)]
        if t == 2:
            fast_2_q = tuple(x.float() for x in fast[0])
        engine.end_expert()
        alphas = []
        for i, m in enumerate(adapted(model)):
            s = m.alpha / m.rank
            F = fast[i][1] @ fast[i][0]
            if prev_F[i] is not None:
                c_last[i] = _frobenius_cosine(F, prev_F[i])
            prev_F[i] = F
            a = (0.5 if c_last[i] is None else (1 - c_last[i]) / 2) if alpha == "auto" else alpha
            alphas.append(a)
            A_s, B_s = ref_slow[i]
            ref_slow[i] = (a * A_s + (1 - a) * fast[i][0], a * B_s + (1 - a) * fast[i][1])
            ref_W[i] = ref_W[i] + s * ref_slow[i][1] @ ref_slow[i][0]
            torch.testing.assert_close(m.weight.double(), ref_W[i], atol=1e-5, rtol=0)
        used_alpha[t] = alphas
    if alpha == "auto":
        assert set(engine.auto_alpha) == set(range(1, T + 1))
        for t in used_alpha:
            assert engine.auto_alpha[t] == pytest.approx(used_alpha[t], abs=1e-9)
        assert engine.auto_alpha[1] == [0.5] * 3
        assert engine.auto_alpha[3][0] == pytest.approx(0.0, abs=1e-6)  # the repeated expert
        assert all(abs(a - 0.5) > 1e-4 for a in engine.auto_alpha[2])  # the rule did act
    else:
        assert engine.auto_alpha == {}
    if lam == "auto":
        assert set(engine.auto_lambda) == set(range(2, T + 1))
        for t in used_lambda:
            assert engine.auto_lambda[t] == pytest.approx(used_lambda[t], abs=1e-9)
        assert engine.auto_lambda[2] == [1.0] * 3
        assert engine.auto_lambda[4][0] == pytest.approx(0.0, abs=1e-6)
        assert engine.noise_widths[4][0] == pytest.approx(0.0, abs=1e-9)
    else:
        assert engine.auto_lambda == {}


def test_auto_opposite_expert_gives_alpha_one_and_lambda_two():
    layer = LoRALinear(16, 12, rank=3, alpha=6)
    engine = CascadeEngine(nn.Sequential(layer), LoRASCConfig(slow_alpha="auto",
                                                              noise_lambda="auto"), seed=2)
    engine.begin_expert()
    fake_training(layer, 1, 0)
    A1, B1 = layer.lora_a.weight.detach().clone(), layer.lora_b.weight.detach().clone()
    engine.end_expert()
    engine.begin_expert()
    with torch.no_grad():  # B·A = -(B1·A1): the second expert undoes the first
        layer.lora_a.weight.copy_(A1)
        layer.lora_b.weight.copy_(-B1)
    engine.end_expert()
    assert engine.agreement[0] == pytest.approx(-1.0, abs=1e-6)
    assert engine.auto_alpha[2][0] == pytest.approx(1.0, abs=1e-6)
    engine.begin_expert()
    assert engine.auto_lambda[3][0] == pytest.approx(2.0, abs=1e-6)


def test_auto_resume_continues_exactly():
    cfg = LoRASCConfig(slow_alpha="auto", noise_lambda="auto")

    def run(model, engine, experts):
        for t in experts:
            engine.begin_expert()
            for i, m in enumerate(adapted(model)):
                fake_training(m, t, i)
            engine.end_expert()

    straight = Toy()
    e1 = CascadeEngine(straight, cfg, seed=4)
    run(straight, e1, range(1, 6))

    first = Toy()
    e2 = CascadeEngine(first, cfg, seed=4)
    run(first, e2, range(1, 4))
    state = e2.state_dict()
    assert {"q.prev_fast_A", "q.prev_fast_B"} <= set(state["slow"])
    resumed = Toy()
    resumed.load_state_dict(first.state_dict())
    e3 = CascadeEngine(resumed, cfg, seed=4)
    e3.load_state_dict(state)
    run(resumed, e3, range(4, 6))
    for a, b in zip(adapted(straight), adapted(resumed)):
        assert torch.equal(a.weight, b.weight)
    assert e3.auto_alpha == e1.auto_alpha and e3.auto_lambda == e1.auto_lambda

    fixed_state = CascadeEngine(Toy(), LoRASCConfig(), seed=4)
    fixed_state.begin_expert()
    with pytest.raises(ValueError, match="lorasc.slow_alpha"):
        CascadeEngine(Toy(), cfg, seed=4).load_state_dict(fixed_state.state_dict())
    assert "auto" not in fixed_state.state_dict()  # the default state carries nothing new


def test_auto_config_values():
    cfg = LoRASCConfig.from_config({"slow_alpha": "auto", "noise_lambda": "auto"})
    assert cfg.auto_alpha and cfg.auto_lambda and cfg.slow_enabled and cfg.noise_enabled
    assert cfg.to_dict()["slow_alpha"] == "auto"
    from lorasc_tune.config import LoRASCConfigError

    for key in ("slow_alpha", "noise_lambda"):
        with pytest.raises(LoRASCConfigError, match=f"lorasc.{key} must be a number .* or 'auto'"):
            LoRASCConfig.from_config({key: "Auto"})
    fixed = LoRASCConfig()
    assert not fixed.auto_alpha and not fixed.auto_lambda


def _fake_training_rows(layer, t, i):
    """fake_training's draws, written through each rank's rows (plain or FSDP2-sharded)."""
    from lorasc_tune.sharding import local_rows

    g = torch.Generator().manual_seed(1000 * t + i)
    dA = 0.1 * torch.randn(layer.lora_a.weight.shape, generator=g)
    B = 0.2 * torch.randn(layer.lora_b.weight.shape, generator=g)
    with torch.no_grad():
        A_loc, a0 = local_rows(layer.lora_a.weight)
        B_loc, b0 = local_rows(layer.lora_b.weight)
        A_loc.add_(dA[a0: a0 + A_loc.shape[0]])
        B_loc.copy_(B[b0: b0 + B_loc.shape[0]])


def _auto_cascade(model, T=4):
    engine = CascadeEngine(model, LoRASCConfig(slow_alpha="auto", noise_lambda="auto"), seed=9)
    for t in range(1, T + 1):
        engine.begin_expert()
        for i, m in enumerate(adapted(model)):
            _fake_training_rows(m, t, i)
        engine.end_expert()
    return engine


def _fsdp_auto_worker(rank, world, port, out):
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = Toy(rank=3)  # 3 rows of A over 2 ranks: uneven shards
        for m in adapted(model):
            fully_shard(m, mesh=mesh)
        engine = _auto_cascade(model)
        weights = [m.weight.full_tensor() for m in adapted(model)]
        if rank == 0:
            torch.save({"weights": weights, "alpha": engine.auto_alpha,
                        "lambda": engine.auto_lambda}, out)
    finally:
        dist.destroy_process_group()


def test_auto_alpha_lambda_same_on_fsdp2_row_shards(tmp_path):
    """Two gloo ranks holding row shards choose the single device's α and λ and weights."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "fsdp.pt"
    mp.spawn(_fsdp_auto_worker, args=(2, port, str(out)), nprocs=2, join=True)
    sharded = torch.load(out)
    model = Toy(rank=3)
    engine = _auto_cascade(model)
    for t, alphas in engine.auto_alpha.items():
        assert sharded["alpha"][t] == pytest.approx(alphas, abs=1e-9)
    for t, lams in engine.auto_lambda.items():
        assert sharded["lambda"][t] == pytest.approx(lams, abs=1e-9)
    assert any(abs(a - 0.5) > 1e-3 for a in engine.auto_alpha[3])  # the rule acted
    for w_sharded, m in zip(sharded["weights"], adapted(model)):
        torch.testing.assert_close(w_sharded, m.weight.detach(), atol=1e-6, rtol=0)
