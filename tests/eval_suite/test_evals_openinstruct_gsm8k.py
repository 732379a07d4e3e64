"""``openinstruct_gsm8k``: open-instruct's 8-shot direct GSM8K (the paper's Table 2 protocol).

The expected prompts are rebuilt here from a transcription of the published exemplars
(fixtures/openinstruct_gsm8k/examplars.json), not from the module under test; the metric is checked
against lm-eval's port of Hugging Face ``evaluate``'s ``exact_match``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from evals.openinstruct import gsm8k as G

FIXTURE = Path(__file__).parent / "fixtures" / "openinstruct_gsm8k" / "examplars.json"


def _published_exemplars():
    return json.loads(FIXTURE.read_text())["examplars"]


def _reference_prompt(question: str) -> str:
    """run_eval.py with --n_shot 8 --no_cot, written out step by step."""
    demos = ["Quesion: " + e["question"] + "\n" + "Answer: " + e["short_answer"] for e in _published_exemplars()]
    prefix = "Answer the following questions.\n\n" + "\n\n".join(demos) + "\n\n"
    return prefix + "Question: " + question.strip() + "\nAnswer:"


def _reference_prediction(output: str) -> str:
    output = re.sub(r"(\d),(\d)", r"\1\2", output)
    numbers = re.findall(r"[-+]?\d*\.\d+|\d+", output)
    return numbers[-1] if numbers else output


def _reference_em(prediction: str, gold: str) -> bool:
    from lm_eval.api.metrics import exact_match_hf_evaluate

    return bool(exact_match_hf_evaluate([prediction], [gold], ignore_case=True,
                                        ignore_punctuation=True)["exact_match"])


def test_exemplars_are_the_published_ones():
    assert [(e["question"], e["short_answer"]) for e in _published_exemplars()] == list(G.EXEMPLARS)


def test_task_prompts_and_targets_first_20_rows(shared_data, offline_env):
    from evals.suite import task_manager

    test_file = shared_data("gsm8k", "test.jsonl")
    rows = [json.loads(line) for line in test_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    task = task_manager().load(["openinstruct_gsm8k"])["tasks"]["openinstruct_gsm8k"]
    docs = list(task.test_docs())
    assert len(docs) == len(rows) == 1319  # every test row, in file order
    for row, doc in zip(rows[:20], docs[:20]):
        assert task.doc_to_text(doc) == _reference_prompt(row["question"])
        assert doc["target"] == re.sub(r"(\d),(\d)", r"\1\2", row["answer"].split("####")[1].strip())
    # Greedy, 512 new tokens, stop at the first newline; the shots are in the prompt.
    gen = task.config.generation_kwargs
    assert gen["until"] == ["\n"] and gen["max_gen_toks"] == 512 and gen["do_sample"] is False
    assert task.config.num_fewshot == 0 and task.config.metadata["shots"] == 8
    # A gold answer written with a digit comma loses it (the release has a few, e.g. "1,600").
    with_comma = [r for r in rows if "," in r["answer"].split("####")[1]]
    assert with_comma, "expected at least one comma-grouped gold answer in the test split"
    by_question = {d["question"]: d["target"] for d in docs}
    assert all("," not in by_question[r["question"]] for r in with_comma)


@pytest.mark.parametrize("output", [
    " 1,234",                      # digit commas go
    " -3.5",                       # a signed decimal is one number
    " $12.",                       # currency and a full stop around an integer
    " I do not know",              # no number: the whole output is the prediction
    " 18 eggs, then 2 more: 20",   # the last number wins
    " 1,2,3",                      # one left-to-right pass: "12,3" -> last number 3
    " +7",
    " .5 of them",
    "",
])
@pytest.mark.parametrize("gold", ["1234", "-3.5", "35", "12", "3", "20", "7", "5"])
def test_prediction_and_exact_match_follow_open_instruct(output, gold):
    prediction = G.extract_prediction(output)
    assert prediction == _reference_prediction(output)
    assert G.exact_match(output, gold) == _reference_em(_reference_prediction(output), gold)


def test_awkward_outputs_spelled_out():
    # What the protocol means for the awkward cases, stated directly.
    assert G.extract_prediction("It is 1,234 apples") == "1234" and G.exact_match("It is 1,234", "1234")
    assert G.extract_prediction("-3.5") == "-3.5"
    assert G.exact_match("-3.5", "-3.5") and G.exact_match("-3.5", "35")  # punctuation is ignored
    assert G.extract_prediction("$12.") == "12" and G.exact_match("$12.", "12")
    assert G.extract_prediction(" none") == " none" and not G.exact_match(" none", "0")
    assert G.gold_answer("so 1,000 + 600\n#### 1,600") == "1600"
    with pytest.raises(ValueError, match="####"):
        G.gold_answer("no final answer")


def test_group_uses_openinstruct_gsm8k(shared_data, offline_env):
    from evals.suite import task_manager

    shared_data("mmlu")
    loaded = task_manager().load(["instructeval_nocode"])
    assert "openinstruct_gsm8k" in loaded["tasks"] and "instructeval_gsm8k" not in loaded["tasks"]


def test_runs_through_the_adapter(shared_data, offline_env, tmp_path):
    """One row end to end: the generation is cut at the newline and scored by the protocol."""
    import lm_eval

    from evals.lm_adapter import LoraScLM
    from evals.suite import task_manager
    from evals_helpers import peaked_llama
    from lorasc_tune.demo import demo_tokenizer

    shared_data("gsm8k", "test.jsonl")
    lm = LoraScLM(model=peaked_llama(vocab_size=512, max_seq_len=1024), tokenizer=demo_tokenizer(str(tmp_path)))
    out = lm_eval.simple_evaluate(model=lm, tasks=["openinstruct_gsm8k"], task_manager=task_manager(),
                                  limit=2, log_samples=True, gen_kwargs="max_gen_toks=8")
    samples = out["samples"]["openinstruct_gsm8k"]
    assert len(samples) == 2
    for sample in samples:
        generation = sample["resps"][0][0]
        assert "\n" not in generation
        assert sample["exact_match"] == float(_reference_em(_reference_prediction(generation),
                                                            sample["doc"]["target"]))
