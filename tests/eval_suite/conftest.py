"""Fixtures for the evals tests: tiny Llama-2-shaped models, in memory and as HF checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

# Two layers, GQA (4 query heads over 2 kv heads), the real Llama-2 vocabulary so the shared
# tokenizer can drive it; 2048 positions so 5-shot MMLU prompts fit without truncation.
TINY_32K = dict(vocab_size=32000, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                intermediate_dim=128, max_seq_len=2048, norm_eps=1e-5)


@pytest.fixture(scope="session")
def tiny_ckpt_32k(tmp_path_factory):
    """An HF checkpoint folder (the layout of a merged ``epoch_N``) for a 32000-vocab tiny model."""
    from lorasc_tune.demo import write_tiny_llama2_hf_checkpoint

    return write_tiny_llama2_hf_checkpoint(tmp_path_factory.mktemp("tiny32k") / "epoch_0", model_args=TINY_32K)


@pytest.fixture
def llama2_tokenizer_path(shared_data):
    return shared_data("llama2_tokenizer", "tokenizer.model")


@pytest.fixture
def offline_env(monkeypatch):
    """The hub variables set offline, as in the issue's acceptance check."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
