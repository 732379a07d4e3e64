"""Exact, batched log-likelihood of token continuations under a causal decoder.

Each request is ``(context_ids, continuation_ids)``. The model reads ``context + continuation`` minus
its last token (the last token is only ever a target), keeping at most ``max_length`` input tokens by
dropping from the left, exactly as lm-eval's HF adapter does. The continuation's log-probability is the
sum over its tokens of ``log_softmax(logits)`` at the positions that predict them::

    ids     c0 c1 c2 | t0 t1 t2
    input   c0 c1 c2   t0 t1        (last id dropped)
    predict    c1 c2   t0 t1 t2     -> score the last len(cont) = 3 positions

Two things make this cheaper than running every request through the whole model (lm-eval's stock
``hf`` model shares only identical inputs, i.e. one-token choices after the same context, and
projects every position):

* **Shared inputs are run once.** A request whose model input is a prefix of another request's
  input (for instance the same context with a one-token choice, or an identical request) is scored
  from the longer row: a causal model's outputs at the first ``k`` positions depend on those ``k``
  tokens only.
* **Only continuation positions are projected to the vocabulary.** The decoder runs up to its final
  norm; the output projection and the log-softmax are applied to the positions that predict
  continuation tokens, not to every context position.

The remaining rows are sorted longest first, so a batch pads little and its first row sets its
width; rows are right-padded, which cannot change a causal model's outputs at the real positions.
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


def shared_rows(inputs: Sequence[Sequence[int]]) -> List[int]:
    """For each input, the index of the input it is scored from: one that starts with it and that
    no other input extends (itself when nothing extends it). Only those maximal inputs, one copy of
    each, are run, which is the fewest rows that cover every request.

    Sorted lexicographically, an input that is a prefix of any other is a prefix of the one right
    after it (everything sorted between a prefix and its extension starts with that prefix), and an
    input that is not a prefix of its successor is maximal; so one backward pass over the sorted
    order hands each input the host of its successor, or itself.
    """
    keys = [tuple(x) for x in inputs]
    # Ties (equal inputs) keep input order, so the first of them ends up hosting.
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    host = list(range(len(keys)))
    for pos in range(len(order) - 2, -1, -1):
        i, nxt = order[pos], order[pos + 1]
        if keys[nxt][: len(keys[i])] == keys[i]:
            host[i] = host[nxt]
    return host


def _is_torchtune_decoder(model: torch.nn.Module) -> bool:
    from torchtune.modules import TransformerDecoder

    return (isinstance(model, TransformerDecoder) and not model.output_hidden_states
            and getattr(model, "num_output_chunks", 0) == 0)


def _final_hidden(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``TransformerDecoder.forward`` up to and including the final norm (causal, no cache)."""
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = layer(h)
    return model.norm(h)


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
    in input order. Logits are upcast to fp32 before the softmax.

    ``model`` is a torchtune ``TransformerDecoder`` (only the needed positions are projected to the
    vocabulary) or any module mapping ``tokens[b, s]`` to ``logits[b, s, vocab]``."""
    device = next(model.parameters()).device
    inputs = [model_inputs(ctx, cont, max_length) for ctx, cont in requests]
    host = shared_rows(inputs)
    guests: dict = {}
    for i, h in enumerate(host):
        guests.setdefault(h, []).append(i)
    # Longest first; ties keep input order (sorted is stable), which keeps results deterministic.
    rows_to_run = sorted(guests, key=lambda i: -len(inputs[i]))
    hidden_path = _is_torchtune_decoder(model)
    results: List[Tuple[float, bool]] = [(0.0, False)] * len(requests)
    step = max(1, batch_size)
    for start in range(0, len(rows_to_run), step):
        rows = rows_to_run[start:start + step]
        width = len(inputs[rows[0]])
        batch = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for r, i in enumerate(rows):
            batch[r, : len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
        batch = batch.to(device)
        # Every request scored from this batch, and the (row, position) pairs predicting its tokens:
        # positions len(input) - len(cont) .. len(input) - 1 of its host row.
        scored, row_idx, pos_idx, targets = [], [], [], []
        for r, h in enumerate(rows):
            for i in guests[h]:
                cont = list(requests[i][1])
                n_in = len(inputs[i])
                scored.append((i, len(cont)))
                row_idx += [r] * len(cont)
                pos_idx += range(n_in - len(cont), n_in)
                targets += cont
        row_t = torch.tensor(row_idx, device=device)
        pos_t = torch.tensor(pos_idx, device=device)
        if hidden_path:
            hidden = _final_hidden(model, batch)[row_t, pos_t]  # [n, d]
            logits = model.output(hidden)
        else:
            logits = model(batch)[row_t, pos_t]
        logprobs = F.log_softmax(logits.float(), dim=-1)  # [n, vocab]
        target_t = torch.tensor(targets, device=device)
        token_lp = logprobs.gather(-1, target_t[:, None]).squeeze(-1)
        hits = logprobs.argmax(dim=-1) == target_t
        offset = 0
        for i, n in scored:
            results[i] = (float(token_lp[offset:offset + n].sum()), bool(hits[offset:offset + n].all()))
            offset += n
    return results
