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
                A_s, B_s = ref_slow[i]
                std = torch.std(s * B_s @ A_s).item()
                u = counter_uniform(stream_key(seed, t, i, 2), 0, *ref_W[i].shape).double()
                ref_W[i] = ref_W[i] + (u - 0.5) * lam * std
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
        assert all(w > 0 for w in engine.noise_std[2])


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
