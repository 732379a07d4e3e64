"""Data for the paper's in-domain tasks under the MeZO protocol.

* :mod:`lorasc_tune.data.mezo`: original-format loaders and MeZO's seeded train/validation/test split.
* :mod:`lorasc_tune.data.templates`: MeZO's prompt templates (prompt, candidate continuations, gold).
* :mod:`lorasc_tune.data.builders`: torchtune ``dataset:`` builders, e.g. ``lorasc_tune.data.rte_dataset``.
* :mod:`lorasc_tune.data.metrics`: F1 / EM / GSM8K exact match.
"""

from lorasc_tune.data.builders import (
    BUILDERS,
    MezoTaskDataset,
    boolq_dataset,
    cb_dataset,
    copa_dataset,
    drop_dataset,
    gsm8k_dataset,
    mezo_dataset,
    multirc_dataset,
    record_dataset,
    rte_dataset,
    squad_dataset,
    sst2_dataset,
    tokenize_example,
    wic_dataset,
    wsc_dataset,
)
from lorasc_tune.data.mezo import (
    TASK_NAMES,
    TASKS,
    DataFormatError,
    MezoSplits,
    MissingDataError,
    load_rows,
    load_split,
    mezo_split,
)
from lorasc_tune.data.templates import Example, render

__all__ = [
    "BUILDERS",
    "DataFormatError",
    "Example",
    "MezoSplits",
    "MezoTaskDataset",
    "MissingDataError",
    "TASKS",
    "TASK_NAMES",
    "boolq_dataset",
    "cb_dataset",
    "copa_dataset",
    "drop_dataset",
    "gsm8k_dataset",
    "load_rows",
    "load_split",
    "mezo_dataset",
    "mezo_split",
    "multirc_dataset",
    "record_dataset",
    "render",
    "rte_dataset",
    "sst2_dataset",
    "squad_dataset",
    "tokenize_example",
    "wic_dataset",
    "wsc_dataset",
]
