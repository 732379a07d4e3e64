"""Log-likelihood: batched, length-sorted scores equal a direct per-request forward pass."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from evals.scoring import model_inputs, score_requests

from evals_helpers import peaked_llama


def direct_score(model, context, continuation, max_length):
    """Reference: one request alone, no padding. Keep the last ``max_length`` tokens before the final
    one, run them, and add up log p(token) at the position that predicts each continuation token."""
    whole = list(context) + list(continuation)
    window_start = max(0, len(whole) - 1 - max_length)
    window = whole[window_start:len(whole) - 1]
    logprobs = F.log_softmax(model(torch.tensor([window])).float()[0], dim=-1)
    total, greedy = 0.0, True
    for j, tok in enumerate(continuation):
        absolute = len(context) + j  # index of this token in `whole`
        row = logprobs[absolute - 1 - window_start]
        total += float(row[tok])
        greedy &= int(row.argmax()) == tok
    return total, greedy


@pytest.fixture(scope="module")
def model():
    return peaked_llama(vocab_size=257, max_seq_len=32)


def _requests():
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, 257, (n,), generator=g).tolist()  # noqa: E731
    return [
        (ids(5), ids(1)), (ids(12), ids(3)), (ids(2), ids(7)), (ids(20), ids(2)),
        (ids(9), ids(9)),
        (ids(40), ids(4)),   # 44 > max_length + 1: truncated on the left
        (ids(31), ids(2)),   # exactly max_length + 1 ids: nothing dropped but the last
        (ids(1), ids(1)),
    ]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_scores_equal_direct_forward(model, batch_size):
    requests = _requests()
    got = score_requests(model, requests, max_length=32, batch_size=batch_size)
    for (ctx, cont), (logprob, greedy) in zip(requests, got):
        want, want_greedy = direct_score(model, ctx, cont, max_length=32)
        assert logprob == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy


def test_greedy_flag_and_truncated_inputs(model):
    ctx = list(range(3, 13))
    logits = model(torch.tensor([ctx]))[0, -1]
    best = int(logits.argmax())
    worst = int(logits.argmin())
    (lp_best, g_best), (lp_worst, g_worst) = score_requests(model, [(ctx, [best]), (ctx, [worst])],
                                                            max_length=32, batch_size=2)
    assert g_best and not g_worst and lp_best > lp_worst
    assert lp_best == pytest.approx(float(F.log_softmax(logits, -1)[best]), abs=1e-5)
    # Left truncation keeps the newest max_length ids and drops the final target id.
    assert model_inputs(list(range(50)), [50, 51], max_length=32) == list(range(19, 51))
    with pytest.raises(ValueError):
        model_inputs([], [1], max_length=8)


def test_adapter_loglikelihood_matches_forward(model_and_tokenizer):
    """Through lm-eval's API: HF-style context/continuation split, BOS prefix, batching."""
    from lm_eval.api.instance import Instance

    from evals.lm_adapter import LoraScLM

    model, tok = model_and_tokenizer
    lm = LoraScLM(model=model, tokenizer=tok, batch_size=2)
    pairs = [("Question: 2 + 2 =", " 4"), ("The answer is ", "four"), ("", "Hello world"),
             ("A long context " * 200, " end")]  # the last one exceeds max_length: left-truncated
    requests = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(requests)
    for (ctx, cont), (logprob, greedy) in zip(pairs, got):
        if ctx:
            # the trailing space of the context belongs to the continuation, as in HF's adapter
            stripped = ctx.rstrip()
            moved = ctx[len(stripped):]
            whole = tok.encode(stripped + moved + cont, add_bos=True, add_eos=False)
            ctx_ids = tok.encode(stripped, add_bos=True, add_eos=False)
            cont_ids = whole[len(ctx_ids):]
        else:
            ctx_ids, cont_ids = [tok.bos_id], tok.encode(cont, add_bos=False, add_eos=False)
        want, want_greedy = direct_score(model, ctx_ids, cont_ids, lm.max_length)
        assert math.isfinite(logprob) and logprob == pytest.approx(want, abs=1e-3)
        assert greedy == want_greedy


