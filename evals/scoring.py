"""Exact, batched log-likelihood of token continuations under a causal decoder.

Each request is ``(context_ids, continuation_ids)``. The model reads ``context + continuation`` minus
its last token (the last token is only ever a target), keeping at most ``max_length`` input tokens by
dropping from the left, exactly as lm-eval's HF adapter does. The continuation's log-probability is the
sum over its tokens of ``log_softmax(logits)`` at the positions that predict them::

    ids     c0 c1 c2 | t0 t1 t2
    input   c0 c1 c2   t0 t1        (last id dropped)
    predict    c1 c2   t0 t1 t2     -> score the last len(cont) = 3 positions

Requests are sorted longest first so a batch pads little and its first row sets its width; rows are
right-padded, which cannot change a causal model's logits at the real positions.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

Request = Tuple[Sequence[int], Sequence[int]]


def model_inputs(context: Sequence[int], continuation: Sequence[int], max_length: int) -> List[int]:
    """The ids fed to the model for one request: ``(context + continuation)[:-1]``, left-truncated
    to ``max_length`` tokens."""
    if not context or not continuation:
        raise ValueError("context (at least a BOS) and continuation must each contain a token")
    if len(continuation) > max_length:
        raise ValueError(f"continuation of {len(continuation)} tokens exceeds max_length={max_length}")
    whole = list(context) + list(continuation)
    return whole[-(max_length + 1):][:-1]


@torch.inference_mode()
def score_requests(
    model: torch.nn.Module,
    requests: Sequence[Request],
    *,
    max_length: int,
    batch_size: int,
    pad_id: int = 0,
) -> List[Tuple[float, bool]]:
    """``(sum log p(continuation | context), continuation is the greedy output)`` per request,
    in input order. Logits are upcast to fp32 before the softmax."""
    device = next(model.parameters()).device
    inputs = [model_inputs(ctx, cont, max_length) for ctx, cont in requests]
    # Longest first; ties keep input order (sorted is stable), which keeps results deterministic.
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    results: List[Tuple[float, bool]] = [(0.0, False)] * len(requests)
    for start in range(0, len(order), max(1, batch_size)):
        rows = order[start:start + batch_size]
        width = len(inputs[rows[0]])
        batch = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for r, i in enumerate(rows):
            batch[r, : len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
        logprobs = F.log_softmax(model(batch.to(device)).float(), dim=-1)  # [b, width, vocab]
        for r, i in enumerate(rows):
            cont = torch.tensor(list(requests[i][1]), dtype=torch.long, device=device)
            n_in = len(inputs[i])
            # Positions n_in - len(cont) .. n_in - 1 predict the continuation tokens.
            rows_lp = logprobs[r, n_in - len(cont): n_in]  # [len(cont), vocab]
            token_lp = rows_lp.gather(-1, cont[:, None]).squeeze(-1)
            greedy = bool((rows_lp.argmax(dim=-1) == cont).all())
            results[i] = (float(token_lp.sum()), greedy)
    return results
