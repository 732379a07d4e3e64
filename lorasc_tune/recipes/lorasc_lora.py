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

* Outputs: ``${output_dir}/epoch_{N}/`` holds the merged model, written through the
  checkpointer into a staging folder and moved into place, so a crash never leaves a
  half-written epoch folder. The merge is computed into new tensors, never into the live
  weights. It is the model after epoch N's merges, without the next expert's noise. Where
  ``W_T - W_0`` is exactly low-rank (noise off, or cascade off), or with
  ``lorasc.adapter_export_rank: k``, ``epoch_{N}/adapter/`` also holds it as a PEFT LoRA
  adapter (``lorasc_tune/peft_export.py``); ``save_adapter_weights_only: true`` writes only that.
* Resume: ``${output_dir}/lorasc_state/training_state_<step>.pt`` holds the current base of every
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
from typing import Dict

import torch
from omegaconf import DictConfig
from torchtune import config, training, utils
from torchtune.recipe_interfaces import FTRecipeInterface

from lorasc_tune.checkpoint import load_training_state, restore_training_state, save_training_state
from lorasc_tune.config import validate_recipe_config
from lorasc_tune.io import removed_on_error
from lorasc_tune.plan import steps_per_epoch
from lorasc_tune.sampling import build_dataloader
from lorasc_tune import recipe_common as common

log = utils.get_logger("INFO")


class LoRASCRecipeSingleDevice(FTRecipeInterface):
    """LoRASC on one device (CUDA, CPU, MPS...). See the module docstring for the behaviour."""

    def __init__(self, cfg: DictConfig) -> None:
        # Every key is checked before anything touches the disk.
        validate_recipe_config(cfg)
        self._device, self._dtype = common.device_and_dtype(cfg)
        self._run = common.RunSettings.from_config(cfg, self._device)

    # ---- setup ------------------------------------------------------------------------------

    def setup(self, cfg: DictConfig) -> None:
        # 1. Inputs that can be wrong are read and checked first; nothing is written until
        # step 5, so a run (or resume) that is refused leaves output_dir as it was.
        self._tokenizer, self._loss_fn, dataset, resume_state, self._run = common.read_llm_inputs(
            cfg, self._run, load_training_state)

        # A failure from here on removes the output folder if this run created it.
        with removed_on_error(self._run.output_dir):
            run = self._run
            # 2. The base checkpoint and the model.
            self._checkpointer, base_state = common.load_base_checkpoint(cfg)
            with training.set_default_dtype(self._dtype), self._device:
                self._model = config.instantiate(cfg.model)
            common.prepare_lora_model(self._model, cfg, run)
            common.check_checkpoint_fits(self._model,
                                         *self._model.load_state_dict(base_state, strict=False))
            self._activations_ctx = training.get_act_offloading_ctx_manager(
                self._model, run.activation_offloading)
            if self._loss_fn.__class__.__name__ == "CEWithChunkedOutputLoss":
                self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)
            if cfg.compile:
                self._loss_fn = training.compile_loss(self._loss_fn)

            # 3. Data, and the cascade over the run's optimizer steps. The checkpoint as loaded
            # seeds the engine's full-precision masters (QLoRA/QDoRA, merge_precision:
            # fp32_master), so they start from the original weights, not their rounding.
            self._sampler, self._dataloader = build_dataloader(
                dataset, cfg, pad_id=self._tokenizer.pad_id,
                ignore_idx=self._loss_fn.ignore_index, seed=run.seed)
            self._cascade = common.cascade_from_config(
                self._model, cfg, run, device=self._device, master_source=base_state,
                steps_per_epoch=steps_per_epoch(len(self._dataloader), run.grad_accum,
                                                cfg.get("max_steps_per_epoch", None)),
                global_batch_size=cfg.batch_size * run.grad_accum,
                throughput_name="tokens_per_second_per_gpu")
            del base_state
            # PEFT adapters: refused here (before any write) if save_adapter_weights_only asks
            # for one that cannot be written; otherwise why none is written is said once.
            self._adapter_problem = common.check_adapter_export(self._cascade,
                                                                self._checkpointer, run)

            # 4. The saved state of an interrupted run, checked against this one; a fresh run
            # begins its first expert at its first step.
            if resume_state is not None:
                restore_training_state(self._model, self._cascade, resume_state)

            # 5. Every check passed: now write (crash leftovers cleared, metric logger).
            self._metric_logger = common.start_writing(cfg, run, self._cascade)
            log.info(self._cascade.describe_plan())
            if resume_state is not None:
                log.info(self._cascade.describe_resume())
            self._profiler = common.setup_profiler(cfg.get("profiler", None))

    # ---- training ---------------------------------------------------------------------------

    def _loss_step(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return common.lm_loss(self._model, self._loss_fn, batch, self._activations_ctx)

    def train(self) -> None:
        c, run = self._cascade, self._run
        with self._profiler as prof:
            for epoch in range(c.epoch, run.epochs):
                for micro_batches in common.optimizer_steps(self._dataloader, self._sampler, c,
                                                            epoch, run.grad_accum):
                    c.begin_step()
                    loss_sum, num_tokens = common.backward_token_sums(
                        micro_batches, self._device, self._loss_fn.ignore_index, self._loss_step)
                    training.scale_grads(self._model, 1 / num_tokens)
                    c.step(loss_sum / num_tokens, num_items=num_tokens)
                    if run.periodic_save_due(c):
                        self._save_state()
                    prof.step()
                self.save_checkpoint(epoch)

    # ---- saving -----------------------------------------------------------------------------

    def _save_state(self) -> None:
        save_training_state(self._run.output_dir, self._model, self._cascade, seed=self._run.seed)

    def save_checkpoint(self, epoch: int) -> None:
        """Write ``epoch_{epoch}/`` (the merged model and/or the PEFT adapter), then the
        training state."""
        self._run.end_epoch(self._cascade, lambda: self._export(epoch), self._save_state)

    def _export(self, epoch: int) -> None:
        t0 = time.perf_counter()
        # Fold from the engine's masters where it keeps them (QLoRA: the full-precision
        # source of truth, not the NF4 weight); the export is never quantized.
        self.last_output_path = common.export_epoch(
            self._checkpointer, self._model, self._cascade, self._run, epoch,
            with_adapter=self._adapter_problem is None,
            masters=self._cascade.engine.master_weights(), device=self._device)
        log.info(f"Epoch {epoch}: {self._run.export_name} saved to {self.last_output_path} "
                 f"in {time.perf_counter() - t0:.1f}s")

    def cleanup(self) -> None:
        self._metric_logger.close()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run lorasc_tune/recipes/lorasc_lora.py --config <yaml> [k=v ...]``."""
    config.log_config(recipe_name="LoRASCRecipeSingleDevice", cfg=cfg)
    common.run_recipe(LoRASCRecipeSingleDevice, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
