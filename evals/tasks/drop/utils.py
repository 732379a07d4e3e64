"""lm-eval hooks for the InstructEval DROP task (logic lives in evals.instructeval)."""

from evals.instructeval.answers import drop_em_f1, drop_prediction, starts_with_answer
from evals.instructeval.data import load_drop


def load(**options):
    return load_drop(**options)


def process_results(doc, results):
    """``score``: InstructEval's metric (the stripped generation starts with the gold string);
    ``em`` / ``f1``: DROP's metrics on the generation's first line, as extra information."""
    generation = results[0]
    em, f1 = drop_em_f1(drop_prediction(generation), [[doc["label"]]])
    return {"score": float(starts_with_answer(generation, doc["label"])), "em": em, "f1": f1}
