"""The ``mezo_<task>`` lm-eval tasks: they load offline, hold the builders' test split, and score.

A dummy LM that knows the gold answers (an oracle) must score 1 and one that picks wrong answers
0, which checks the request construction (context, continuations, gold indices) end to end without
a model.
"""

from pathlib import Path

import pytest

from lorasc_tune.data import mezo_dataset
from lorasc_tune.data.mezo import load_split
from lorasc_tune.data.templates import render

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from shared_paths import VALIDATION_FILES  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TASK_DIR = REPO / "evals" / "tasks" / "mezo"
FIXTURES = Path(__file__).parent / "fixtures"

FIXTURE_TASKS = ("record", "drop")
LIMIT = 6


class OracleLM(LM):
    """Scores the gold continuation highest and generates the gold answer (or the opposite).

    ``answers`` maps a prompt to ``(gold continuations, generation answer)``; the prompt is found as
    the suffix of the request context (few-shot contexts put exemplars before it).
    """

    def __init__(self, answers, wrong=False):
        super().__init__()
        self.answers, self.wrong = answers, wrong
        self.contexts = []

    def _lookup(self, context):
        self.contexts.append(context)
        for prompt, value in self.answers.items():
            if context.endswith(prompt):
                return value
        raise AssertionError(f"unexpected context: {context[-200:]!r}")

    def loglikelihood(self, requests):
        out = []
        for req in requests:
            context, continuation = req.args
            golds, _ = self._lookup(context)
            good = (continuation in golds) != self.wrong
            out.append((0.0 if good else -10.0, good))
        return out

    def generate_until(self, requests):
        answers = [self._lookup(r.args[0])[1] for r in requests]
        return ["nothing" if self.wrong else f" {a}" for a in answers]

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def _oracle_answers(task, rows):
    """prompt -> (gold continuations, first answer). ReCoRD queries on one passage share a prompt,
    so their gold continuations (which contain the query) are pooled."""
    answers = {}
    for row in rows:
        ex = render(task, row)
        if ex.choices is None:
            answers[ex.prompt] = ((), ex.answers[0])
        else:
            gold = ex.gold if isinstance(ex.gold, list) else [ex.gold]
            pooled = answers.get(ex.prompt, ((), None))[0]
            answers[ex.prompt] = (pooled + tuple(ex.choices[g] for g in gold), None)
    return answers


@pytest.fixture(scope="module")
def manager():
    return TaskManager(include_path=str(TASK_DIR), include_defaults=False)


def _data_dir(task, shared_data):
    if task in FIXTURE_TASKS:
        return str(FIXTURES)
    shared_data(*VALIDATION_FILES[task])
    return str(shared_data())


def test_all_tasks_indexed(manager):
    names = {f"mezo_{t}" for t in (*VALIDATION_FILES, *FIXTURE_TASKS)}
    assert names <= set(manager.all_tasks)
    assert "mezo" in manager.all_tags


@pytest.mark.parametrize("task", sorted((*VALIDATION_FILES, *FIXTURE_TASKS)))
def test_docs_are_the_builder_test_split_and_oracle_scores(task, shared_data, monkeypatch):
    data_dir = _data_dir(task, shared_data)
    monkeypatch.setenv("LORASC_MEZO_DATA_DIR", data_dir)
    monkeypatch.setenv("LORASC_MEZO_SEED", "2")
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    lm_task = manager.load([f"mezo_{task}"])["tasks"][f"mezo_{task}"]
    docs = list(lm_task.test_docs())
    rows = load_split(task, "test", seed=2, data_dir=data_dir)
    assert [d["prompt"] for d in docs] == [render(task, r).prompt for r in rows]

    answers = _oracle_answers(task, rows[:LIMIT])
    from lm_eval.evaluator import evaluate

    for wrong, expected in ((False, 1.0), (True, 0.0)):
        lm = OracleLM(answers, wrong=wrong)
        task_dict = manager.load([f"mezo_{task}"])["tasks"]
        results = evaluate(lm=lm, task_dict=task_dict, limit=LIMIT)["results"][f"mezo_{task}"]
        metric = {"squad": "f1,none", "drop": "f1,none", "gsm8k": "exact_match,none"}.get(task, "acc,none")
        assert results[metric] == pytest.approx(expected), (wrong, results)
    if task == "gsm8k":  # 8-shot: eight "Question: ...\nAnswer: <n>" exemplars before the question
        assert lm.contexts[0].count("Question: ") == 9 and lm.contexts[0].count("\n\n") == 8
    elif task in ("sst2", "rte"):  # zero-shot: the context is exactly the builder's prompt
        assert lm.contexts[0] == render(task, rows[0]).prompt


def test_metadata_seed_overrides_env(shared_data, monkeypatch):
    shared_data("superglue", "CB", "val.jsonl")
    monkeypatch.setenv("LORASC_MEZO_DATA_DIR", str(shared_data()))
    monkeypatch.setenv("LORASC_MEZO_SEED", "0")
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata={"seed": 5})
    docs = list(manager.load(["mezo_cb"])["tasks"]["mezo_cb"].test_docs())
    expected = mezo_dataset(None, "cb", split="test", seed=5, data_dir=shared_data())
    assert [d["prompt"] for d in docs] == [e.prompt for e in expected.examples]
