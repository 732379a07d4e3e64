"""Python entry point: evaluate a checkpoint (or a model in memory) on our lm-eval tasks.

    from evals.suite import evaluate
    results = evaluate(checkpoint_dir="out/epoch_0", tokenizer_path="tokenizer.model",
                       tasks=["instructeval"], limit=10, allow_code_execution=True,
                       output_dir="eval_results")
    print(results["markdown"])

The task manager indexes only ``evals/tasks`` (not lm-eval's ~10k bundled YAMLs, which take seconds to
scan), and the data options (``data_dir``, ``drop_path``, ...) go to the tasks as lm-eval metadata.
Task names and data options are checked before the model is built, so a typo fails in seconds, not
after loading a 7B checkpoint. Result files are written atomically.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from evals import TASKS_DIR
from evals.instructeval.paths import TASK_OPTION_KEYS
from lorasc_tune.io import atomic_write_text


def task_manager(data_options: Optional[Dict[str, Any]] = None, include_defaults: bool = False):
    """An lm-eval ``TaskManager`` over ``evals/tasks`` with the tasks' data options as metadata."""
    from lm_eval.tasks import TaskManager

    options = {k: str(v) for k, v in (data_options or {}).items() if v is not None}
    unknown = set(options) - set(TASK_OPTION_KEYS)
    if unknown:
        raise ValueError(f"unknown data options {sorted(unknown)}; known: {sorted(TASK_OPTION_KEYS)}")
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults, metadata=options)


def check_task_names(tasks: Sequence[str], manager: Any) -> List[str]:
    """``tasks`` as a list, or a ``ValueError`` naming each name ``manager`` does not know and listing
    the groups and tags it does (each group's own tasks, e.g. ``instructeval_mmlu_anatomy``, also work)."""
    if isinstance(tasks, str):  # a lone name would otherwise be read as a list of characters
        tasks = [tasks]
    names = list(tasks)
    if not names:
        raise ValueError("no tasks given")
    registered = set(manager.all_tasks)
    unknown = [t for t in names if t not in registered]
    if unknown:
        known = sorted(set(manager.all_groups) | set(manager.all_tags))
        raise ValueError(f"unknown task(s) {unknown}; groups and tags: {known} (or any of their tasks, "
                         f"e.g. instructeval_mmlu_anatomy)")
    return names


def evaluate(
    *,
    checkpoint_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    lm: Any = None,
    tasks: Sequence[str] = ("instructeval",),
    limit: Optional[float] = None,
    allow_code_execution: bool = False,
    output_dir: Optional[str | Path] = None,
    log_samples: bool = False,
    data_options: Optional[Dict[str, Any]] = None,
    gen_kwargs: Optional[str] = None,
    **model_kwargs: Any,
) -> Dict[str, Any]:
    """Run ``tasks`` and return lm-eval's results dict plus a ``"markdown"`` table.

    Args:
        checkpoint_dir / tokenizer_path / model_kwargs: build a :class:`evals.lm_adapter.LoraScLM`
            (``device``, ``dtype``, ``batch_size``, ...); or pass a ready ``lm``.
        allow_code_execution: lm-eval's ``confirm_run_unsafe_code``; HumanEval needs it.
        output_dir: when set, write ``results_<time>.json`` and the matching ``.md`` table there.
        data_options: ``data_dir`` and ``<dataset>_path`` overrides (see evals.instructeval.paths).
        gen_kwargs: lm-eval's generation override for every generative task, e.g. ``"max_gen_toks=64"``.
    """
    import lm_eval

    from evals.lm_adapter import LoraScLM
    from evals.report import markdown_table

    manager = task_manager(data_options)  # checks the data options
    tasks = check_task_names(tasks, manager)
    if lm is None:
        lm = LoraScLM(checkpoint_dir=checkpoint_dir, tokenizer_path=tokenizer_path, **model_kwargs)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit,
        confirm_run_unsafe_code=allow_code_execution, log_samples=log_samples, gen_kwargs=gen_kwargs,
    )
    if results is None:  # non-zero ranks
        return {}
    results["markdown"] = markdown_table(results)
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
        serialisable = {k: v for k, v in results.items() if k not in ("samples", "markdown")}
        atomic_write_text(out / f"results_{stamp}.json", json.dumps(serialisable, indent=2, default=str))
        atomic_write_text(out / f"results_{stamp}.md", results["markdown"])
        if log_samples and "samples" in results:
            atomic_write_text(out / f"samples_{stamp}.json", json.dumps(results["samples"], default=str))
    return results
