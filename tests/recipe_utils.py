"""Tiny, fast configurations of the LoRASC recipe for tests (2-layer Llama, CPU, fp32)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Dict

import torch
from omegaconf import OmegaConf

from lorasc_tune.demo import write_demo_data, write_demo_tokenizer, write_tiny_llama2_hf_checkpoint
from lorasc_tune.recipes.lorasc_lora import LoRASCRecipeSingleDevice

TINY_ARGS = dict(vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                 intermediate_dim=128, max_seq_len=128, norm_eps=1e-5)


def make_assets(root: Path, vocab_size: int = 512) -> Dict[str, Path]:
    """Tokenizer, a 96-row instruction file and a tiny HF checkpoint under ``root``."""
    args = dict(TINY_ARGS, vocab_size=vocab_size)
    return {
        "tokenizer": write_demo_tokenizer(str(root)),
        "data": write_demo_data(str(root), num_examples=96),
        "ckpt": write_tiny_llama2_hf_checkpoint(root / f"tiny_llama2_{vocab_size}", args),
    }


def tiny_cfg(assets: Dict[str, Path], output_dir: Path, **overrides: Any):
    """A complete recipe config; ``overrides`` are dotted keys, e.g. ``{"lorasc.slow_alpha": 0}``."""
    cfg = {
        "output_dir": str(output_dir),
        "model": {"_component_": "torchtune.models.llama2.lora_llama2",
                  "lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": False,
                  "apply_lora_to_output": False, "lora_rank": 4, "lora_alpha": 8,
                  "lora_dropout": 0.0, **TINY_ARGS},
        "tokenizer": {"_component_": "torchtune.models.llama2.llama2_tokenizer",
                      "path": str(assets["tokenizer"]), "max_seq_len": 128,
                      "prompt_template": None},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer",
                         "checkpoint_dir": str(assets["ckpt"]),
                         "checkpoint_files": ["model-00001-of-00001.safetensors"],
                         "model_type": "LLAMA2", "output_dir": str(output_dir)},
        "resume_from_checkpoint": False,
        "save_every_n_steps": None,
        "dataset": {"_component_": "torchtune.datasets.alpaca_dataset", "source": "json",
                    "data_files": str(assets["data"]), "split": "train"},
        "seed": 0, "shuffle": True, "batch_size": 4,
        "lorasc": {"cascade": True, "steps_per_expert": None, "slow_alpha": 0.5,
                   "noise_lambda": 1.0, "lr_ratio_B": 1.0},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 3e-3, "weight_decay": 0.0},
        "lr_scheduler": {"_component_": "lorasc_tune.plan.get_linear_schedule_with_warmup",
                         "num_warmup_steps": 2},
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        "epochs": 3, "max_steps_per_epoch": 4, "gradient_accumulation_steps": 1,
        "clip_grad_norm": 1.0, "compile": False, "device": "cpu", "dtype": "fp32",
        "enable_activation_checkpointing": False, "enable_activation_offloading": False,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger",
                          "log_dir": str(Path(output_dir) / "logs")},
        "log_every_n_steps": 1, "log_peak_memory_stats": False,
    }
    conf = OmegaConf.create(copy.deepcopy(cfg))
    for key, value in overrides.items():
        OmegaConf.update(conf, key, value, force_add=True)
    return conf


def run_recipe(cfg, crash_at_step: int | None = None) -> LoRASCRecipeSingleDevice:
    """Set up and train in-process. ``crash_at_step`` raises inside that global step's forward,
    the way a killed job stops: after the last save, before anything of that step is applied."""
    recipe = LoRASCRecipeSingleDevice(cfg)
    recipe.setup(cfg)
    if crash_at_step is not None:
        inner = recipe._loss_step

        def loss_step(batch):
            if recipe._cascade.global_step + 1 == crash_at_step:
                raise KeyboardInterrupt(f"simulated crash in step {crash_at_step}")
            return inner(batch)

        recipe._loss_step = loss_step
        try:
            recipe.train()
        except KeyboardInterrupt:
            recipe.cleanup()
            return recipe
        raise AssertionError("the simulated crash never happened")
    recipe.train()
    recipe.cleanup()
    return recipe


def load_merged(epoch_dir: Path, output_dir: Path) -> Dict[str, torch.Tensor]:
    """Read an exported epoch folder with torchtune's *stock* HF checkpointer."""
    from torchtune.training import FullModelHFCheckpointer

    ckpt = FullModelHFCheckpointer(
        checkpoint_dir=str(epoch_dir), checkpoint_files=["model-00001-of-00001.safetensors"],
        model_type="LLAMA2", output_dir=str(output_dir))
    return ckpt.load_checkpoint()["model"]


def read_metrics(output_dir: Path):
    """Parse torchtune's DiskLogger lines, ``Step N | key:value key:value``, in file order."""
    rows = []
    for log in sorted((Path(output_dir) / "logs").glob("log_*.txt")):
        for line in log.read_text().splitlines():
            m = re.match(r"Step (\d+) \| (.*)", line)
            if m:
                vals = dict(kv.rsplit(":", 1) for kv in m.group(2).split())
                rows.append((int(m.group(1)), {k: float(v) for k, v in vals.items()}))
    return rows
