"""lm-eval hooks for the InstructEval HumanEval task (logic lives in evals.instructeval).

Two filters run in turn: ``clean`` keeps the code InstructEval keeps from each generation (even
indentation, leading newlines dropped, cut at the first blank line); ``execute`` runs every
completion of the task at once, in parallel sandboxed subprocesses. ``process_results`` only reads
the outcome.
"""

from evals.instructeval.answers import humaneval_completion
from evals.instructeval.code_exec import humaneval_program, pass_at_k, run_programs
from evals.instructeval.data import load_humaneval


def load(**options):
    return load_humaneval(**options)


def clean(resps, docs):
    """Per doc: its generations reduced to the code InstructEval would run."""
    return [[humaneval_completion(g) for g in generations] for generations in resps]


def execute(resps, docs):
    """Per doc: ``{"n": samples, "c": passed, "status": [...]}`` for its list of completions."""
    programs, owners = [], []
    for i, (completions, doc) in enumerate(zip(resps, docs)):
        for completion in completions:
            programs.append(humaneval_program(doc, completion))
            owners.append(i)
    outcomes = run_programs(programs)
    summary = [{"n": 0, "c": 0, "status": []} for _ in docs]
    for i, outcome in zip(owners, outcomes):
        summary[i]["n"] += 1
        summary[i]["c"] += int(outcome.passed)
        summary[i]["status"].append(outcome.status if outcome.passed else f"{outcome.status}: {outcome.detail}")
    return summary


def process_results(doc, results):
    outcome = results[0]
    return {"pass@1": pass_at_k(outcome["n"], outcome["c"], 1) if outcome["n"] else 0.0}
