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

#: Every key the tasks read from metadata / --model_args.
TASK_OPTION_KEYS = frozenset({"data_dir"} | {f"{name}_path" for name in DEFAULT_LOCATIONS})


def env_var(name: str) -> str:
    return f"LORASC_EVAL_{name.upper()}_PATH"


def data_root(options: Mapping[str, Any]) -> Path:
    """The data root: metadata ``data_dir``, else ``$LORASC_EVAL_DATA``, else the shared data folder."""
    root = options.get("data_dir") or os.environ.get(DATA_ROOT_ENV)
    return Path(root) if root else shared_data_dir()


def dataset_path(name: str, options: Mapping[str, Any] | None = None) -> Path:
    """Resolved path of dataset ``name``; raises ``FileNotFoundError`` naming the path and the
    settings that would change it when nothing is there."""
    options = options or {}
    explicit = options.get(f"{name}_path") or os.environ.get(env_var(name))
    path = Path(explicit) if explicit else data_root(options) / DEFAULT_LOCATIONS[name]
    if not path.exists():
        raise FileNotFoundError(
            f"InstructEval {name}: {path} not found. Set {env_var(name)} (or {name}_path= in "
            f"--model_args/--metadata) to the file, or {DATA_ROOT_ENV} (or data_dir=) to a folder "
            f"holding {DEFAULT_LOCATIONS[name]}"
        )
    return path
