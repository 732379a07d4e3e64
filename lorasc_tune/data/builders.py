"""torchtune ``dataset:`` builders for the paper's 12 in-domain tasks under the MeZO protocol.

Each builder is ``<task>_dataset(tokenizer, **kwargs)`` (or the generic :func:`mezo_dataset`) and
returns a map-style dataset whose items are ``{"tokens": list[int], "labels": list[int]}`` of the same
length, labels = ``CROSS_ENTROPY_IGNORE_IDX`` (-100) on the prompt, ready for
``torchtune.data.padded_collate_sft``. Only the answer carries loss: the verbalized label word(s) for
classification and multiple choice, the answer text (plus MeZO's closing newline) for SQuAD, DROP
and GSM8K.

Example config::

    dataset:
      _component_: lorasc_tune.data.rte_dataset
      split: train          # train | validation | test
      seed: 0               # MeZO's train_set_seed
      data_dir: null        # default: $LORASC_SHARED_DATA or ../shared/data
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from lorasc_tune.data.mezo import TASK_NAMES, get_task, load_split
from lorasc_tune.data.templates import Example, render


def tokenize_example(
    tokenizer: Any,
    example: Example,
    max_seq_len: Optional[int] = None,
    add_eos: bool = False,
) -> dict[str, list[int]]:
    """Tokenize ``prompt + target`` and mask the prompt.

    The answer tokens are found as MeZO does: ``len(encode(prompt + target)) - len(encode(prompt))``
    trailing tokens (both with BOS). Counting rather than concatenating two encodings keeps the
    tokenizer's joint segmentation at the boundary (SentencePiece merges across it otherwise).

    Over ``max_seq_len`` the sequence is cut on the **left** after BOS, as MeZO does, so the answer
    survives. ``add_eos`` appends EOS (with loss) after the answer; MeZO trains without it.

    Returns:
        ``{"tokens": [T], "labels": [T]}`` with ``labels[i] == tokens[i]`` on answer tokens
        (torchtune shifts labels in the recipe) and -100 elsewhere.
    """
    full = tokenizer.encode(example.prompt + example.target, add_bos=True, add_eos=add_eos)
    n_prompt = len(tokenizer.encode(example.prompt, add_bos=True, add_eos=False))
    if n_prompt >= len(full):
        raise ValueError(f"the answer {example.target!r} adds no tokens after the prompt ending {example.prompt[-80:]!r}")
    labels = [CROSS_ENTROPY_IGNORE_IDX] * n_prompt + full[n_prompt:]
    if max_seq_len is not None and len(full) > max_seq_len:
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        keep = max_seq_len - 1  # BOS stays first
        full, labels = full[:1] + full[-keep:], labels[:1] + labels[-keep:]
    return {"tokens": full, "labels": labels}


class MezoTaskDataset(Dataset):
    """One MeZO split of one task, rendered with MeZO's template and tokenized on access.

    Attributes:
        task: task name.
        split: "train", "validation" or "test".
        rows: the sampled rows (plain dicts, see :mod:`lorasc_tune.data.mezo`).
        examples: the rendered rows (:class:`~lorasc_tune.data.templates.Example`): prompt, target,
            candidate choices and gold, for in-recipe scoring.
    """

    def __init__(
        self,
        tokenizer: Any,
        task: str,
        rows: list[dict],
        split: str,
        max_seq_len: Optional[int] = None,
        add_eos: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self.task = task
        self.split = split
        self.rows = rows
        self.examples = [render(task, r) for r in rows]  # eager: template errors surface at build time
        self.max_seq_len = max_seq_len
        self.add_eos = add_eos

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        try:
            return tokenize_example(self._tokenizer, self.examples[index], self.max_seq_len, self.add_eos)
        except ValueError as e:
            raise ValueError(f"{self.task} {self.split} row {index}: {e}") from e


def mezo_dataset(
    tokenizer: Any,
    task: str,
    split: str = "train",
    seed: int = 0,
    num_train: int = 1000,
    num_dev: Optional[int] = None,
    num_eval: int = 1000,
    data_dir: Optional[str | os.PathLike] = None,
    train_file: Optional[str | os.PathLike] = None,
    valid_file: Optional[str | os.PathLike] = None,
    max_seq_len: Optional[int] = None,
    add_eos: bool = False,
) -> MezoTaskDataset:
    """A MeZO split of ``task`` as a torchtune SFT dataset.

    Args:
        tokenizer: a torchtune ``ModelTokenizer`` (``encode(text, add_bos, add_eos)``).
        task: one of ``sst2 rte cb boolq wsc wic multirc copa record squad drop gsm8k``.
        split: "train", "validation" (MeZO's dev, alias "dev") or "test" (MeZO's eval, alias "eval").
        seed: MeZO's ``train_set_seed``: it picks all three splits.
        num_train, num_dev, num_eval: split sizes; ``num_dev=None`` is the MeZO default for the task
            (500; 100 for CB and COPA).
        data_dir: root holding the files in the shared-data layout (``superglue/RTE/train.jsonl``, ...);
            default ``$LORASC_SHARED_DATA``, else ``../shared/data``.
        train_file, valid_file: explicit paths to the task's original train / validation file, which
            win over ``data_dir`` (e.g. your own BoolQ ``train.jsonl``).
        max_seq_len: left-truncate longer sequences (keeping BOS); default the tokenizer's
            ``max_seq_len`` if it has one.
        add_eos: append EOS after the answer (MeZO does not).

    Raises:
        MissingDataError: a needed file is absent; the message names it and its source.
    """
    spec = get_task(task)
    rows = load_split(
        spec.name, split, seed=seed, num_train=num_train, num_dev=num_dev, num_eval=num_eval,
        data_dir=data_dir, train_file=train_file, valid_file=valid_file,
    )  # fmt: skip
    if max_seq_len is None:
        max_seq_len = getattr(tokenizer, "max_seq_len", None)
    canonical_split = {"dev": "validation", "eval": "test"}.get(split, split)
    return MezoTaskDataset(tokenizer, spec.name, rows, canonical_split, max_seq_len=max_seq_len, add_eos=add_eos)


def _task_builder(task: str) -> Callable[..., MezoTaskDataset]:
    """``<task>_dataset(tokenizer, **kwargs)``: :func:`mezo_dataset` with ``task`` fixed."""

    def builder(tokenizer: Any, **kwargs: Any) -> MezoTaskDataset:
        return mezo_dataset(tokenizer, task, **kwargs)

    builder.__name__ = builder.__qualname__ = f"{task}_dataset"
    builder.__module__ = __name__
    builder.__doc__ = f"MeZO-protocol {task} dataset: :func:`mezo_dataset` with ``task={task!r}``; same keyword arguments."
    return builder


sst2_dataset = _task_builder("sst2")
rte_dataset = _task_builder("rte")
cb_dataset = _task_builder("cb")
boolq_dataset = _task_builder("boolq")
wsc_dataset = _task_builder("wsc")
wic_dataset = _task_builder("wic")
multirc_dataset = _task_builder("multirc")
copa_dataset = _task_builder("copa")
record_dataset = _task_builder("record")
squad_dataset = _task_builder("squad")
drop_dataset = _task_builder("drop")
gsm8k_dataset = _task_builder("gsm8k")

BUILDERS: dict[str, Callable[..., MezoTaskDataset]] = {t: globals()[f"{t}_dataset"] for t in TASK_NAMES}
