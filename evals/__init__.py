"""Evaluation for lorasc-tune: an lm-eval model adapter and the offline InstructEval suite.

* :mod:`evals.lm_adapter` -- ``LoraScLM``, an ``lm_eval`` model (registered as ``"lorasc"``) over a
  torchtune decoder and tokenizer loaded from our checkpoint folders.
* :mod:`evals.tasks` -- lm-eval task YAMLs; ``--tasks instructeval`` runs MMLU, BBH, DROP and
  HumanEval with InstructEval's settings and GSM8K with open-instruct's (:mod:`evals.openinstruct`),
  reading local files only.
* :mod:`evals.lm_eval_cli` -- ``python -m evals.lm_eval_cli ...``: lm-eval's own CLI with our model
  registered and our task folder on the include path.
* :mod:`evals.report` -- a one-line-per-task markdown table from lm-eval's results JSON.

Nothing here is imported eagerly: ``import evals`` stays cheap, and torch/lm_eval load on use. It does
install one logging filter (:func:`quiet_custom_dataset_notice`).
"""

import logging
from pathlib import Path

#: The folder that holds our lm-eval task YAMLs (pass it to ``--include_path``).
TASKS_DIR = Path(__file__).resolve().parent / "tasks"

#: The name the adapter is registered under in lm-eval's model registry.
MODEL_NAME = "lorasc"


def register() -> None:
    """Register the ``lorasc`` model with lm-eval (idempotent; importing the adapter does it)."""
    import evals.lm_adapter  # noqa: F401  (the import registers the class)


#: Prefixes of the task names our YAMLs define.
OUR_TASK_PREFIXES = ("instructeval", "openinstruct_", "mezo_")
_NOTICE = "Custom kwargs can be passed to `--metadata`"


class _CustomDatasetNotice(logging.Filter):
    """Drops lm-eval's per-task advice that a ``custom_dataset`` task takes ``--metadata`` kwargs,
    for our tasks only: every one of ours is a custom dataset, so a full run printed it 85 times."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (_NOTICE in message and message.startswith(OUR_TASK_PREFIXES))


def quiet_custom_dataset_notice() -> None:
    """Install the filter on lm-eval's task logger (idempotent; cheap: lm_eval is not imported)."""
    logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _CustomDatasetNotice) for f in logger.filters):
        logger.addFilter(_CustomDatasetNotice())


quiet_custom_dataset_notice()
