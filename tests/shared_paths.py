"""Where the tests find the repo and the shared real data (importable as ``shared_paths``).

Real data lives outside the repo in ``../shared/data`` (override with ``LORASC_SHARED_DATA``).
Where it is absent a test that needs it is skipped with the reason, except under ``CI=true``,
where a missing file is a failure: CI must never go green by skipping the real-data tests.
"""

import os
from pathlib import Path

import pytest

from lorasc_tune._paths import SHARED_DATA_ENV, shared_data_dir

REPO_ROOT = Path(__file__).resolve().parent.parent


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require_shared(*parts: str) -> Path:
    """Path to ``shared/data/<parts>``; skip (or fail under CI=true) when it is missing."""
    path = shared_data_dir().joinpath(*parts)
    if not path.exists():
        msg = (
            f"shared data not found: {path} "
            f"(set {SHARED_DATA_ENV} to the folder that holds the project's shared data)"
        )
        if _in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    return path


# Each MeZO task's validation file in the shared data (the file its test split is drawn from).
VALIDATION_FILES = {
    "sst2": ("glue_sst2", "dev.tsv"),
    "rte": ("superglue", "RTE", "val.jsonl"),
    "cb": ("superglue", "CB", "val.jsonl"),
    "boolq": ("superglue", "BoolQ", "val.jsonl"),
    "wsc": ("superglue", "WSC", "val.jsonl"),
    "wic": ("superglue", "WiC", "val.jsonl"),
    "multirc": ("superglue", "MultiRC", "val.jsonl"),
    "copa": ("superglue", "COPA", "val.jsonl"),
    "squad": ("squad_v1.1", "dev-v1.1.json"),
    "gsm8k": ("gsm8k", "test.jsonl"),
}
