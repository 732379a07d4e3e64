"""lm-eval hooks for the GSM8K tasks (logic lives in evals.openinstruct and evals.instructeval)."""

from evals.instructeval.answers import gsm8k_exact_match
from evals.instructeval.data import load_gsm8k
from evals.openinstruct import gsm8k as openinstruct


def load(**options):
    return load_gsm8k(**options)


def process_results(doc, results):
    return {"exact_match": float(gsm8k_exact_match(results[0], doc["target"]))}


def load_openinstruct(**options):
    return openinstruct.load(**options)


def process_results_openinstruct(doc, results):
    return {"exact_match": float(openinstruct.exact_match(results[0], doc["target"]))}
