"""Every shipped config parses, and its lorasc block validates; ablations match the generator."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from shared_paths import REPO_ROOT, require_shared
from lorasc_tune._paths import shared_data_dir
from lorasc_tune.config import LoRASCConfig

# recipes/ has no __init__.py (torchtune owns the package name `recipes`): import from the folder.
sys.path.insert(0, str(REPO_ROOT / "recipes"))
import paper_grids  # noqa: E402

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
def test_alpaca_configs_are_a_point_of_the_papers_alpaca_grid(path):
    # §4.2.1: batch 128, 3 epochs, lr from the Alpaca grid (paper_grids, checked against the
    # paper's text in test_paper_sweep); the batch is reached by gradient accumulation.
    cfg = OmegaConf.load(path)
    assert cfg.batch_size * cfg.gradient_accumulation_steps == paper_grids.ALPACA_BATCH_SIZE
    assert cfg.epochs == paper_grids.ALPACA_EPOCHS
    assert cfg.optimizer.lr in paper_grids.ALPACA_LRS
    lorasc = LoRASCConfig.from_config(cfg.lorasc)
    if lorasc.slow_enabled:
        assert lorasc.slow_alpha in paper_grids.SLOW_ALPHAS
    if lorasc.noise_enabled:
        assert lorasc.noise_lambda in paper_grids.NOISE_LAMBDAS


def test_the_vision_config_is_a_point_of_the_papers_vision_grid():
    # §4.2.2: CLIP ViT-bigG/14 on ImageNet-1K, batch 64, 10 epochs, lr from the vision grid.
    cfg = OmegaConf.load(REPO_ROOT / "configs" / "clip_vit_bigg_imagenet.yaml")
    assert cfg.batch_size * cfg.gradient_accumulation_steps == paper_grids.VISION_BATCH_SIZE
    assert cfg.epochs == paper_grids.VISION_EPOCHS
    assert cfg.optimizer.lr in paper_grids.VISION_LRS


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
