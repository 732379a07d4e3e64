"""Plain tensors and FSDP2 DTensors (sharded on dim 0) through one small interface.

The engine reads and writes parameters only through these three functions, so the same code
runs on one device and under FSDP2: every update is row-local, and the only global
quantities (a full ``A``, a sum across ranks) are tiny.
"""

from __future__ import annotations

from typing import Tuple

import torch


def is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def local_rows(t: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """The locally held rows of ``t`` (a view into its storage) and their first global row."""
    if not is_dtensor(t):
        return t.data, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local().data, int(offset[0]) if len(offset) else 0


def gather_rows(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The full matrix whose local rows are ``local``, sharded like the parameter ``like``."""
    if not is_dtensor(like):
        return local
    return as_dtensor_like(local, like).full_tensor()


def as_dtensor_like(local: torch.Tensor, like: torch.Tensor):
    """Wrap a local shard as a DTensor with ``like``'s mesh, placements and global shape."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local.to(like.to_local().device), like.device_mesh, like.placements,
                              shape=like.shape, stride=like.stride(), run_check=False)


def all_reduce_sum(t: torch.Tensor, like: torch.Tensor) -> None:
    """In place: sum ``t`` over the ranks that shard ``like`` (a no-op for plain tensors)."""
    if not is_dtensor(like):
        return
    import torch.distributed as dist

    buf = t.to(like.to_local().device)
    dist.all_reduce(buf, group=like.device_mesh.get_group())
    t.copy_(buf.to(t.device))
