"""Greedy generation: the KV-cache path equals the cache-free path and plain per-prompt decoding."""

from __future__ import annotations

import pytest
import torch

from evals.decoding import greedy_generate

from evals_helpers import peaked_llama


def reference_greedy(model, prompt, n):
    """One prompt, no padding, no cache, no mask: append the argmax n times."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def model():
    return peaked_llama(vocab_size=257, max_seq_len=64, seed=1)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(3, 257, (n,), generator=g).tolist() for n in (7, 1, 15, 4)]


def test_cache_equals_no_cache_equals_reference(model, prompts):
    cached = greedy_generate(model, prompts, max_new_tokens=10, pad_id=0, use_cache=True)
    uncached = greedy_generate(model, prompts, max_new_tokens=10, pad_id=0, use_cache=False)
    assert cached == uncached
    assert cached == [reference_greedy(model, p, 10) for p in prompts]
    assert not model.caches_are_setup()  # the per-batch cache is torn down again


def test_stop_tokens_stop_fn_and_budget(model, prompts):
    full = greedy_generate(model, prompts, max_new_tokens=10, pad_id=0)
    assert all(len(out) == 10 for out in full)
    # stop id: row 0's 4th token ends row 0 (dropped from its output); other rows stop on it too
    # if they produce it, and never run past the budget
    stop = full[0][3]
    stopped = greedy_generate(model, prompts, max_new_tokens=10, pad_id=0, stop_ids=[stop])
    for out, ref in zip(stopped, full):
        cut = ref.index(stop) if stop in ref else len(ref)
        assert out == ref[:cut]
    # stop_fn: keep the token that triggered it
    seen = greedy_generate(model, prompts, max_new_tokens=10, pad_id=0,
                           stop_fn=lambda row, gen: row == 2 and len(gen) == 3)
    assert seen[2] == full[2][:3] and seen[0] == full[0]
    assert greedy_generate(model, prompts, max_new_tokens=0, pad_id=0) == [[], [], [], []]
    with pytest.raises(ValueError, match="max_seq_len"):
        greedy_generate(model, prompts, max_new_tokens=60, pad_id=0)


def test_adapter_generate_until(tmp_path):
    """lm-eval requests: order kept, `until` cuts the text, max_gen_toks caps the tokens, and the
    decoded continuation keeps its leading whitespace."""
    from lm_eval.api.instance import Instance

    from evals.lm_adapter import LoraScLM
    from lorasc_tune.demo import demo_tokenizer

    tok = demo_tokenizer(str(tmp_path))
    model = peaked_llama(vocab_size=512, max_seq_len=128, seed=4)
    lm = LoraScLM(model=model, tokenizer=tok, batch_size=2)
    contexts = ["Add the two numbers. 3 and 4", "Reverse the order of the words.", "Sort", "How many"]
    free = lm.generate_until([Instance("generate_until", {}, (c, {"until": [], "max_gen_toks": 12}), i)
                              for i, c in enumerate(contexts)])
    for context, text in zip(contexts, free):
        ids = lm.tok_encode(context)
        want = reference_greedy(model, ids, 12)
        if tok.eos_id in want:
            want = want[: want.index(tok.eos_id)]
        assert text == lm.decode_continuation(ids, want)
        assert len(tok.encode(text, add_bos=False, add_eos=False)) <= 13
    # a stop string taken from the free-running text cuts it there (and is not included)
    row = max(range(len(free)), key=lambda i: len(free[i]))
    stop = free[row][len(free[row]) // 2:][:2]
    cut = lm.generate_until([Instance("generate_until", {}, (contexts[row], {"until": [stop], "max_gen_toks": 12}), 0)])
    assert cut == [free[row][: free[row].index(stop)]]
    # a budget the window cannot hold (HumanEval's 512 on a 128-token model) is capped at half of it
    lm_short = LoraScLM(model=model, tokenizer=tok, max_seq_len=32)
    capped = lm_short.generate_until([Instance("generate_until", {}, (contexts[0], {"until": [], "max_gen_toks": 512}), 0)])
    assert len(tok.encode(capped[0], add_bos=False, add_eos=False)) <= 16 + 1


def test_decode_continuation_keeps_leading_space(shared_data):
    from evals.lm_adapter import LoraScLM
    from evals.model_loading import load_tokenizer

    tok = load_tokenizer(shared_data("llama2_tokenizer", "tokenizer.model"))
    lm = LoraScLM(model=peaked_llama(vocab_size=32000, max_seq_len=16), tokenizer=tok)
    ids = tok.encode('def f():\n    """doc"""\n    return 1', add_bos=True, add_eos=False)
    prompt_ids = tok.encode('def f():\n    """doc"""\n', add_bos=True, add_eos=False)
    assert ids[: len(prompt_ids)] == prompt_ids
    assert lm.decode_continuation(prompt_ids, ids[len(prompt_ids):]) == "    return 1"
    assert tok.decode(ids[len(prompt_ids):]) != "    return 1"  # why the anchor is needed
