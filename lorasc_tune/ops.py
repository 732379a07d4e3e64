"""Pure tensor functions behind LoRASC's boundary steps.

Every function works on a *block of rows* of a weight matrix (``row_start`` says where the
block sits in the full matrix). On one device the block is the whole matrix; under FSDP2,
which shards dim 0, it is the local shard, and the results are identical to the unsharded
computation because nothing here depends on how rows are split.

Notation (shapes): ``W`` is ``[d_out, d_in]``, ``B`` is ``[d_out, r]``, ``A`` is ``[r, d_in]``,
``s`` is the LoRA scale ``alpha / rank``; the delta actually added to ``W`` is ``s·B·A``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

_MASK32 = 0xFFFFFFFF
# Rows are processed in blocks of about this many elements: temporaries stay at a few MB
# however large the matrix, and blocks that fit in cache make the integer hashing of
# counter_uniform ~10x faster on CPU than 4M-element blocks (measured on 4096 x 4096).
_CHUNK_ELEMS = 1 << 18


# ---- std(s·B·A) without forming B·A ---------------------------------------------------------


def lowrank_delta_moments(B_rows: torch.Tensor, A: torch.Tensor, scale: float) -> torch.Tensor:
    """Sum and sum of squares of ``s·B_rows·A`` over all its elements, in float64.

    Uses ``Σ_ij (BA)_ij = (1ᵀB)(A1)`` and ``Σ_ij (BA)_ij² = Σ (BᵀB) ∘ (AAᵀ)``, so the cost is
    ``O((d_out + d_in)·r²)`` and memory ``O(r²)`` instead of a ``d_out × d_in`` product.

    Args:
        B_rows: ``[n_rows, r]`` (all of B, or a row shard of it).
        A: ``[r, d_in]``, the full A.
        scale: the LoRA scale ``s``.

    Returns:
        ``[2]`` float64 tensor ``(Σ Δ, Σ Δ²)``; partial sums from row shards add up.
    """
    B64, A64 = B_rows.detach().double(), A.detach().double()
    total = B64.sum(0) @ A64.sum(1)
    total_sq = ((B64.T @ B64) * (A64 @ A64.T)).sum()
    return torch.stack([total * scale, total_sq * scale * scale])


def std_from_moments(moments: torch.Tensor, numel: int, correction: int = 1) -> float:
    """Standard deviation from ``(Σx, Σx²)`` over ``numel`` elements (``torch.std`` semantics)."""
    total, total_sq = (float(v) for v in moments)
    var = (total_sq - total * total / numel) / max(numel - correction, 1)
    return math.sqrt(max(var, 0.0))


def lowrank_delta_std(B: torch.Tensor, A: torch.Tensor, scale: float) -> float:
    """``std(s·B·A)`` over all ``d_out·d_in`` elements, equal to ``torch.std(s * B @ A)``."""
    return std_from_moments(lowrank_delta_moments(B, A, scale), B.shape[0] * A.shape[1])


# ---- counter-based uniform numbers ----------------------------------------------------------


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply) on int64 tensors holding uint32 values.

    Products may wrap past 2**63; two's-complement wrap-around keeps the low 32 bits exact,
    and the mask restores a non-negative value before each shift.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def stream_key(*parts: int) -> Tuple[int, int]:
    """Two 32-bit keys that name one random stream, e.g. ``(seed, expert, layer, purpose)``."""
    k = 0x9E3779B9
    for p in parts:
        k = _mix32_int(k ^ _mix32_int(int(p) & _MASK32) ^ ((int(p) >> 32) & _MASK32))
    return k, _mix32_int(k ^ 0x85EBCA6B)


def counter_uniform(
    key: Tuple[int, int],
    row_start: int,
    n_rows: int,
    n_cols: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Uniform numbers in ``[0, 1)`` for rows ``row_start … row_start + n_rows`` of a matrix.

    Element ``(i, j)`` of the full matrix always gets the same value for a given ``key``,
    whatever the device, the block split or the call order: the value is a hash of the key
    and the element's flat index ``i·n_cols + j``. This is what makes noise and
    re-initialisation independent of world size and of RNG state on resume.

    Returns:
        ``[n_rows, n_cols]`` float32, multiples of ``2**-24``.
    """
    k1, k2 = key
    idx = torch.arange(n_rows * n_cols, dtype=torch.int64, device=device)
    idx += row_start * n_cols
    lo, hi = idx & _MASK32, idx >> 32
    h = _mix32((lo + k1) & _MASK32)
    h = _mix32(h ^ ((hi * 0x27D4EB2F + k2) & _MASK32))
    return ((h >> 8).to(torch.float32) * (1.0 / (1 << 24))).view(n_rows, n_cols)