def test_adapter_loglikelihood_rolling(model_and_tokenizer):
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from evals.lm_adapter import LoraScLM

    model, tok = model_and_tokenizer
    lm = LoraScLM(model=model, tokenizer=tok, batch_size=3)
    texts = ["short text here", "a much longer text that spans windows " * 60]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    for text, total in zip(texts, got):
        ids = tok.encode(text, add_bos=False, add_eos=False)
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
            ids, prefix_token=tok.bos_id, max_seq_len=lm.max_length, context_len=1)]
        # every token is scored exactly once
        assert sum(len(c) for _, c in windows) == len(ids)
        want = sum(direct_score(model, c, t, lm.max_length)[0] for c, t in windows)
        assert total == pytest.approx(want, rel=1e-5, abs=1e-3)
    short = tok.encode(texts[0], add_bos=False, add_eos=False)
    assert got[0] == pytest.approx(direct_score(model, [tok.bos_id], short, lm.max_length)[0], abs=1e-3)


@pytest.fixture(scope="module")
def _demo_tokenizer(tmp_path_factory):
    from lorasc_tune.demo import demo_tokenizer

    return demo_tokenizer(str(tmp_path_factory.mktemp("demo_assets")))


@pytest.fixture
def model_and_tokenizer(_demo_tokenizer):
    """A peaked tiny model over the locally built 512-piece demo tokenizer (no shared data needed);
    64 positions, so long requests exercise truncation."""
    return peaked_llama(vocab_size=512, max_seq_len=64, seed=3), _demo_tokenizer


def test_shared_rows_run_each_maximal_input_once():
    """Every input is scored from an input that starts with it, and only the maximal inputs (those
    no other input extends), one copy each, are run: the fewest rows that cover every request."""
    from evals.scoring import shared_rows

    g = torch.Generator().manual_seed(5)
    base = torch.randint(0, 4, (12,), generator=g).tolist()
    inputs = [base[: int(n)] for n in torch.randint(1, 13, (30,), generator=g)]
    inputs += [torch.randint(0, 4, (int(n),), generator=g).tolist() for n in torch.randint(1, 6, (20,), generator=g)]
    hosts = shared_rows(inputs)

    def extends(y, x):
        return len(y) > len(x) and tuple(y[: len(x)]) == tuple(x)

    maximal = {tuple(x) for x in inputs if not any(extends(y, x) for y in inputs)}
    for i, h in enumerate(hosts):
        assert tuple(inputs[h][: len(inputs[i])]) == tuple(inputs[i])
        assert tuple(inputs[h]) in maximal and hosts[h] == h
    assert len(set(hosts)) == len(maximal)


class _CountingModel(torch.nn.Module):
    """Wraps a decoder as a plain module (the generic logits path) and counts rows run."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, tokens):
        self.rows += tokens.shape[0]
        return self.inner(tokens)


def test_shared_inputs_run_once_and_score_exactly(model):
    """Multiple choice: one context, one-token and two-token choices, and a repeated request."""
    ctx = list(range(3, 20))
    requests = [(ctx, [40]), (ctx, [41]), (ctx, [42, 43]), (ctx, [40]), (ctx + [42], [43]), ([5, 6], [7])]
    counting = _CountingModel(model)
    for scorer in (model, counting):  # torchtune hidden-state path, then the generic logits path
        got = score_requests(scorer, requests, max_length=32, batch_size=2)
        for (c, k), (logprob, greedy) in zip(requests, got):
            want, want_greedy = direct_score(model, c, k, max_length=32)
            assert logprob == pytest.approx(want, abs=1e-4) and greedy == want_greedy
    # Every request but the last is a prefix of ctx + [42]: two rows run, not six.
    assert counting.rows == 2
