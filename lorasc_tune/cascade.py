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

Random numbers (A's draw, the noise) come from counter-based streams keyed by
``(seed, expert, layer)``, so they do not depend on RNG state, device, or how FSDP shards the
rows. The engine works on DTensor shards (FSDP2) as well as plain tensors: every update is
row-local, and the two global quantities (full A, and std's two moments) are tiny.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from lorasc_tune.adapters import AdaptedLayer, find_adapters
from lorasc_tune.config import LoRASCConfig
from lorasc_tune.ops import (
    add_uniform_noise_,
    counter_kaiming_uniform,
    lowrank_delta_moments,
    merge_lowrank_,
    std_from_moments,
    stream_key,
)
from lorasc_tune.sharding import all_reduce_sum as _all_reduce_sum
from lorasc_tune.sharding import gather_rows as _gather_rows
from lorasc_tune.sharding import as_dtensor_like, is_dtensor
from lorasc_tune.sharding import local_rows as _local_rows

_STREAM_A, _STREAM_NOISE = 1, 2
STATE_VERSION = 1


class NonFiniteExpertError(RuntimeError):
    """A fast expert holds NaN/Inf values; it was not merged and the base is untouched."""


class CascadeEngine:
    """Slow expert state plus ``begin_expert`` / ``end_expert`` for one model.

    Args:
        model: any module holding torchtune ``LoRALinear``/``DoRALinear`` layers.
        cfg: the validated ``lorasc:`` block.
        seed: the run's seed; with the expert and layer index it keys every random draw.
    """

    def __init__(self, model: nn.Module, cfg: LoRASCConfig, seed: int) -> None:
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
        self.noise_std: Dict[int, List[float]] = {}

    # ---- Algorithm 1 ------------------------------------------------------------------------

    @torch.no_grad()
    def begin_expert(self) -> Dict[str, float]:
        """Start expert ``t = self.expert + 1``.

        Returns:
            ``{layer name: noise std}`` — the per-matrix ``λ·std(s·B_slow·A_slow)`` used to
            perturb ``W`` (all zero for ``t = 1`` or ``λ = 0``).
        """
        if self.expert_open:
            raise RuntimeError(f"begin_expert: expert {self.expert} is still open")
        if not self.cfg.cascade and self.expert >= 1:
            raise RuntimeError("begin_expert: cascade is off, so there is a single expert")
        t = self.expert + 1
        widths = []
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
            std = self._slow_delta_std(i, layer) if self.cfg.noise_enabled else 0.0
            if std > 0.0:
                W, w_row0 = _local_rows(layer.weight)
                add_uniform_noise_(W, std, self.cfg.noise_lambda,
                                   stream_key(self.seed, t, i, _STREAM_NOISE), row_start=w_row0)
            widths.append(self.cfg.noise_lambda * std)
        self.expert, self.expert_open = t, True
        self.noise_std[t] = widths
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
            alpha = self.cfg.slow_alpha
            for i, layer in enumerate(self.layers):
                A, _ = _local_rows(layer.lora_a)
                B, _ = _local_rows(layer.lora_b)
                self.slow_A[i].mul_(alpha).add_(A.float(), alpha=1.0 - alpha)
                self.slow_B[i].mul_(alpha).add_(B.float(), alpha=1.0 - alpha)
                W, _ = _local_rows(layer.weight)
                merge_lowrank_(W, self.slow_B[i], _gather_rows(self.slow_A[i], layer.lora_a),
                               layer.scale)
                # The expert now lives in W; with B = 0 the model computes the merged weights.
                B.zero_()
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

        ``state["slow"]`` maps ``<layer>.slow_A`` / ``<layer>.slow_B`` to float32 tensors; under
        FSDP2 they are DTensors sharded like the layer's A and B, so a sharded checkpoint
        (``torch.distributed.checkpoint``) can reload them at any world size.
        """
        slow = {}
        for layer, A, B in zip(self.layers, self.slow_A, self.slow_B):
            if A is not None:
                slow[f"{layer.name}.slow_A"] = _wrap_like(A.clone(), layer.lora_a)
                slow[f"{layer.name}.slow_B"] = _wrap_like(B.clone(), layer.lora_b)
        return {
            "version": STATE_VERSION,
            "config": self.cfg.to_dict(),
            "seed": self.seed,
            "expert": self.expert,
            "expert_open": self.expert_open,
            "layers": [layer.name for layer in self.layers],
            "slow": slow,
            "noise_std": dict(self.noise_std),
        }

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
        for key in ("cascade", "steps_per_expert", "slow_alpha", "noise_lambda"):
            if state["config"].get(key) != getattr(self.cfg, key):
                raise ValueError(
                    f"lorasc.{key}={getattr(self.cfg, key)!r} differs from the checkpoint's "
                    f"{state['config'].get(key)!r}; resume with the original value"
                )
        if int(state["seed"]) != self.seed:
            raise ValueError(f"seed={self.seed} differs from the checkpoint's {state['seed']}; "
                             f"resume with the original seed")
        self.expert = int(state["expert"])
        self.expert_open = bool(state["expert_open"])
        slow = state["slow"]
        self.slow_A = [_local_copy(slow.get(f"{n}.slow_A")) for n in names]
        self.slow_B = [_local_copy(slow.get(f"{n}.slow_B")) for n in names]
        self.noise_std = dict(state["noise_std"])


def _wrap_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return as_dtensor_like(local, like) if is_dtensor(like) else local


def _local_copy(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return (t.to_local() if is_dtensor(t) else t).detach().float().clone()
