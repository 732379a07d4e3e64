"""Every shipped config parses, and its lorasc block validates; ablations match the generator."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from shared_paths import REPO_ROOT, require_shared
from lorasc_tune._paths import shared_data_dir
from lorasc_tune.config import LoRASCConfig

LLM_CONFIGS = sorted(p for p in (REPO_ROOT / "configs").rglob("*.yaml")
                     if OmegaConf.load(p).get("lorasc") is not None)
ALPACA_CONFIGS = [p for p in LLM_CONFIGS if p.name.startswith("llama2_7b_alpaca")]


def test_there_are_configs_for_every_ablation_row_and_variant():
    names = {p.name for p in LLM_CONFIGS}
    for row in ("lora", "cola", "cascade", "slow", "noise"):
        for variant in ("lora", "loraplus", "dora"):
            assert f"llama2_7b_alpaca_{row}_{variant}.yaml" in names


@pytest.mark.parametrize("path", LLM_CONFIGS, ids=lambda p: p.name)
def test_config_lorasc_block_is_valid(path):
    cfg = OmegaConf.load(path)
    LoRASCConfig.from_config(cfg.lorasc)


def test_ablation_rows_mean_what_they_say():
    load = lambda name: OmegaConf.load(REPO_ROOT / "configs" / "ablations" / f"llama2_7b_alpaca_{name}.yaml")
    assert load("lora_lora").lorasc.cascade is False
    cola, cascade = load("cola_lora").lorasc, load("cascade_lora").lorasc
    assert (cola.slow_alpha, cola.noise_lambda, cola.schedule) == (0.0, 0.0, "run")
    assert (cascade.slow_alpha, cascade.noise_lambda, cascade.schedule) == (0.0, 0.0, "expert")
    assert load("slow_lora").lorasc.slow_alpha > 0 and load("slow_lora").lorasc.noise_lambda == 0
    full = load("noise_lora").lorasc
    assert full.slow_alpha > 0 and full.noise_lambda > 0
    assert load("noise_loraplus").lorasc.lr_ratio_B == 16.0
    assert load("noise_dora").model.use_dora is True


def test_committed_ablations_match_the_generator(tmp_path):
    subprocess.run([sys.executable, "recipes/make_ablation_configs.py", "--out", str(tmp_path)],
                   cwd=REPO_ROOT, check=True, capture_output=True)
    for fresh in tmp_path.glob("*.yaml"):
        committed = REPO_ROOT / "configs" / "ablations" / fresh.name
        assert committed.read_text() == fresh.read_text(), fresh.name


@pytest.mark.parametrize("path", ALPACA_CONFIGS, ids=lambda p: p.name)
def test_alpaca_configs_train_on_the_plain_alpaca_prompt(path):
    # torchtune's llama2_tokenizer defaults to the Llama-2 chat template, which would wrap every
    # example in [INST] ... [/INST]; the InstructEval suite prompts without it.
    from torchtune import config as tt_config

    require_shared("llama2_tokenizer", "tokenizer.model")
    require_shared("alpaca", "alpaca_tiny_100.json")
    cfg = OmegaConf.load(path)
    cfg.tokenizer.path = str(shared_data_dir() / "llama2_tokenizer" / "tokenizer.model")
    tokenizer = tt_config.instantiate(cfg.tokenizer)
    data = tt_config.instantiate(cfg.dataset, tokenizer, source="json", split="train",
                                 data_files=str(shared_data_dir() / "alpaca" / "alpaca_tiny_100.json"))
    text = tokenizer.decode(data[0]["tokens"])
    assert text.startswith("Below is an instruction that describes a task")
    assert "[INST]" not in text and "<<SYS>>" not in text
