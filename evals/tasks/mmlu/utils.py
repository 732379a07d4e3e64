"""lm-eval hooks for the InstructEval MMLU tasks (logic lives in evals.instructeval)."""

from evals.instructeval.answers import starts_with_answer
from evals.instructeval.data import load_mmlu


def load(subject, **options):
    return load_mmlu(subject, **options)


def process_results(doc, results):
    return {"acc": float(starts_with_answer(results[0], doc["label"]))}
