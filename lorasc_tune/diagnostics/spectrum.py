"""The singular values of a learned update ``W_T - W_0`` and the ranks read from them."""

from __future__ import annotations

import math
from typing import Any, Dict

import torch

from lorasc_tune.diagnostics.errors import DiagnosticsError


def spectrum(w_final: torch.Tensor, w_base: torch.Tensor, rtol: float, energy: float
             ) -> Dict[str, Any]:
    """Singular values of ``W_T - W_0`` (in float64: the difference of two fp32/bf16 tensors
    is exact there) and two ranks: numerical (``σ_i > rtol·σ_1``) and energy (fewest ``σ``
    holding ``energy`` of ``‖ΔW‖_F²``), the latter robust to the full-rank noise floor."""
    if w_final.shape != w_base.shape:
        raise DiagnosticsError(f"shape mismatch: W_T {tuple(w_final.shape)} vs W_0 "
                               f"{tuple(w_base.shape)}")
    delta = w_final.to(torch.float64) - w_base.to(torch.float64)
    sv = torch.linalg.svdvals(delta)
    top = float(sv[0]) if sv.numel() else 0.0
    sq = sv.square()
    total = float(sq.sum())
    numerical = int((sv > rtol * top).sum()) if top > 0 else 0
    energy_rank = (int((torch.cumsum(sq, 0) < energy * total).sum()) + 1) if total > 0 else 0
    return {"shape": list(delta.shape), "singular_values": sv.tolist(),
            "numerical_rank": numerical, "energy_rank": min(energy_rank, sv.numel()),
            "frobenius_norm": math.sqrt(total)}