def _row_blocks(n_rows: int, n_cols: int):
    step = max(1, _CHUNK_ELEMS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


# ---- in-place updates of a weight block -----------------------------------------------------


# ---- rounding fp32 results into a lower-precision weight -----------------------------------

ROUNDING_MODES = ("nearest", "stochastic")


@torch.no_grad()
def round_to_dtype_(
    dst: torch.Tensor,
    src_fp32: torch.Tensor,
    mode: str = "nearest",
    key: Optional[Tuple[int, int]] = None,
    row_start: int = 0,
) -> None:
    """``dst ← round(src_fp32)`` into ``dst``'s dtype, in place.

    ``"nearest"`` is IEEE round-to-nearest-even (a plain ``copy_``). ``"stochastic"`` rounds to
    one of the two neighbouring representable values, the far one with probability
    ``|x - near| / |far - near|``, so ``E[dst] = src`` exactly: a bf16 weight that receives many
    small updates keeps them *on average* instead of losing every one below half an ulp. The
    random bits come from :func:`counter_uniform` keyed by ``key`` and the element's global
    index, so the result is deterministic, resumable and independent of how rows are sharded.

    For an fp32 (or wider) ``dst`` both modes are exact copies.

    Args:
        dst: ``[n_rows, n_cols]``, rows ``row_start …`` of the full matrix, any float dtype.
        src_fp32: ``[n_rows, n_cols]`` float32, the exact values to store.
        mode: ``"nearest"`` or ``"stochastic"``.
        key: stream key from :func:`stream_key`; required for ``"stochastic"``.
    """
    if mode not in ROUNDING_MODES:
        raise ValueError(f"rounding mode must be one of {ROUNDING_MODES}; got {mode!r}")
    if mode == "nearest" or torch.finfo(dst.dtype).bits >= 32:
        dst.copy_(src_fp32)
        return
    if key is None:
        raise ValueError("stochastic rounding needs a stream key")
    n_rows, n_cols = dst.shape
    for a, b in _row_blocks(n_rows, n_cols):
        x = src_fp32[a:b].to(device=dst.device, dtype=torch.float32)
        near = x.to(dst.dtype)
        near32 = near.float()
        # x - near is exact in fp32: near is x with its low mantissa bits rounded away.
        diff = x - near32
        far = torch.nextafter(near, torch.where(diff > 0, torch.inf, -torch.inf).to(dst.dtype))
        # far - near is one (power-of-two) ulp, so p is exact; p = 0 where x is representable.
        # Non-finite x gives diff = nan and p = nan, and `u < nan` is false: near is kept.
        p = diff / (far.float() - near32)
        u = counter_uniform(key, row_start + a, b - a, n_cols, device=dst.device)
        dst[a:b].copy_(torch.where(u < p, far, near))


# ---- in-place updates of a weight block -----------------------------------------------------


@torch.no_grad()
def add_uniform_noise_(
    weight_rows: torch.Tensor,
    std: float,
    noise_lambda: float,
    key: Tuple[int, int],
    row_start: int = 0,
    rounding: str = "nearest",
    round_key: Optional[Tuple[int, int]] = None,
) -> None:
    """``W += U(-λ/2, λ/2)·std`` in place, computed in float32, rounded into ``W``'s dtype.

    Args:
        weight_rows: ``[n_rows, d_in]``, rows ``row_start …`` of the full weight.
        std: the per-matrix scale, ``std(s·B_slow·A_slow)`` (global over the full matrix).
        noise_lambda: λ, the width of the uniform distribution in units of ``std``.
        key: the stream key of the noise, from :func:`stream_key`.
        rounding: how the fp32 sum is stored back (see :func:`round_to_dtype_`).
        round_key: the (separate) stream key of stochastic rounding's random bits.
    """
    width = noise_lambda * std
    if width == 0.0:
        return
    n_rows, n_cols = weight_rows.shape
    for a, b in _row_blocks(n_rows, n_cols):
        u = counter_uniform(key, row_start + a, b - a, n_cols, device=weight_rows.device)
        block = weight_rows[a:b]
        round_to_dtype_(block, block.float() + (u - 0.5) * width, rounding, round_key,
                        row_start + a)


@torch.no_grad()
def merge_lowrank_(
    weight_rows: torch.Tensor,
    B_rows: torch.Tensor,
    A: torch.Tensor,
    scale: float,
    rounding: str = "nearest",
    round_key: Optional[Tuple[int, int]] = None,
    row_start: int = 0,
) -> None:
    """``W += s·B·A`` in place, one block of rows at a time, in float32.

    Args:
        weight_rows: ``[n_rows, d_in]``, rows ``row_start …`` of the full weight.
        B_rows: ``[n_rows, r]``, the matching rows of B.
        A: ``[r, d_in]``.
        scale: the LoRA scale ``s``.
        rounding: how the fp32 sum is stored back (see :func:`round_to_dtype_`).
        round_key: stream key of stochastic rounding's random bits.
    """
    n_rows, n_cols = weight_rows.shape
    A32 = A.to(device=weight_rows.device, dtype=torch.float32)
    B32 = B_rows.to(device=weight_rows.device, dtype=torch.float32)
    for a, b in _row_blocks(n_rows, n_cols):
        block = weight_rows[a:b]
        round_to_dtype_(block, torch.addmm(block.float(), B32[a:b], A32, alpha=scale),
                        rounding, round_key, row_start + a)


# ---- NF4 (QLoRA) bases ----------------------------------------------------------------------


def is_nf4(t: torch.Tensor) -> bool:
    """Whether ``t`` is a torchao ``NF4Tensor`` (a QLoRA base weight)."""
    return type(t).__name__ == "NF4Tensor"


@torch.no_grad()
def requantize_nf4_(weight: torch.Tensor, master: torch.Tensor) -> None:
    """``W ← to_nf4(master)`` in place, with ``W``'s block sizes and dtype.

    The master is cast to the dtype ``W`` was quantized from (the model's dtype) before
    quantizing, so ``dequant(W) == to_nf4(master.to(W.dtype)).get_original_weight()``
    exactly: the NF4 weight is always one quantization away from the full-precision source of
    truth, never a quantization of a previous quantization. NF4's scale statistics are
    per-matrix (a global mean of block scales), so this needs the whole matrix.

    Args:
        weight: an ``NF4Tensor`` ``[d_out, d_in]`` (the module's parameter, updated in place).
        master: ``[d_out, d_in]`` full-precision values, any device.
    """
    from torchao.dtypes.nf4tensor import to_nf4

    src = master.to(device=weight.device, dtype=weight.dtype).contiguous()
    # Same block sizes: NF4Tensor.copy_ then copies the packed data and scales as they are.
    weight.copy_(to_nf4(src, weight.block_size, weight.scaler_block_size))


def counter_kaiming_uniform(
    key: Tuple[int, int], shape: Tuple[int, int], device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32, row_start: int = 0, n_rows: int | None = None,
) -> torch.Tensor:
    """LoRA's A initialisation, ``U(-1/√d_in, 1/√d_in)``, drawn from a counter-based stream.

    This is the distribution of torchtune's ``kaiming_uniform_(a=√5)`` for a ``[r, d_in]``
    weight; drawing it by counter makes each expert's A a function of (seed, expert, layer).

    Args:
        shape: the full ``(r, d_in)``; ``row_start``/``n_rows`` select a row shard.
    """
    r, d_in = shape
    n_rows = r - row_start if n_rows is None else n_rows
    bound = 1.0 / math.sqrt(d_in)
    u = counter_uniform(key, row_start, n_rows, d_in, device=device)
    return ((u * 2.0 - 1.0) * bound).to(dtype)
