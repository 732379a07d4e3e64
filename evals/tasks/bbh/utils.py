"""lm-eval hooks for the InstructEval BBH tasks (logic lives in evals.instructeval)."""

from evals.instructeval.answers import starts_with_answer
from evals.instructeval.data import load_bbh


def load(bbh_task, **options):
    return load_bbh(bbh_task, **options)


def process_results(doc, results):
    return {"exact_match": float(starts_with_answer(results[0], doc["target"]))}
