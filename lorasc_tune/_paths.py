"""Where the project looks for the shared, read-only data used by tests and demos."""

import os
from pathlib import Path

SHARED_DATA_ENV = "LORASC_SHARED_DATA"


def shared_data_dir() -> Path:
    """The shared data folder: ``$LORASC_SHARED_DATA``, else ``../shared/data`` beside the repo root."""
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"
