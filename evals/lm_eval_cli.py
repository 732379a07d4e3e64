"""lm-eval's own command line, with the ``lorasc`` model registered and our tasks on the include path.

    python -m evals.lm_eval_cli --model lorasc \\
        --model_args checkpoint_dir=<output_dir>/epoch_0,tokenizer_path=<tokenizer.model> \\
        --tasks instructeval --confirm_run_unsafe_code --device cpu --batch_size 8 \\
        --output_path eval_results

lm-eval discovers models only through its registry, which it fills from its own package; a plain
``lm_eval`` process never imports ours. This wrapper imports the adapter (registering it), adds
``--include_path evals/tasks`` unless one is given, and runs lm-eval's CLI with two changes to task
loading (:mod:`evals.suite`): every requested task's data are checked before the model is built (a
missing file stops the run at once with an error naming it and the setting to change), and a group
whose optional dataset (DROP) is missing runs without that task, saying so in one line. When
``--output_path`` is set it then writes the markdown table (:mod:`evals.report`) next to the results
JSON.
"""

from __future__ import annotations

import json
import sys
import time
from typing import List, Optional

from evals import TASKS_DIR


def _with_include_path(argv: List[str]) -> List[str]:
    is_run = not argv or argv[0] == "run" or argv[0].startswith("-")
    has_include = any(a == "--include_path" or a.startswith("--include_path=") for a in argv)
    return argv + ["--include_path", str(TASKS_DIR)] if is_run and not has_include else argv


def _output_path(argv: List[str]) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg in ("--output_path", "-o") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--output_path="):
            return arg.split("=", 1)[1]
    return None


def _use_our_task_loading() -> None:
    """Make lm-eval's CLI build our ``TaskManager`` and check the tasks' data right after it resolves
    the task names (before the model is built). lm-eval 0.4.13 looks ``TaskManager`` up in
    ``lm_eval.tasks`` when it processes the tasks, which is where it is replaced."""
    import lm_eval.tasks
    from lm_eval.config.evaluate_config import EvaluatorConfig

    from evals.suite import _lm_eval_task_manager_class, check_task_data

    lm_eval.tasks.TaskManager = _lm_eval_task_manager_class()
    process_tasks = EvaluatorConfig.process_tasks
    if getattr(process_tasks, "_lorasc_checked", False):
        return

    def process_and_check(self, metadata=None):
        manager = process_tasks(self, metadata)
        names = [t for t in (self.tasks or []) if isinstance(t, str)]
        check_task_data(names, manager.metadata or {}, manager)
        return manager

    process_and_check._lorasc_checked = True
    EvaluatorConfig.process_tasks = process_and_check


def main(argv: Optional[List[str]] = None) -> None:
    import evals.lm_adapter  # noqa: F401  (registers "lorasc")
    from lm_eval.__main__ import cli_evaluate

    from evals.instructeval.paths import MissingDatasetError
    from evals.report import find_results, markdown_table, write_table

    args = _with_include_path(list(sys.argv[1:] if argv is None else argv))
    started = time.time()
    sys.argv = ["lm_eval"] + args
    _use_our_task_loading()
    try:
        cli_evaluate()
    except MissingDatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    output = _output_path(args)
    if output:
        results = find_results(output, newer_than=started)
        if results is not None:
            table = write_table(results)
            print(f"\nMarkdown table ({table}):\n")
            print(markdown_table(json.loads(results.read_text())), end="")


if __name__ == "__main__":
    main()
