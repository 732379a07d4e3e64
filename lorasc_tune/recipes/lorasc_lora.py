# Copyright (c) lorasc-tune contributors. BSD-3-Clause.
"""LoRASC fine-tuning on a single device, as a torchtune recipe.

    tune run lorasc_tune/recipes/lorasc_lora.py --config configs/llama2_7b_alpaca.yaml

This is torchtune's single-device LoRA recipe with LoRA Slow Cascade learning added by one
driver, :class:`lorasc_tune.driver.Cascade`, which the loop calls twice per optimizer step:

    cascade.begin_step()     # begins the next expert when due: fresh A/B, noise on W, fresh
                             #   optimizer with the whole schedule compressed into the expert
    ...forward, backward...
    cascade.step(loss)       # non-finite checks, optimizer step; at an expert's last step the
                             #   slow update and merge, W <- W~ + s*B_slow*A_slow

What it keeps from the stock recipe: HF/Meta/torchtune checkpointers, gradient accumulation,
gradient clipping, activation checkpointing and offloading, ``compile``, metric loggers,
the profiler, ``max_steps_per_epoch``. What it does differently, on purpose:

* Outputs: ``${output_dir}/epoch_{N}/`` holds the merged model (no adapter), written through
  the checkpointer into a staging folder and moved into place, so a crash never leaves a
  half-written epoch folder. The merge is computed into new tensors, never into the live
  weights. It is the model after epoch N's merges, without the next expert's noise.
* Resume: ``${output_dir}/lorasc_state/training_state.pt`` holds the current base of every
  adapted matrix plus the adapter, cascade, optimizer and scheduler state. ``resume_from_
  checkpoint: true`` continues exactly where it stopped, mid-epoch or mid-expert included
  (``save_every_n_steps`` sets how often it is written).
* Precision: ``lorasc.merge_precision`` sets how merges and noise are stored in a bf16 base
  (docs/merge_precision.md). QLoRA/QDoRA models (``qlora_*`` builders, ``quantize_base:
  True``) work too: the engine keeps a full-precision copy of each adapted matrix on CPU,
  merges into it and requantizes the NF4 weight from it; the export folds from that copy.
* Safety: a non-finite loss or gradient norm stops the run before the optimizer step, naming
  the step and expert, with exit code 3; a non-finite adapter is never merged or saved.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict

import torch
from omegaconf import DictConfig
from torchtune import config, modules, training, utils
from torchtune.modules.peft import get_adapter_params, set_trainable_params
from torchtune.recipe_interfaces import FTRecipeInterface

from lorasc_tune.adapters import merged_state_dict
from lorasc_tune.checkpoint import load_training_state, restore_training_state, save_training_state
from lorasc_tune.config import validate_recipe_config
from lorasc_tune.driver import Cascade
from lorasc_tune.io import removed_on_error
from lorasc_tune.plan import steps_per_epoch
from lorasc_tune.recipe_common import (
    backward_token_sums,
    device_and_dtype,
    lm_loss,
    optimizer_steps,
    read_llm_inputs,
    run_recipe,
    save_with_checkpointer,
    setup_profiler,
)
from lorasc_tune.sampling import build_dataloader

log = utils.get_logger("INFO")


class LoRASCRecipeSingleDevice(FTRecipeInterface):
    """LoRASC on one device (CUDA, CPU, MPS...). See the module docstring for the behaviour."""

    def __init__(self, cfg: DictConfig) -> None:
        # Every key is checked before anything touches the disk.
        validate_recipe_config(cfg)
        self._device, self._dtype = device_and_dtype(cfg)
        self._output_dir = Path(cfg.output_dir)
        self._save_every_n_steps = cfg.get("save_every_n_steps", None)
        # Sweeps with a 7B model may want only the last merged model (13.5 GB per epoch).
        self._save_final_model_only = cfg.get("save_final_model_only", False)
        self.seed = training.set_seed(seed=cfg.seed,
                                      debug_mode=cfg.get("cudnn_deterministic_mode", None))
        self.total_epochs = cfg.epochs
        self._resume = cfg.get("resume_from_checkpoint", False)
        self._grad_accum = cfg.gradient_accumulation_steps
        self._act_offload = cfg.get("enable_activation_offloading", False)
        if self._act_offload and (self._device.type != "cuda"
                                  or not cfg.get("enable_activation_checkpointing", False)):
            raise ValueError("enable_activation_offloading needs CUDA and "
                             "enable_activation_checkpointing: true")

    # ---- setup ------------------------------------------------------------------------------

    def setup(self, cfg: DictConfig) -> None:
        # 1. Inputs that can be wrong are read and checked first; nothing is written yet.
        self._tokenizer, self._loss_fn, dataset = read_llm_inputs(cfg)
        resume_state = load_training_state(self._output_dir) if self._resume else None

        # A failure from here on removes the output folder if this run created it.
        with removed_on_error(self._output_dir):
            # 2. Components that write: metric logger, checkpointer.
            self._metric_logger = config.instantiate(cfg.metric_logger)
            self._metric_logger.log_config(cfg)
            self._checkpointer = config.instantiate(cfg.checkpointer, should_load_recipe_state=False)
            base_state = self._checkpointer.load_checkpoint()[training.MODEL_KEY]

            # 3. Model.
            self._model = self._setup_model(cfg, base_state)
            if self._loss_fn.__class__.__name__ == "CEWithChunkedOutputLoss":
                self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)
            if cfg.compile:
                self._loss_fn = training.compile_loss(self._loss_fn)

            # 4. Data, and the cascade over the run's optimizer steps.
            self._sampler, self._dataloader = build_dataloader(
                dataset, cfg, pad_id=self._tokenizer.pad_id,
                ignore_idx=self._loss_fn.ignore_index, seed=self.seed)
            # The checkpoint as loaded seeds the engine's full-precision masters (QLoRA/QDoRA,
            # merge_precision: fp32_master), so they start from the original weights rather
            # than from their NF4 quantization or bf16 rounding.
            self._cascade = Cascade(
                self._model, cfg.get("lorasc", None), seed=self.seed,
                steps_per_epoch=steps_per_epoch(len(self._dataloader), self._grad_accum,
                                                cfg.get("max_steps_per_epoch", None)),
                epochs=self.total_epochs, optimizer=cfg.optimizer,
                lr_scheduler=cfg.get("lr_scheduler", None),
                clip_grad_norm=cfg.get("clip_grad_norm", None),
                global_batch_size=cfg.batch_size * self._grad_accum, master_source=base_state,
                metric_logger=self._metric_logger,
                log_every_n_steps=cfg.get("log_every_n_steps", None),
                throughput_name="tokens_per_second_per_gpu",
                memory_device=self._device if cfg.get("log_peak_memory_stats", False)
                and self._device.type == "cuda" else None)
            del base_state
            c = self._cascade
            log.info(f"LoRASC: {c.num_experts} expert(s) over {c.plan.total_steps} steps "
                     f"({c.steps_per_epoch}/epoch); {c.cfg}")

            # 5. The saved state of an interrupted run; a fresh run begins its first expert at
            # its first step.
            if resume_state is not None:
                restore_training_state(self._model, c, resume_state)
                log.info(c.describe_resume())
            self._profiler = setup_profiler(cfg.get("profiler", None))

    def _setup_model(self, cfg: DictConfig, base_state: Dict[str, Any]) -> torch.nn.Module:
        with training.set_default_dtype(self._dtype), self._device:
            model = config.instantiate(cfg.model)
        set_trainable_params(model, get_adapter_params(model))
        if cfg.compile:
            training.compile_model(model)
        if cfg.get("enable_activation_checkpointing", False):
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        missing, unexpected = model.load_state_dict(base_state, strict=False)
        adapter_keys = set(get_adapter_params(model))
        missing = [k for k in missing if k not in adapter_keys]
        if missing or unexpected:
            raise ValueError(
                f"the checkpoint does not fit cfg.model: missing {missing[:5]}, "
                f"unexpected {list(unexpected)[:5]}")
        self._activations_ctx = training.get_act_offloading_ctx_manager(model, self._act_offload)
        return model

    # ---- training ---------------------------------------------------------------------------

    def _loss_step(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return lm_loss(self._model, self._loss_fn, batch, self._activations_ctx)

    def train(self) -> None:
        c = self._cascade
        with self._profiler as prof:
            for epoch in range(c.epoch, self.total_epochs):
                for micro_batches in optimizer_steps(self._dataloader, self._sampler, c, epoch,
                                                     self._grad_accum):
                    c.begin_step()
                    loss_sum, num_tokens = backward_token_sums(
                        micro_batches, self._device, self._loss_fn.ignore_index, self._loss_step)
                    training.scale_grads(self._model, 1 / num_tokens)
                    c.step(loss_sum / num_tokens, num_items=num_tokens)
                    if (self._save_every_n_steps and c.steps_done_in_epoch
                            and c.global_step % self._save_every_n_steps == 0):
                        self._save_state()
                    prof.step()
                self.save_checkpoint(epoch)

    # ---- saving -----------------------------------------------------------------------------

    def _save_state(self) -> None:
        save_training_state(self._output_dir, self._model, self._cascade, seed=self.seed)

    def save_checkpoint(self, epoch: int) -> None:
        """Write ``epoch_{epoch}/`` (merged model) and, while training goes on, the state."""
        t0 = time.perf_counter()
        if not self._cascade.finished:
            self._save_state()
            if self._save_final_model_only:
                return
        # Fold from the engine's masters where it keeps them (QLoRA: the full-precision
        # source of truth, not the NF4 weight); the export is never quantized.
        merged = merged_state_dict(self._model, self._cascade.engine.master_weights())
        self.last_output_path = save_with_checkpointer(self._checkpointer, merged,
                                                       self._output_dir, epoch)
        log.info(f"Merged model for epoch {epoch} saved to {self.last_output_path} "
                 f"in {time.perf_counter() - t0:.1f}s")

    def cleanup(self) -> None:
        self._metric_logger.close()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run lorasc_tune/recipes/lorasc_lora.py --config <yaml> [k=v ...]``."""
    config.log_config(recipe_name="LoRASCRecipeSingleDevice", cfg=cfg)
    run_recipe(LoRASCRecipeSingleDevice, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
