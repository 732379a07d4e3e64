"""Every shipped config parses, and its lorasc block validates; ablations match the generator."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from shared_paths import REPO_ROOT
from lorasc_tune.config import LoRASCConfig

LLM_CONFIGS = sorted(p for p in (REPO_ROOT / "configs").rglob("*.yaml")
                     if OmegaConf.load(p).get("lorasc") is not None)


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
