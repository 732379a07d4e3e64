"""Where the InstructEval tasks find their local files.

Each dataset has a path under a data root. In priority order, a dataset's path is:

1. ``<name>_path`` in lm-eval's task metadata (``--metadata '{"drop_path": ...}'``, or any key in
   ``--model_args``, which lm-eval merges into the metadata), e.g. ``drop_path=/data/drop_dev.json``;
2. the env var ``LORASC_EVAL_<NAME>_PATH``, e.g. ``LORASC_EVAL_DROP_PATH``;
3. ``<root>/<default relative path>``, with the root from metadata ``data_dir``, else env
   ``LORASC_EVAL_DATA``, else the project's shared data folder (``lorasc_tune._paths``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from lorasc_tune._paths import shared_data_dir

DATA_ROOT_ENV = "LORASC_EVAL_DATA"

#: dataset name -> its default location under the data root.
DEFAULT_LOCATIONS = {
    "mmlu": "mmlu",                                  # {dev,test}/<subject>_{dev,test}.csv
    "bbh": "bbh/bbh",                                # <task>.json
    "drop": "drop/drop_dataset_dev.json",            # DROP's own JSON release format
    "humaneval": "humaneval/HumanEval.jsonl.gz",     # OpenAI's release file
    "gsm8k": "gsm8k",                                # {train,test}.jsonl
}

#: Datasets a group may run without: a group that includes one whose file is missing skips that task
#: with one line saying how to add it; asked for on its own, the task stops with the error instead.
#: Value: why it may be missing.
OPTIONAL_DATASETS = {"drop": "DROP is not in the project's shared data"}

#: What to point each dataset's setting at.
_EXPECTED = {
    "mmlu": "the MMLU folder (dev/ and test/ csv files)",
    "bbh": "the BIG-Bench-Hard folder of <task>.json files",
    "drop": "DROP's drop_dataset_dev.json",
    "humaneval": "HumanEval.jsonl.gz",
    "gsm8k": "the GSM8K folder (train.jsonl, test.jsonl)",
}

#: Every key the tasks read from metadata / --model_args.
TASK_OPTION_KEYS = frozenset({"data_dir"} | {f"{name}_path" for name in DEFAULT_LOCATIONS})


class MissingDatasetError(FileNotFoundError):
    """A task's data file is not where its settings point; names the dataset, the path and the
    settings that would change it. ``optional`` marks a dataset a group may skip."""

    def __init__(self, dataset: str, path: Path) -> None:
        self.dataset, self.path = dataset, Path(path)
        self.optional = dataset in OPTIONAL_DATASETS
        why = f" ({OPTIONAL_DATASETS[dataset]})" if self.optional else ""
        super().__init__(
            f"InstructEval {dataset}: {path} not found{why}. Set {env_var(dataset)} (or {dataset}_path= "
            f"in --model_args/--metadata, data.{dataset}_path= for the tune recipe) to "
            f"{_EXPECTED[dataset]}, or {DATA_ROOT_ENV} (or data_dir=) to a folder holding "
            f"{DEFAULT_LOCATIONS[dataset]}"
        )

    def how_to_add(self) -> str:
        """One sentence: how to make the dataset available."""
        return (f"set {env_var(self.dataset)} (or {self.dataset}_path= in --model_args/--metadata, "
                f"data.{self.dataset}_path= for the tune recipe) to {_EXPECTED[self.dataset]} to include it")


def env_var(name: str) -> str:
    return f"LORASC_EVAL_{name.upper()}_PATH"


def data_root(options: Mapping[str, Any]) -> Path:
    """The data root: metadata ``data_dir``, else ``$LORASC_EVAL_DATA``, else the shared data folder."""
    root = options.get("data_dir") or os.environ.get(DATA_ROOT_ENV)
    return Path(root) if root else shared_data_dir()


def dataset_path(name: str, options: Mapping[str, Any] | None = None) -> Path:
    """Resolved path of dataset ``name``; raises :class:`MissingDatasetError` (a
    ``FileNotFoundError``) naming the path and the settings that would change it when nothing is
    there."""
    path = configured_path(name, options)
    if not path.exists():
        raise MissingDatasetError(name, path)
    return path


def configured_path(name: str, options: Mapping[str, Any] | None = None) -> Path:
    """Where dataset ``name`` is looked for (whether or not anything is there)."""
    if name not in DEFAULT_LOCATIONS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DEFAULT_LOCATIONS)}")
    options = options or {}
    explicit = options.get(f"{name}_path") or os.environ.get(env_var(name))
    return Path(explicit) if explicit else data_root(options) / DEFAULT_LOCATIONS[name]
