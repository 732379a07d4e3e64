"""lm-eval hooks for the MeZO-protocol tasks (``mezo_<task>``).

The docs come from the same sampling code as the torchtune builders
(:func:`lorasc_tune.data.mezo.load_split` with ``split="test"``), so an evaluation scores exactly the
rows the builders hold out. Settings, first match wins:

* seed: ``--metadata '{"seed": 1}'``, else ``$LORASC_MEZO_SEED``, else 0.
* number of test rows: metadata ``num_eval``, else ``$LORASC_MEZO_NUM_EVAL``, else 1000.
* data root: metadata ``data_dir``, else ``$LORASC_MEZO_DATA_DIR``, else the shared data folder
  (``$LORASC_SHARED_DATA`` or ``../shared/data``), in the shared-data layout.

Doc fields: ``prompt`` (context), and ``choices`` + ``gold`` (classification / multiple choice;
``gold`` is a list for ReCoRD) or ``answers`` + ``target`` (generation).
"""

from __future__ import annotations

import os
from typing import Any

import datasets

import evals  # noqa: F401  (quiets lm-eval's per-task custom-dataset notice for our tasks)
from lorasc_tune.data.metrics import gsm8k_exact_match, max_exact_match, max_f1
from lorasc_tune.data.mezo import load_rows, load_split
from lorasc_tune.data.templates import render

NUM_GSM8K_SHOTS = 8


def _setting(kwargs: dict, key: str, env: str, default: Any, cast=str) -> Any:
    value = kwargs.get(key)
    if value is None:
        value = os.environ.get(env)
    return default if value is None or value == "" else cast(value)


def _doc(task: str, row: dict) -> dict:
    ex = render(task, row)
    if ex.choices is not None:
        return {"prompt": ex.prompt, "choices": ex.choices, "gold": ex.gold}
    return {"prompt": ex.prompt, "answers": ex.answers, "target": ex.answers[0]}


def load_docs(mezo_task: str, **kwargs: Any) -> dict[str, datasets.Dataset]:
    """``custom_dataset`` hook: ``{"test": the MeZO test split as docs}`` (+ ``"fewshot"`` for GSM8K).

    GSM8K's few-shot exemplars are the first 8 rows of its train file: fixed across seeds, and never
    in the test split (which is drawn from the test file).
    """
    seed = _setting(kwargs, "seed", "LORASC_MEZO_SEED", 0, int)
    num_eval = _setting(kwargs, "num_eval", "LORASC_MEZO_NUM_EVAL", 1000, int)
    data_dir = _setting(kwargs, "data_dir", "LORASC_MEZO_DATA_DIR", None)
    rows = load_split(mezo_task, "test", seed=seed, num_eval=num_eval, data_dir=data_dir)
    out = {"test": datasets.Dataset.from_list([_doc(mezo_task, r) for r in rows])}
    if mezo_task == "gsm8k":
        shots = load_rows("gsm8k", "train", data_dir)[:NUM_GSM8K_SHOTS]
        out["fewshot"] = datasets.Dataset.from_list([_doc("gsm8k", r) for r in shots])
    return out


def process_qa(doc: dict, results: list[str]) -> dict[str, float]:
    """SQuAD / DROP: max F1 and exact match over the gold answers (MeZO strips the generation)."""
    pred = results[0].strip()
    return {"f1": max_f1(pred, doc["answers"]), "em": max_exact_match(pred, doc["answers"])}


def process_gsm8k(doc: dict, results: list[str]) -> dict[str, float]:
    """GSM8K: exact match of the last number generated against the final answer."""
    return {"exact_match": gsm8k_exact_match(results[0], doc["target"])}
