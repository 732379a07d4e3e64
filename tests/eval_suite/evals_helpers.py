"""Helpers shared by the evals tests (a plain module: conftest files are not importable by name)."""

from __future__ import annotations

import torch

def peaked_llama(vocab_size: int = 257, max_seq_len: int = 64, seed: int = 0) -> torch.nn.Module:
    """A tiny random Llama-2 whose logits have clear winners (weights with a large spread), so greedy
    choices are far from ties and float reordering between code paths cannot flip them."""
    from torchtune.models.llama2 import llama2

    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = llama2(vocab_size=vocab_size, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                       intermediate_dim=64, max_seq_len=max_seq_len)
        for p in model.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.3)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval().requires_grad_(False)
