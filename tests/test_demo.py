"""The demo (`python -m lorasc_tune.demo`): its task, its held-out scorer, and a reduced run
whose after-training score beats the base's, checked again with transformers' own generate."""

from __future__ import annotations

import json

import pytest
import torch

from lorasc_tune import demo
from lorasc_tune.demo import (BASE_TASK, DEMO_TASK, exact_match, prompt_ids, row_words,
                              score_heldout, task_rows)


@pytest.fixture
def one_thread():
    """The demo's own setting (`--threads 1`): a tiny model on a busy 2-core machine is many
    times slower with two threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_exact_match_ignores_only_surrounding_and_repeated_whitespace():
    assert exact_match(" quick ", "quick")
    assert exact_match("light  quick\n", "light quick")
    assert not exact_match("quick.", "quick")
    assert not exact_match("Quick", "quick")
    assert not exact_match("", "quick")
    assert not exact_match("quick table", "quick")


def test_task_rows_answer_the_second_to_last_word_and_held_out_lists_are_unseen(tmp_path):
    rows = task_rows(300, seed=5)
    for row in rows:
        words = row_words(row)
        assert row["input"] == f"{DEMO_TASK}: {' '.join(words)}."
        assert 3 <= len(words) <= 6 and len(set(words)) == len(words)
        assert row["output"] == words[-2]
    assert [r["output"] for r in task_rows(5, 5, task=BASE_TASK)] == \
        [row_words(r)[-1] for r in task_rows(5, 5)]

    heldout = demo.demo_heldout_rows(str(tmp_path), 50)
    train = json.loads(demo.write_demo_task_data(str(tmp_path), 256).read_text())
    assert len(train) == 256 and len(heldout) == 50
    seen = {tuple(row_words(r)) for r in train}
    assert not seen & {tuple(row_words(r)) for r in heldout}
    # The held-out rows do not depend on the training set's size.
    assert demo.demo_heldout_rows(str(tmp_path / "other"), 50) == heldout


def test_prompts_are_the_training_sequence_up_to_the_answer(tmp_path):
    tokenizer = demo.demo_tokenizer(str(tmp_path))
    data = demo.demo_task_dataset(tokenizer, cache_dir=str(tmp_path), num_examples=8)
    rows = json.loads(demo.write_demo_task_data(str(tmp_path), 8).read_text())
    for i, row in enumerate(rows):
        sample = data[i]
        first_label = next(j for j, label in enumerate(sample["labels"]) if label >= 0)
        assert prompt_ids(tokenizer, row) == list(sample["tokens"][:first_label])
        answer = [int(t) for t in sample["tokens"][first_label:]]
        assert answer[-1] == tokenizer.eos_id
        assert tokenizer.decode(answer[:-1]) == row["output"]


class _ScriptedModel(torch.nn.Module):
    """A stand-in decoder that, after each known prompt, writes a scripted answer then EOS:
    greedy decoding of it yields exactly the script."""

    def __init__(self, scripts, vocab_size, eos_id, pad_id):
        super().__init__()
        self.scripts = {tuple(p): list(a) + [eos_id] for p, a in scripts}
        self.vocab_size, self.pad_id, self.max_seq_len = vocab_size, pad_id, 256
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens, mask=None, input_pos=None):
        logits = torch.zeros(*tokens.shape, self.vocab_size)
        for b, row in enumerate(tokens.tolist()):
            start = next(i for i, t in enumerate(row) if t != self.pad_id)  # left padding
            seq = tuple(row[start:])
            prompt = next(p for p in self.scripts if seq[:len(p)] == p)
            script = self.scripts[prompt]  # a finished row goes on decoding (pads): EOS again
            logits[b, -1, script[min(len(seq) - len(prompt), len(script) - 1)]] = 1.0
        return logits


def test_the_scorer_counts_exactly_the_answers_that_match(tmp_path):
    tokenizer = demo.demo_tokenizer(str(tmp_path))
    rows = demo.demo_heldout_rows(str(tmp_path), 12)
    encode = lambda text: tokenizer.encode(text, add_bos=False, add_eos=False)
    # Right on even rows; on odd rows the base task's answer, or the right word plus one.
    answers = [row["output"] if i % 2 == 0 else
               (row_words(row)[-1] if i % 4 == 1 else f"{row['output']} table")
               for i, row in enumerate(rows)]
    model = _ScriptedModel([(prompt_ids(tokenizer, r), encode(a)) for r, a in zip(rows, answers)],
                           vocab_size=512, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    score = score_heldout(model, tokenizer, rows, use_cache=False)
    assert (score.correct, score.total) == (6, 12)
    assert [p.strip() for p in score.predictions] == answers
    assert str(score) == "6/12 (50%)"

    silent = _ScriptedModel([(prompt_ids(tokenizer, r), []) for r in rows], 512,
                            tokenizer.eos_id, tokenizer.pad_id)
    score = score_heldout(silent, tokenizer, rows, use_cache=False)
    assert score.correct == 0 and score.predictions == [""] * 12


def test_a_reduced_demo_learns_the_task_and_transformers_agrees(tmp_path, one_thread):
    """256 rows, 2 experts: the merged model answers more held-out rows than the base did.
    The counts are then recomputed without our scorer: transformers' own greedy `generate` on
    the exported folders, judged against the second-to-last word read off each prompt."""
    transformers = pytest.importorskip("transformers")

    lines = []
    cfg = demo.demo_config([f"output_dir={tmp_path / 'out'}", f"demo_cache={tmp_path / 'cache'}",
                            "epochs=2", "dataset.num_examples=256"])
    result = demo.run_demo(cfg, heldout=50, log=lines.append)
    assert list(result.epochs) == ["epoch_0", "epoch_1"]
    assert result.before.correct <= 2  # the base answers the last word, never this task's
    assert result.after.correct > result.before.correct
    assert lines[-1] == (f"LoRASC demo: held-out exact match before {result.before} -> "
                         f"after {result.after}")

    def hf_count(folder):
        tok = transformers.AutoTokenizer.from_pretrained(str(folder))
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder),
                                                                  dtype=torch.float32).eval()
        correct, predictions = 0, []
        for row in result.rows:
            ids = tok(row["input"], return_tensors="pt")["input_ids"]
            assert ids[0].tolist() == prompt_ids(demo.demo_tokenizer(str(tmp_path / "cache")),
                                                 row)
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=8, eos_token_id=2, pad_token_id=0)
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
            predictions.append(text)
            correct += text == row_words(row)[-2]
        return correct, predictions

    base_correct, base_predictions = hf_count(result.base_dir)
    final_correct, final_predictions = hf_count(result.output_dir / "epoch_1")
    assert final_correct > base_correct
    assert (base_correct, final_correct) == (result.before.correct, result.after.correct)
    assert base_predictions == [p.strip() for p in result.before.predictions]
    assert final_predictions == [p.strip() for p in result.after.predictions]
