"""lm-eval hooks for the GSM8K task (logic lives in evals.instructeval)."""

from evals.instructeval.answers import gsm8k_exact_match
from evals.instructeval.data import load_gsm8k


def load(**options):
    return load_gsm8k(**options)


def process_results(doc, results):
    return {"exact_match": float(gsm8k_exact_match(results[0], doc["target"]))}
