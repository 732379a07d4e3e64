"""The LoRASC engine: Algorithm 1's boundary steps over the adapters of any model.

A training loop calls it at two points per expert ``t = 1 … T``::

    engine.begin_expert()   # fresh fast expert (A random, B = 0); for t > 1: W̃ = W + noise
    ...train A, B (and DoRA's magnitude) as usual...
    engine.end_expert()     # slow ← α·slow + (1-α)·fast;  W ← W̃ + s·B_slow·A_slow

Line by line, for every adapted matrix (paper, Algorithm 1 and eqs. 5-12):

* ``t = 1``: the fast expert is drawn (A ~ U(±1/√d_in), B = 0) and the slow expert starts
  as a copy of it. ``std(s·B_slow·A_slow) = 0``, so no noise.
* ``t > 1``: a fresh fast expert is drawn, then the base gets per-matrix noise
  ``W̃ = W + U(-λ/2, λ/2)·std(s·B_slow·A_slow)``.
* end of expert ``t``: ``A_slow ← α·A_slow + (1-α)·A_t``, ``B_slow ← α·B_slow + (1-α)·B_t``
  (A and B averaged separately), then ``W ← W̃ + s·B_slow·A_slow`` (eq. 12: the slow expert is
  merged after every cycle and is never reset). ``B_t`` is then zeroed, so the model computes
  exactly the merged weights until the next expert begins.

With ``cascade: false`` the engine draws the single expert at ``t = 1`` and never touches the
base: the exported model folds that expert in (see :func:`lorasc_tune.adapters.merged_state_dict`).

DoRA: only the direction (``W``, A, B) is cascaded; the magnitude vector is an ordinary
trainable parameter that carries across experts and is never reset.

Automatic α and λ (``slow_alpha: auto`` / ``noise_lambda: auto``; each key on its own). The
paper tunes α and λ per task and names choosing them adaptively as future work. The rule here
reads one statistic per adapted matrix: the agreement ``c_t = cos(B_t·A_t, B_{t-1}·A_{t-1})``
(Frobenius cosine) between the update the fast expert just learned and the previous fast
expert's. Experts that keep finding the same direction (``c → 1``) carry signal, so the slow
average follows the new one and no noise is needed; unrelated experts (``c ≈ 0``, what fitting
each epoch's noise gives) get the paper's defaults; an expert that undoes its predecessor
(``c → -1``) is oscillation, which the slow expert should damp and the noise shake out of:

* ``α_t = (1 - c_t) / 2`` at the end of expert ``t ≥ 2`` (``α_1 = 0.5``: nothing to compare yet);
* ``λ_t = 1 - c_{t-1}`` for the noise before expert ``t ≥ 3`` (``λ_2 = 1``).

Both are in units the fixed values already have, with no new constant: ``c = 0`` gives exactly
the paper's α 0.5 and λ 1. The cosine comes from r×r Gram products
(``⟨B₁A₁, B₂A₂⟩ = Σ (B₁ᵀB₂) ∘ (A₁A₂ᵀ)``), summed over B's row shards and all-reduced like
std's moments, so every FSDP2 rank computes the same α and λ. With numeric α and λ none of this
runs, and the state carries nothing extra.

Precision (``lorasc.merge_precision``, docs/merge_precision.md): every write into ``W`` (noise and
merge) is computed in fp32 and stored through one policy. ``nearest`` rounds to nearest;
``stochastic`` rounds stochastically (unbiased, no memory); ``fp32_master`` keeps an fp32 copy
of each adapted matrix's local rows, updates it, and stores ``W = round(master)``. An NF4
(QLoRA/QDoRA) base always gets a full-precision master on CPU, and every update requantizes
``W = to_nf4(master)``, so quantization error never accumulates across merges. fp32 bases
need none of this: all modes are exact there, and no master is kept.

Random numbers (A's draw, the noise, stochastic rounding) come from counter-based streams keyed by
``(seed, expert, layer)``, so they do not depend on RNG state, device, or how FSDP shards the
rows. The engine works on DTensor shards (FSDP2) as well as plain tensors: every update is
row-local, and the two global quantities (full A, and std's two moments) are tiny.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from lorasc_tune.adapters import AdaptedLayer, find_adapters
from lorasc_tune.config import LoRASCConfig
from lorasc_tune.ops import (
    add_uniform_noise_,
    counter_kaiming_uniform,
    is_nf4,
    lowrank_delta_moments,
    merge_lowrank_,
    requantize_nf4_,
    std_from_moments,
    stream_key,
)
from lorasc_tune.sharding import all_reduce_sum as _all_reduce_sum
from lorasc_tune.sharding import gather_rows as _gather_rows
from lorasc_tune.sharding import as_dtensor_like, is_dtensor
from lorasc_tune.sharding import local_rows as _local_rows

_STREAM_A, _STREAM_NOISE, _STREAM_ROUND_NOISE, _STREAM_ROUND_MERGE = 1, 2, 3, 4
# Config keys that must not change on resume, with the value to assume for states written
# before the key existed (merge_precision: those were all written with round-to-nearest).
# schedule and lr_ratio_B shape the optimizer and scheduler state that a resume reloads.
_RESUME_KEYS = {"cascade": None, "steps_per_expert": None, "num_experts": None,
                "slow_alpha": None, "noise_lambda": None, "merge_precision": "nearest",
                "schedule": "expert", "lr_ratio_B": 1.0}
STATE_VERSION = 1


class NonFiniteExpertError(RuntimeError):
    """A fast expert holds NaN/Inf values; it was not merged and the base is untouched."""


class CascadeEngine:
    """Slow expert state plus ``begin_expert`` / ``end_expert`` for one model.

    Args:
        model: any module holding torchtune ``LoRALinear``/``DoRALinear`` layers.
        cfg: the validated ``lorasc:`` block.
        seed: the run's seed; with the expert and layer index it keys every random draw.
        master_source: optional ``{"<layer>.weight": full-precision [d_out, d_in] tensor}``,
            e.g. the checkpoint as loaded. Where the engine keeps a master (NF4 bases, or
            ``merge_precision: fp32_master`` with a bf16/fp16 base) it starts from these
            values instead of the (already rounded or quantized) weight, and ``W`` is
            re-derived from it. Unused entries are ignored.
    """

    def __init__(self, model: nn.Module, cfg: LoRASCConfig, seed: int,
                 master_source: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        self.layers: List[AdaptedLayer] = find_adapters(model)
        if not self.layers:
            raise ValueError(
                "CascadeEngine: the model has no LoRALinear/DoRALinear layers; build it with a "
                "torchtune lora_* model builder or lorasc_tune.adapters.inject"
            )
        self.cfg = cfg
        self.seed = int(seed)
        self.expert = 0  # index t of the current (or last) expert, 1-based; 0 = none begun
        self.expert_open = False
        # Slow factors in float32, shaped (and sharded) like the local fast factors.
        self.slow_A: List[Optional[torch.Tensor]] = [None] * len(self.layers)
        self.slow_B: List[Optional[torch.Tensor]] = [None] * len(self.layers)
        # {expert t: [λ·std(s·B_slow·A_slow) per matrix]}: the width of the uniform noise each
        # matrix got before expert t (0 for t = 1).
        self.noise_widths: Dict[int, List[float]] = {}
        # Automatic α / λ (module doc): the previous fast expert's factors (local rows, float32),
        # the latest agreement c per matrix (None: no pair of experts yet), and what was used.
        self.prev_fast_A: List[Optional[torch.Tensor]] = [None] * len(self.layers)
        self.prev_fast_B: List[Optional[torch.Tensor]] = [None] * len(self.layers)
        self.agreement: List[Optional[float]] = [None] * len(self.layers)
        self.auto_alpha: Dict[int, List[float]] = {}
        self.auto_lambda: Dict[int, List[float]] = {}
        # fp32 master of W's local rows, or None where W is rounded in place (see module doc).
        self.master: List[Optional[torch.Tensor]] = [
            self._build_master(layer, master_source) for layer in self.layers]

    @torch.no_grad()
    def _build_master(self, layer: AdaptedLayer,
                      source: Optional[Mapping[str, torch.Tensor]]) -> Optional[torch.Tensor]:
        W, row0 = _local_rows(layer.weight)
        nf4 = is_nf4(W)
        if nf4 and is_dtensor(layer.weight):
            raise NotImplementedError(
                f"{layer.name}: NF4 (quantize_base) weights under FSDP2 are not supported by the "
                f"LoRASC engine; use the single-device recipe for QLoRA/QDoRA")
        if not nf4 and (self.cfg.merge_precision != "fp32_master"
                        or torch.finfo(W.dtype).bits >= 32):
            return None
        full = None if source is None else source.get(f"{layer.name}.weight")
        if full is not None:
            master = full.detach()[row0: row0 + W.shape[0]].to(torch.float32).clone()
        else:
            master = (W.get_original_weight() if nf4 else W).detach().to(torch.float32).clone()
        # One device: the master lives in host memory (4 bytes/element on the GPU would cost
        # more than the bf16 or NF4 weights themselves); each update streams one matrix to W's
        # device and back. FSDP2: next to W's local shard (1/world_size of it per GPU), so the
        # update stays a row-local op and DCP saves it like any sharded tensor.
        master = master.to(W.device if is_dtensor(layer.weight) else "cpu")
        self._store(layer, W, master)
        return master

    @staticmethod
    def _store(layer: AdaptedLayer, W: torch.Tensor, master: torch.Tensor) -> None:
        """``W ← round(master)``: requantize an NF4 base, round-to-nearest a dense one."""
        if is_nf4(W):
            requantize_nf4_(layer.weight, master)
        else:
            W.copy_(master)

    def _rounding(self) -> str:
        return "stochastic" if self.cfg.merge_precision == "stochastic" else "nearest"

    @torch.no_grad()
    def _update_base(self, i: int, layer: AdaptedLayer, t: int, stream: int, fn) -> None:
        """Apply ``fn(rows, rounding, round_key, row_start)`` (expert ``t``'s noise or merge) to W.

        With a master, ``fn`` runs on the fp32 master (exact; moved to W's device for the
        computation if it lives on CPU) and W is re-derived from it; without one, ``fn``
        rounds straight into W with the configured policy.
        """
        W, row0 = _local_rows(layer.weight)
        master = self.master[i]
        if master is None:
            fn(W, self._rounding(), stream_key(self.seed, t, i, stream), row0)
            return
        work = master.to(W.device)
        fn(work, "nearest", None, row0)
        if work is not master:
            master.copy_(work)
        self._store(layer, W, work)

    # ---- Algorithm 1 ------------------------------------------------------------------------

    @torch.no_grad()
    def begin_expert(self) -> Dict[str, float]:
        """Start expert ``t = self.expert + 1``.

        Returns:
            ``{layer name: λ·std(s·B_slow·A_slow)}``, the per-matrix noise scale: ``W`` got
            ``U(-1/2, 1/2)`` times it, i.e. ``U(-λ/2, λ/2)·std`` (the noise's own standard
            deviation is this over √12). All zero for ``t = 1`` or ``λ = 0``. The driver logs
            it as ``noise_width/<layer>``.
        """
        if self.expert_open:
            raise RuntimeError(f"begin_expert: expert {self.expert} is still open")
        if not self.cfg.cascade and self.expert >= 1:
            raise RuntimeError("begin_expert: cascade is off, so there is a single expert")
        t = self.expert + 1
        widths, lambdas = [], []
        for i, layer in enumerate(self.layers):
            A, a_row0 = _local_rows(layer.lora_a)
            B, _ = _local_rows(layer.lora_b)
            A.copy_(counter_kaiming_uniform(
                stream_key(self.seed, t, i, _STREAM_A), tuple(layer.lora_a.shape),
                device=A.device, dtype=A.dtype, row_start=a_row0, n_rows=A.shape[0]))
            B.zero_()
            if t == 1:
                self.slow_A[i] = A.detach().float().clone()
                self.slow_B[i] = B.detach().float().clone()
                widths.append(0.0)
                continue
            lam = self._noise_lambda(i)
            lambdas.append(lam)
            std = self._slow_delta_std(i, layer) if self.cfg.noise_enabled else 0.0
            if std > 0.0 and lam > 0.0:
                noise_key = stream_key(self.seed, t, i, _STREAM_NOISE)
                self._update_base(i, layer, t, _STREAM_ROUND_NOISE,
                                  lambda rows, mode, rkey, row0: add_uniform_noise_(
                                      rows, std, lam, noise_key,
                                      row_start=row0, rounding=mode, round_key=rkey))
            widths.append(lam * std)
        self.expert, self.expert_open = t, True
        self.noise_widths[t] = widths
        if self.cfg.auto_lambda and t > 1:
            self.auto_lambda[t] = lambdas
        return {layer.name: w for layer, w in zip(self.layers, widths)}

    @torch.no_grad()
    def end_expert(self) -> None:
        """Finish the current expert: slow update and merge (cascade on), or nothing (off).

        Raises:
            NonFiniteExpertError: before anything is written, if any fast factor (or DoRA
                magnitude) is NaN/Inf.
        """
        if not self.expert_open:
            raise RuntimeError("end_expert: no expert is open")
        self.check_finite()
        if self.cfg.cascade:
            auto = self.cfg.auto_alpha or self.cfg.auto_lambda
            alphas = []
            for i, layer in enumerate(self.layers):
                A, _ = _local_rows(layer.lora_a)
                B, _ = _local_rows(layer.lora_b)
                if auto:
                    self._record_fast(i, layer, A, B)
                alpha = self._slow_alpha(i)
                alphas.append(alpha)
                self.slow_A[i].mul_(alpha).add_(A.float(), alpha=1.0 - alpha)
                self.slow_B[i].mul_(alpha).add_(B.float(), alpha=1.0 - alpha)
                A_full = _gather_rows(self.slow_A[i], layer.lora_a)
                B_slow = self.slow_B[i]
                self._update_base(i, layer, self.expert, _STREAM_ROUND_MERGE,
                                  lambda rows, mode, rkey, row0: merge_lowrank_(
                                      rows, B_slow, A_full, layer.scale, rounding=mode,
                                      round_key=rkey, row_start=row0))
                # The expert now lives in W; with B = 0 the model computes the merged weights.
                B.zero_()
            if self.cfg.auto_alpha:
                self.auto_alpha[self.expert] = alphas
        self.expert_open = False

    # ---- checks and helpers -----------------------------------------------------------------

    @torch.no_grad()
    def check_finite(self) -> None:
        """Raise :class:`NonFiniteExpertError` naming the first adapter with NaN/Inf values."""
        bad = []
        for layer in self.layers:
            tensors = {"lora_a": layer.lora_a, "lora_b": layer.lora_b}
            if layer.dora:
                tensors["magnitude"] = layer.module.magnitude
            for what, p in tensors.items():
                local, _ = _local_rows(p)
                if not bool(torch.isfinite(local).all()):
                    bad.append(f"{layer.name}.{what}")
        flag = torch.tensor([float(len(bad))])
        _all_reduce_sum(flag, self.layers[0].lora_a)
        if flag.item() > 0:
            where = ", ".join(bad[:5]) or "another rank's shard"
            raise NonFiniteExpertError(
                f"expert {self.expert} has non-finite adapter values in {where}; it was not "
                f"merged, and the base weights are unchanged"
            )

    def _slow_alpha(self, i: int) -> float:
        if not self.cfg.auto_alpha:
            return self.cfg.slow_alpha
        c = self.agreement[i]
        return 0.5 if c is None else (1.0 - c) / 2.0

    def _noise_lambda(self, i: int) -> float:
        if not self.cfg.auto_lambda:
            return self.cfg.noise_lambda
        c = self.agreement[i]
        return 1.0 if c is None else 1.0 - c

    def _record_fast(self, i: int, layer: AdaptedLayer, A: torch.Tensor, B: torch.Tensor) -> None:
        """Set ``agreement[i]`` to cos(B·A, previous B·A) and keep this expert's factors.

        ``c = 0`` where either update is zero (an expert that learned nothing agrees with
        nothing). Collective under FSDP2: every rank calls it for every layer, in order.
        """
        A_now, B_now = A.detach().float().clone(), B.detach().float().clone()
        if self.prev_fast_A[i] is not None:
            A_full = _gather_rows(A_now, layer.lora_a).double()
            A_prev = _gather_rows(self.prev_fast_A[i], layer.lora_a).double()
            B64, B_prev = B_now.double(), self.prev_fast_B[i].double()
            # (⟨F_t, F_{t-1}⟩, ‖F_t‖², ‖F_{t-1}‖²) with F = B·A; partial sums over B's rows.
            moments = torch.stack([((B64.T @ B_prev) * (A_full @ A_prev.T)).sum(),
                                   ((B64.T @ B64) * (A_full @ A_full.T)).sum(),
                                   ((B_prev.T @ B_prev) * (A_prev @ A_prev.T)).sum()])
            _all_reduce_sum(moments, layer.lora_b)
            dot, sq_now, sq_prev = (float(v) for v in moments)
            denom = math.sqrt(max(sq_now, 0.0) * max(sq_prev, 0.0))
            c = dot / denom if denom > 0.0 else 0.0
            self.agreement[i] = min(1.0, max(-1.0, c))  # rounding can step just past ±1
        self.prev_fast_A[i], self.prev_fast_B[i] = A_now, B_now

    def _slow_delta_std(self, i: int, layer: AdaptedLayer) -> float:
        """``std(s·B_slow·A_slow)`` over the full matrix, via r×r Gram matrices."""
        moments = lowrank_delta_moments(
            self.slow_B[i], _gather_rows(self.slow_A[i], layer.lora_a), layer.scale)
        _all_reduce_sum(moments, layer.lora_b)
        d_out, d_in = layer.shape
        return std_from_moments(moments, d_out * d_in)

    # ---- state ------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue the cascade (the base weights are saved separately).

        ``state["slow"]`` maps ``<layer>.slow_A`` / ``<layer>.slow_B`` to float32 tensors, and
        ``<layer>.master`` to the fp32 master where one is kept; under FSDP2 they are DTensors
        sharded like the layer's A, B and W, so a sharded checkpoint
        (``torch.distributed.checkpoint``) can reload them at any world size.
        """
        slow = {}
        for layer, A, B in zip(self.layers, self.slow_A, self.slow_B):
            if A is not None:
                slow[f"{layer.name}.slow_A"] = _wrap_like(A.clone(), layer.lora_a)
                slow[f"{layer.name}.slow_B"] = _wrap_like(B.clone(), layer.lora_b)
        for layer, master in zip(self.layers, self.master):
            if master is not None:
                slow[f"{layer.name}.master"] = _wrap_like(master.clone(), layer.weight)
        auto = self.cfg.cascade and (self.cfg.auto_alpha or self.cfg.auto_lambda)
        if auto:
            for layer, A, B in zip(self.layers, self.prev_fast_A, self.prev_fast_B):
                if A is not None:
                    slow[f"{layer.name}.prev_fast_A"] = _wrap_like(A.clone(), layer.lora_a)
                    slow[f"{layer.name}.prev_fast_B"] = _wrap_like(B.clone(), layer.lora_b)
        state = {
            "version": STATE_VERSION,
            "config": self.cfg.to_dict(),
            "seed": self.seed,
            "expert": self.expert,
            "expert_open": self.expert_open,
            "layers": [layer.name for layer in self.layers],
            "slow": slow,
            "noise_width": dict(self.noise_widths),
        }
        if auto:  # only then: a fixed-α/λ state stays exactly as before
            state["auto"] = {"agreement": list(self.agreement), "alpha": dict(self.auto_alpha),
                             "lambda": dict(self.auto_lambda)}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"cascade state version {state.get('version')} is not supported")
        names = [layer.name for layer in self.layers]
        if state["layers"] != names:
            raise ValueError(
                "cascade state does not match the model's adapters: saved "
                f"{len(state['layers'])} layers, model has {len(names)} "
                f"(first saved: {state['layers'][:2]}, first in model: {names[:2]})"
            )
        for key, default in _RESUME_KEYS.items():
            saved = state["config"].get(key, default)
            if saved != getattr(self.cfg, key):
                raise ValueError(
                    f"lorasc.{key}={getattr(self.cfg, key)!r} differs from the checkpoint's "
                    f"{saved!r}; resume with the original value"
                )
        if int(state["seed"]) != self.seed:
            raise ValueError(f"seed={self.seed} differs from the checkpoint's {state['seed']}; "
                             f"resume with the original seed")
        self.expert = int(state["expert"])
        self.expert_open = bool(state["expert_open"])
        slow = state["slow"]
        self.slow_A = [_local_copy(slow.get(f"{n}.slow_A")) for n in names]
        self.slow_B = [_local_copy(slow.get(f"{n}.slow_B")) for n in names]
        # States saved before the rename call it noise_std (the same λ·std widths).
        self.noise_widths = dict(state["noise_width"] if "noise_width" in state
                                 else state["noise_std"])
        if self.cfg.cascade and (self.cfg.auto_alpha or self.cfg.auto_lambda):
            if self.expert >= 1 and "auto" not in state:
                raise ValueError("cascade state has no automatic-α/λ record (lorasc.slow_alpha or "
                                 "lorasc.noise_lambda is 'auto'); it cannot resume exactly")
            auto = state.get("auto", {})
            self.agreement = list(auto.get("agreement", [None] * len(names)))
            self.auto_alpha = dict(auto.get("alpha", {}))
            self.auto_lambda = dict(auto.get("lambda", {}))
            self.prev_fast_A = [_local_copy(slow.get(f"{n}.prev_fast_A")) for n in names]
            self.prev_fast_B = [_local_copy(slow.get(f"{n}.prev_fast_B")) for n in names]
        with torch.no_grad():
            for layer, master in zip(self.layers, self.master):
                if master is None:
                    continue
                saved = slow.get(f"{layer.name}.master")
                if saved is None:
                    raise ValueError(
                        f"cascade state has no fp32 master for {layer.name}, which this run "
                        f"keeps (NF4 base or merge_precision: fp32_master); it cannot resume "
                        f"exactly from this state")
                master.copy_(_local_copy(saved))
                # The master is the source of truth; W is re-derived from it, exactly.
                self._store(layer, _local_rows(layer.weight)[0], master)

    def master_weights(self) -> Dict[str, torch.Tensor]:
        """``{"<layer>.weight": fp32 master}`` for layers that keep one (local rows).

        Export folds from these (:func:`lorasc_tune.adapters.merged_state_dict`), not from the
        rounded or NF4 weight.
        """
        return {f"{layer.name}.weight": m for layer, m in zip(self.layers, self.master)
                if m is not None}


    def full_master_weights(self) -> Dict[str, torch.Tensor]:
        """Like :meth:`master_weights`, but whole matrices on CPU: collective under FSDP2.

        Every rank must call it (each master's rows are gathered one matrix at a time); the
        export on rank 0 folds from the result.
        """
        out = {}
        for layer, m in zip(self.layers, self.master):
            if m is not None:
                out[f"{layer.name}.weight"] = _gather_rows(m.to(_local_rows(layer.weight)[0].device),
                                                           layer.weight).cpu()
        return out


def _wrap_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return as_dtensor_like(local, like) if is_dtensor(like) else local


def _local_copy(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return (t.to_local() if is_dtensor(t) else t).detach().float().clone()
