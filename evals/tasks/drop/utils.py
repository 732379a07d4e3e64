"""lm-eval hooks for the InstructEval DROP task (logic lives in evals.instructeval)."""

from evals.instructeval.answers import drop_em_f1, drop_prediction
from evals.instructeval.data import load_drop


def load(**options):
    return load_drop(**options)


def process_results(doc, results):
    em, f1 = drop_em_f1(drop_prediction(results[0]), doc["answers"])
    return {"em": em, "f1": f1}
