"""Shared tiny shapes for the vision tests (width 32, 2 layers, 28 px): fast on 2 CPU cores."""

import torch
from torch import nn

TINY = dict(width=32, layers=2, heads=4, mlp_dim=64, patch_size=7, image_size=28, output_dim=16)


def randomize_(module: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Give every parameter non-trivial random values (LayerNorm gains near 1, not 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise if p.ndim == 1 and "weight" in name else noise)
    return module
