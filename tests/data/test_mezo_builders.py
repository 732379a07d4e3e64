"""torchtune builders: label masking (only answer tokens carry loss), truncation, config use, errors."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft

from lorasc_tune.data import BUILDERS, MissingDataError, TASK_NAMES, mezo_dataset, rte_dataset, tokenize_example
from lorasc_tune.data.templates import render

from mezo_golden import GOLDEN  # tests/data is on sys.path under pytest

FIXTURES = Path(__file__).parent / "fixtures"


_TOKENIZERS = {}


@pytest.fixture
def tokenizer(shared_data):
    """The real Llama-2 SentencePiece tokenizer (loaded once per session)."""
    from torchtune.models.llama2 import llama2_tokenizer

    path = str(shared_data("llama2_tokenizer", "tokenizer.model"))
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = llama2_tokenizer(path, prompt_template=None)
    return _TOKENIZERS[path]


def _answer(tokenizer, item):
    return [t for t, lab in zip(item["tokens"], item["labels"]) if lab != CROSS_ENTROPY_IGNORE_IDX]


def _check_masking(tokenizer, ex, item):
    """Labels: -100 exactly on the prompt's tokens, token ids on the answer's, decoding to the answer."""
    prompt_ids = tokenizer.encode(ex.prompt, add_bos=True, add_eos=False)
    n = len(prompt_ids)
    assert len(item["tokens"]) == len(item["labels"])
    assert item["tokens"][:n] == prompt_ids, "the masked part must be exactly the prompt's tokens"
    assert item["labels"][:n] == [CROSS_ENTROPY_IGNORE_IDX] * n
    assert item["labels"][n:] == item["tokens"][n:] and n < len(item["tokens"])
    # SentencePiece drops the leading space of a decoded piece.
    assert tokenizer.decode(_answer(tokenizer, item)) == ex.target.lstrip(" ")


@pytest.mark.parametrize("task", sorted(GOLDEN))
def test_golden_label_masking(task, tokenizer):
    ex = render(task, GOLDEN[task][0])
    _check_masking(tokenizer, ex, tokenize_example(tokenizer, ex))


REAL_TRAIN = {
    "sst2": ("glue_sst2", "train.tsv"),
    "rte": ("superglue", "RTE", "train.jsonl"),
    "cb": ("superglue", "CB", "train.jsonl"),
    "wsc": ("superglue", "WSC", "train.jsonl"),
    "wic": ("superglue", "WiC", "train.jsonl"),
    "multirc": ("superglue", "MultiRC", "train.jsonl"),
    "copa": ("superglue", "COPA", "train.jsonl"),
    "gsm8k": ("gsm8k", "train.jsonl"),
}


@pytest.mark.parametrize("task", sorted(REAL_TRAIN))
def test_real_train_items_mask_the_prompt(task, tokenizer, shared_data):
    shared_data(*REAL_TRAIN[task])
    ds = BUILDERS[task](tokenizer, split="train", seed=0, data_dir=shared_data())
    for i in range(0, len(ds), max(1, len(ds) // 25)):  # ~25 rows spread over the split
        _check_masking(tokenizer, ds.examples[i], ds[i])


@pytest.mark.parametrize("task,split", [("squad", "test"), ("boolq", "test"), ("record", "train"), ("drop", "train")])
def test_other_splits_mask_the_prompt(task, split, tokenizer, shared_data):
    data_dir = FIXTURES if task in ("record", "drop") else shared_data()
    if task == "squad":
        shared_data("squad_v1.1", "dev-v1.1.json")
    if task == "boolq":
        shared_data("superglue", "BoolQ", "val.jsonl")
    ds = mezo_dataset(tokenizer, task, split=split, num_train=4, num_dev=2, num_eval=20, data_dir=data_dir)
    for i in range(len(ds)):
        _check_masking(tokenizer, ds.examples[i], ds[i])


def test_collate_and_torchtune_config(tokenizer, shared_data):
    shared_data("superglue", "RTE", "train.jsonl")
    cfg = OmegaConf.create(
        {"_component_": "lorasc_tune.data.rte_dataset", "split": "validation", "seed": 1, "data_dir": str(shared_data())}
    )
    ds = config.instantiate(cfg, tokenizer)
    assert len(ds) == 500 and ds.split == "validation"
    batch = padded_collate_sft([ds[0], ds[1], ds[2]], padding_idx=0, ignore_idx=CROSS_ENTROPY_IGNORE_IDX)
    assert batch["tokens"].shape == batch["labels"].shape and batch["tokens"].dtype == torch.long
    # One label word per row (Yes / No are single Llama-2 tokens).
    assert ((batch["labels"] != CROSS_ENTROPY_IGNORE_IDX).sum(dim=1) == 1).all()


def test_left_truncation_keeps_bos_and_answer(tokenizer):
    ex = render("squad", GOLDEN["squad"][0])
    full = tokenize_example(tokenizer, ex)
    cut = tokenize_example(tokenizer, ex, max_seq_len=12)
    assert len(cut["tokens"]) == 12 and cut["tokens"][0] == tokenizer.bos_id
    assert cut["tokens"][1:] == full["tokens"][-11:] and _answer(tokenizer, cut) == _answer(tokenizer, full)


def test_add_eos_trains_on_eos(tokenizer):
    ex = render("rte", GOLDEN["rte"][0])
    item = tokenize_example(tokenizer, ex, add_eos=True)
    assert item["tokens"][-1] == tokenizer.eos_id and item["labels"][-1] == tokenizer.eos_id


def test_builders_registered_for_every_task():
    assert set(BUILDERS) == set(TASK_NAMES) and BUILDERS["rte"] is rte_dataset
    assert rte_dataset.__name__ == "rte_dataset" and "rte" in rte_dataset.__doc__


def test_builder_missing_boolq_train_is_a_clear_error(tokenizer, tmp_path):
    with pytest.raises(MissingDataError, match=r"BoolQ/train\.jsonl.*train_file"):
        BUILDERS["boolq"](tokenizer, split="train", data_dir=tmp_path)


def test_split_aliases(tokenizer):
    a = mezo_dataset(tokenizer, "drop", split="eval", num_eval=3, data_dir=FIXTURES)
    b = mezo_dataset(tokenizer, "drop", split="test", num_eval=3, data_dir=FIXTURES)
    assert a.split == b.split == "test" and [e.prompt for e in a.examples] == [e.prompt for e in b.examples]
