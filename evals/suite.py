"""Python entry point: evaluate a checkpoint (or a model in memory) on our lm-eval tasks.

    from evals.suite import evaluate
    results = evaluate(checkpoint_dir="out/epoch_0", tokenizer_path="tokenizer.model",
                       tasks=["instructeval"], limit=10, allow_code_execution=True,
                       output_dir="eval_results")
    print(results["markdown"])

The task manager indexes only ``evals/tasks`` (not lm-eval's ~10k bundled YAMLs, which take seconds to
scan), and the data options (``data_dir``, ``drop_path``, ...) go to the tasks as lm-eval metadata.
Task names, data options and the presence of each task's data are checked before the model is built,
so a typo or a missing file fails in seconds, not after loading a 7B checkpoint. A group whose
optional dataset (DROP) is missing runs without that task and says so in one line. Result files are
written atomically.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from evals import TASKS_DIR
from evals.instructeval.paths import TASK_OPTION_KEYS, MissingDatasetError, dataset_path
from lorasc_tune.io import atomic_write_text

log = logging.getLogger(__name__)


def dataset_of_task(name: str) -> Optional[str]:
    """The local dataset one of our leaf tasks reads (``instructeval_drop`` -> ``"drop"``), or None
    for tasks that manage their own data (``mezo_*``) or are not ours."""
    if name.startswith("instructeval_mmlu_"):
        return "mmlu"
    if name.startswith("instructeval_bbh_"):
        return "bbh"
    return {"instructeval_drop": "drop", "instructeval_humaneval": "humaneval",
            "instructeval_gsm8k": "gsm8k", "openinstruct_gsm8k": "gsm8k"}.get(name)


def _skip_line(group: str, task: str, err: MissingDatasetError) -> str:
    return f"{group}: skipping {task}: {err.path} not found ({err.dataset} is optional); {err.how_to_add()}"


def _lm_eval_task_manager_class():
    """``TaskManager`` whose groups skip a member task whose optional dataset is missing (one warning
    line naming the task and how to add its data) instead of failing the whole run. A task asked for
    by name, or a required dataset, still raises :class:`MissingDatasetError`."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._factory import TaskFactory

    class SkippingFactory(TaskFactory):
        def _build_group_members(self, member_list, group_name, overrides, registry):
            children = []
            for item in member_list:
                try:
                    children += super()._build_group_members([item], group_name, overrides, registry)
                except MissingDatasetError as err:
                    if not err.optional:
                        raise
                    name = item if isinstance(item, str) else item.get("task", item.get("group", "?"))
                    log.warning(_skip_line(group_name, str(name), err))
            return children

    class LoraScTaskManager(TaskManager):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._factory = SkippingFactory(meta=self.metadata)

    return LoraScTaskManager


def lm_eval_task_manager(**kwargs: Any):
    """An lm-eval ``TaskManager`` (same arguments) that skips missing optional data inside groups."""
    return _lm_eval_task_manager_class()(**kwargs)


def task_manager(data_options: Optional[Dict[str, Any]] = None, include_defaults: bool = False):
    """An lm-eval ``TaskManager`` over ``evals/tasks`` with the tasks' data options as metadata."""
    options = {k: str(v) for k, v in (data_options or {}).items() if v is not None}
    unknown = set(options) - set(TASK_OPTION_KEYS)
    if unknown:
        raise ValueError(f"unknown data options {sorted(unknown)}; known: {sorted(TASK_OPTION_KEYS)}")
    return lm_eval_task_manager(include_path=str(TASKS_DIR), include_defaults=include_defaults,
                                metadata=options)


def _leaf_tasks(name: str, manager: Any, seen: Optional[set] = None) -> Iterator[Tuple[str, bool]]:
    """``(leaf task, reached through a group)`` for a registered name, walking group YAMLs."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    seen = set() if seen is None else seen
    entry = manager.task_index.get(name)
    if entry is None or name in seen:
        return
    seen.add(name)
    if entry.kind == Kind.GROUP and entry.yaml_path:
        members = load_yaml(entry.yaml_path, resolve_func=False, recursive=True).get("task", [])
        for member in members if isinstance(members, list) else [members]:
            member = member if isinstance(member, str) else member.get("task") or member.get("group")
            for leaf, _ in _leaf_tasks(str(member), manager, seen):
                yield leaf, True
    elif entry.kind in (Kind.TASK, Kind.PY_TASK):
        yield name, False


def check_task_data(tasks: Sequence[str], options: Optional[Mapping[str, Any]], manager: Any) -> None:
    """Raise :class:`MissingDatasetError` for the first task whose data are missing, unless the task
    is in a requested group and its dataset is optional (the group then skips it). Reads no data."""
    checked: Dict[str, Optional[MissingDatasetError]] = {}
    for name in tasks:
        for leaf, in_group in _leaf_tasks(name, manager):
            dataset = dataset_of_task(leaf)
            if dataset is None:
                continue
            if dataset not in checked:
                try:
                    dataset_path(dataset, options or {})
                    checked[dataset] = None
                except MissingDatasetError as err:
                    checked[dataset] = err
            err = checked[dataset]
            if err is not None and not (in_group and err.optional):
                raise err


def check_task_names(tasks: Sequence[str], manager: Any) -> List[str]:
    """``tasks`` as a list, or a ``ValueError`` naming each name ``manager`` does not know and listing
    the groups and tags it does (each group's own tasks, e.g. ``instructeval_mmlu_anatomy``, also work).
    Then checks that their data exist (:func:`check_task_data`, with ``manager``'s metadata)."""
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
    check_task_data(names, getattr(manager, "metadata", None) or {}, manager)
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
