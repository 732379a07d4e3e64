"""Batched greedy decoding for a torchtune ``TransformerDecoder``, with or without a KV cache.

Prompts of different lengths are left-padded to a common length ``L``. Every row then generates at
the same absolute index, so one KV cache serves the batch; pad positions are hidden by the attention
mask and each row's position ids start at 0 on its first real token, so a padded row computes the
same logits as the row alone. The cache-free path runs the full sequence every step with the same
mask and positions: it exists to check the cached path and for models without cache support.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

#: ``stop(row, generated_ids) -> bool``: called after each new token of an unfinished row.
StopFn = Callable[[int, List[int]], bool]


def padded_batch(prompts: Sequence[Sequence[int]], pad_id: int, extra: int, device: torch.device):
    """Left-pad ``prompts`` and precompute masks/positions for ``extra`` generated tokens.

    Returns ``(tokens[b, L], attend[b, T, T], positions[b, T])`` with ``T = L + extra``:
    ``attend[i, q, k]`` is True when query ``q`` of row ``i`` may see key ``k`` (causal, not a pad);
    ``positions[i, t]`` is the RoPE position of slot ``t`` (pads get 0, they are never attended).
    """
    batch, length = len(prompts), max(len(p) for p in prompts)
    total = length + extra
    tokens = torch.full((batch, length), pad_id, dtype=torch.long)
    real = torch.ones(batch, total, dtype=torch.bool)  # generated slots are always real
    for i, prompt in enumerate(prompts):
        tokens[i, length - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        real[i, : length - len(prompt)] = False
    causal = torch.tril(torch.ones(total, total, dtype=torch.bool))
    attend = causal[None] & real[:, None, :]
    # A pad query sees nothing and would make softmax NaN; let it see itself (its output is unused).
    attend |= torch.eye(total, dtype=torch.bool)[None]
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    return tokens.to(device), attend.to(device), positions.to(device)


@torch.inference_mode()
def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    stop_ids: Sequence[int] = (),
    stop_fn: Optional[StopFn] = None,
    use_cache: bool = True,
) -> List[List[int]]:
    """Greedy continuation of each prompt (token ids), batched.

    A row stops after emitting a token in ``stop_ids`` (that token is dropped from its output), when
    ``stop_fn(row, generated)`` returns True (the output keeps the token; callers trim stop strings),
    or after ``max_new_tokens``. The prompts plus ``max_new_tokens`` must fit ``model.max_seq_len``.

    Returns one list of generated ids per prompt, in input order.
    """
    if max_new_tokens <= 0 or not prompts:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    tokens, attend, positions = padded_batch(prompts, pad_id, max_new_tokens, device)
    batch, length = tokens.shape
    if length + max_new_tokens > model.max_seq_len:
        raise ValueError(f"prompt ({length}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_seq_len ({model.max_seq_len}); truncate the prompt first")
    stop_set = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    outputs: List[List[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)

    def step_logits(seq: torch.Tensor, start: int) -> torch.Tensor:
        """Logits of the last slot ``[b, vocab]``; ``seq`` holds slots ``start..start+s-1``."""
        end = start + seq.shape[1]
        if use_cache:
            # The cache keys cover all T slots, so the mask rows span the whole cache width.
            mask, pos = attend[:, start:end, :], positions[:, start:end]
        else:
            mask, pos = attend[:, :end, :end], positions[:, :end]
        return model(seq, mask=mask, input_pos=pos)[:, -1].float()

    def run(seq_so_far: torch.Tensor) -> None:
        nonlocal done
        logits = step_logits(seq_so_far, 0)
        for step in range(max_new_tokens):
            next_tok = logits.argmax(dim=-1)  # [b]
            # Finished rows keep decoding a pad (cheap, keeps shapes fixed) but record nothing.
            next_tok = torch.where(done, torch.full_like(next_tok, pad_id), next_tok)
            hit_stop = torch.isin(next_tok, stop_set) & ~done
            for row in range(batch):
                if done[row] or hit_stop[row]:
                    continue
                outputs[row].append(int(next_tok[row]))
                if stop_fn is not None and stop_fn(row, outputs[row]):
                    hit_stop[row] = True
            done = done | hit_stop
            if bool(done.all()) or step == max_new_tokens - 1:
                return
            if use_cache:
                logits = step_logits(next_tok[:, None], length + step)
            else:
                seq_so_far = torch.cat([seq_so_far, next_tok[:, None]], dim=1)
                logits = step_logits(seq_so_far, 0)

    if use_cache:
        from torchtune.modules.common_utils import local_kv_cache

        cache_dtype = next(model.parameters()).dtype
        # A fresh cache per batch: torchtune caches have a fixed batch size and a shared write
        # pointer, so they cannot be reused across batches of different shapes.
        with local_kv_cache(model, batch_size=batch, device=device, dtype=cache_dtype,
                            decoder_max_seq_len=length + max_new_tokens):
            run(tokens)
    else:
        run(tokens)
    return outputs
