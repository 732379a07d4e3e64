"""How much of LoRASC's cumulative update survives in a bf16 (or NF4) base, per merge policy.

    .venv/bin/python bench/merge_precision.py            # full: T = 5, 25, 125 (~2-4 min, CPU)
    .venv/bin/python bench/merge_precision.py --smoke    # T = 5 only (~30 s; run by the tests)

Method (everything on CPU):

1. **Real LoRA deltas.** The tiny recipe of the tests (2-layer Llama-2-shaped model, d = 64,
   LoRA r = 4, α = 8 on q and v, weights N(0, 0.02) like Llama-2-7B's q/v) is trained in fp32
   with a cascade of ``T_max`` experts of 2 optimizer steps each, at lr 3e-4 (the paper's
   7B learning rate). Each expert's trained fast factors ``(A_t, B_t)`` are recorded.
2. **Replay.** Algorithm 1 is replayed with those experts through :class:`CascadeEngine` on an
   fp32 base (the reference) and on bf16 bases with each ``merge_precision``: slow update
   (α = 0.5), noise (λ = 1), merge, for ``T`` experts. Both start from the same
   bf16-representable ``W0`` and hold the adapters in fp32, so the only difference is how
   each noise and merge is stored into ``W``.
3. Two delta regimes: ``tiny`` (the deltas as trained) and ``7B-scaled`` (the same deltas
   × 1/8: LoRA's ``A`` is drawn from U(±1/√d_in), so at d_in = 4096 a delta with the same B
   is √(4096/64) = 8× smaller per element than at d_in = 64).

Reported per (regime, T, policy), over all adapted matrices flattened together, with
``D = W_T - W0`` and the fp32 reference's ``D_ref``:

* ``survival`` = ⟨D, D_ref⟩ / ⟨D_ref, D_ref⟩: the fraction of the intended cumulative update
  (merged experts and noise) that is in the weights (1 = all of it);
* ``err/|D_ref|`` = ‖W_T - W_ref‖ / ‖D_ref‖ and ``err/|W|`` = ‖W_T - W_ref‖ / ‖W_ref‖;
* ``logit err`` = ‖L - L_ref‖ / ‖L_ref - L0‖: the logit error relative to the logit change
  the cascade made (L0: the base model's logits), with the model evaluated in fp32 so that only
  the stored weights differ; ``logit err/|L|`` = ‖L - L_ref‖ / ‖L_ref‖.

It also times one merge per policy on a 2048 × 2048 bf16 matrix on CPU (for fp32_master: the\nfp32 update plus the rounding copy, without the host-to-GPU streaming of a GPU run), and shows NF4 drift: merging
by dequantize → add → requantize every cycle, against requantizing from an fp32 master.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from lorasc_tune.cascade import CascadeEngine  # noqa: E402
from lorasc_tune.config import MERGE_PRECISIONS, LoRASCConfig  # noqa: E402
from lorasc_tune.ops import merge_lowrank_, stream_key  # noqa: E402

Experts = List[Dict[str, Tuple[torch.Tensor, torch.Tensor]]]


def record_experts(n_experts: int, workdir: Path) -> Tuple[Experts, Dict[str, torch.Tensor]]:
    """Train the tiny recipe (fp32) with ``n_experts`` experts; return each expert's trained
    ``{layer: (A_t [r, d_in], B_t [d_out, r])}`` and the base checkpoint (torchtune names)."""
    from recipe_utils import make_assets, run_recipe, tiny_cfg

    assets = make_assets(workdir / "assets")
    steps_per_expert, steps_per_epoch = 2, 24  # 96 rows / batch 4
    steps = n_experts * steps_per_expert
    epochs = -(-steps // steps_per_epoch)
    cfg = tiny_cfg(assets, workdir / "run", **{
        "epochs": epochs, "max_steps_per_epoch": steps if epochs == 1 else None,
        "lorasc.steps_per_expert": steps_per_expert,
        "optimizer.lr": 3e-4, "save_final_model_only": True})
    experts: Experts = []
    inner = CascadeEngine.end_expert

    def recording_end_expert(engine):
        if len(experts) < n_experts:
            experts.append({l.name: (l.lora_a.detach().float().clone(),
                                     l.lora_b.detach().float().clone()) for l in engine.layers})
        return inner(engine)

    CascadeEngine.end_expert = recording_end_expert
    try:
        recipe = run_recipe(cfg)
    finally:
        CascadeEngine.end_expert = inner
    if len(experts) < n_experts:
        raise RuntimeError(f"recorded {len(experts)} experts, wanted {n_experts}")
    from recipe_utils import load_merged

    base = load_merged(assets["ckpt"], workdir / "reload")
    del recipe
    return experts, base


def build_model(base: Dict[str, torch.Tensor], dtype: torch.dtype):
    """The tiny LoRA model in ``dtype`` with fp32 adapters, base weights rounded to bf16."""
    from recipe_utils import TINY_ARGS
    from torchtune.models.llama2 import lora_llama2

    with torch.device("cpu"):
        model = lora_llama2(lora_attn_modules=["q_proj", "v_proj"], lora_rank=4, lora_alpha=8,
                            **TINY_ARGS)
    model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in base.items()},
                          strict=False)
    model.to(dtype)
    for m in model.modules():
        if hasattr(m, "lora_a"):
            m.lora_a.float()
            m.lora_b.float()
    return model


@torch.no_grad()
def replay(base, experts: Experts, T: int, dtype: torch.dtype, policy: str, scale: float):
    """Algorithm 1 over the first ``T`` recorded experts; returns ``{layer.weight: W_T fp32}``."""
    model = build_model(base, dtype)
    engine = CascadeEngine(model, LoRASCConfig(merge_precision=policy, slow_alpha=0.5,
                                               noise_lambda=1.0), seed=0)
    for t in range(T):
        engine.begin_expert()
        for layer in engine.layers:
            A, B = experts[t][layer.name]
            layer.lora_a.copy_(A)
            layer.lora_b.copy_(B * scale)
        engine.end_expert()
    return {f"{l.name}.weight": l.weight.detach().float().clone() for l in engine.layers}


@torch.no_grad()
def logits_with(base, weights: Dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    from recipe_utils import TINY_ARGS
    from torchtune.models.llama2 import llama2

    model = llama2(**TINY_ARGS)
    state = {k: v.to(torch.bfloat16).float() for k, v in base.items()}
    state.update(weights)
    model.load_state_dict(state)
    return model.eval()(tokens).float()


def flat(d: Dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d[k].double().flatten() for k in sorted(d)])


def measure(base, experts: Experts, Ts, regimes) -> List[dict]:
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    names = [k for k in base if k.endswith(("q_proj.weight", "v_proj.weight"))]
    W0 = {k: base[k].to(torch.bfloat16).float() for k in names}
    L0 = logits_with(base, {}, tokens)
    rows = []
    for regime, scale in regimes:
        for T in Ts:
            ref = replay(base, experts, T, torch.float32, "nearest", scale)
            L_ref = logits_with(base, ref, tokens)
            D_ref = flat(ref) - flat(W0)
            per_merge = []
            for t in range(T):  # rms of one expert's s·B_t·A_t relative to rms(W0)
                for k in names:
                    A, B = experts[t][k[: -len(".weight")]]
                    per_merge.append(((2.0 * scale * B @ A).pow(2).mean()
                                      / W0[k].pow(2).mean()).sqrt().item())
            for policy in MERGE_PRECISIONS:
                got = replay(base, experts, T, torch.bfloat16, policy, scale)
                D = flat(got) - flat(W0)
                err = flat(got) - flat(ref)
                L = logits_with(base, got, tokens)
                rows.append({
                    "regime": regime, "T": T, "policy": policy,
                    "delta/W per merge": sum(per_merge) / len(per_merge),
                    "survival": float(D @ D_ref / (D_ref @ D_ref)),
                    "err/|D_ref|": float(err.norm() / D_ref.norm()),
                    "err/|W|": float(err.norm() / flat(ref).norm()),
                    "logit err": float((L - L_ref).norm() / (L_ref - L0).norm()),
                    "logit err/|L|": float((L - L_ref).norm() / L_ref.norm()),
                })
    return rows


@torch.no_grad()
def nf4_drift(base, experts: Experts, Ts, scale: float) -> List[dict]:
    """NF4 q/v after T merges (α = 0.5, no noise): naive dequantize → add → requantize every
    merge, against requantizing from the fp32 master (what the engine does). Errors are
    ‖dequant(W_T) - W_ref‖ / ‖D_ref‖ against the fp32 reference; survival as in the bf16 table,
    measured from dequant(to_nf4(W0))."""
    from torchao.dtypes.nf4tensor import to_nf4

    def q(x):  # small matrices: 64-element blocks, 32 blocks per scale block
        return to_nf4(x.to(torch.bfloat16), 64, 32).get_original_weight().float()

    rows = []
    names = [k for k in base if k.endswith(("q_proj.weight", "v_proj.weight"))]
    for T in Ts:
        naive_all, master_all, ref_all, w0_all, q0_all = [], [], [], [], []
        for k in names:
            layer = k[: -len(".weight")]
            W0 = base[k].to(torch.bfloat16).float()
            ref, naive, slow_A, slow_B = W0.clone(), q(W0), None, None
            for t in range(T):
                A, B = experts[t][layer]
                B = B * scale
                slow_A = A.clone() if slow_A is None else 0.5 * slow_A + 0.5 * A
                slow_B = B.clone() if slow_B is None else 0.5 * slow_B + 0.5 * B
                merge_lowrank_(ref, slow_B, slow_A, 2.0)
                naive = q(naive + 2.0 * slow_B @ slow_A)  # dequantize, add, requantize
            naive_all.append(naive.flatten())
            master_all.append(q(ref).flatten())  # the engine: W = to_nf4(fp32 master)
            ref_all.append(ref.flatten())
            w0_all.append(W0.flatten())
            q0_all.append(q(W0).flatten())
        naive, master, ref, W0, Q0 = (torch.cat(x).double() for x in
                                      (naive_all, master_all, ref_all, w0_all, q0_all))
        D_ref = ref - W0
        row = {"T": T}
        for name, W in (("naive", naive), ("master", master)):
            row[f"{name} err/|D_ref|"] = float((W - ref).norm() / D_ref.norm())
            row[f"{name} survival"] = float((W - Q0) @ D_ref / (D_ref @ D_ref))
        rows.append(row)
    return rows


def time_merges(n: int = 2048, r: int = 8, reps: int = 3) -> Dict[str, float]:
    """Seconds per merge of an ``n × n`` bf16 matrix (CPU), per policy."""
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(n, n, generator=g) * 0.02).to(torch.bfloat16)
    A, B = torch.randn(r, n, generator=g) / n ** 0.5, torch.randn(n, r, generator=g) * 1e-3
    master = W.float()
    out = {}
    for policy in MERGE_PRECISIONS:
        t0 = time.perf_counter()
        for rep in range(reps):
            if policy == "fp32_master":
                merge_lowrank_(master, B, A, 2.0)
                W.copy_(master)
            else:
                merge_lowrank_(W, B, A, 2.0, rounding=policy, round_key=stream_key(0, rep))
        out[policy] = (time.perf_counter() - t0) / reps
    return out


def to_markdown(rows: List[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> Dict[str, List[dict]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="T = 5 only, no timing (fast)")
    ap.add_argument("--out", type=Path, default=None, help="write the tables here (markdown)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    Ts = [5] if args.smoke else [5, 25, 125]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        experts, base = record_experts(max(Ts), Path(tmp))
    t_train = time.perf_counter() - t0
    regimes = [("tiny", 1.0), ("7B-scaled", 1.0 / 8)]
    rows = measure(base, experts, Ts, regimes)
    nf4 = nf4_drift(base, experts, Ts, scale=1.0)
    timing = {} if args.smoke else time_merges()
    text = [f"Recorded {max(Ts)} experts in {t_train:.0f}s; total {time.perf_counter() - t0:.0f}s.",
            "", "### bf16 base: update survival and error vs the fp32 reference", "",
            to_markdown(rows), "", "### NF4 base: naive requantize-every-merge vs fp32 master", "",
            to_markdown(nf4)]
    if timing:
        text += ["", "### Seconds per merge, 2048 x 2048 bf16, r = 8, CPU", "",
                 to_markdown([{k: float(v) for k, v in timing.items()}])]
    report = "\n".join(text)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return {"bf16": rows, "nf4": nf4, "timing": timing}


if __name__ == "__main__":
    main()
