# Copyright (c) lorasc-tune contributors. BSD-3-Clause.
"""LoRASC fine-tuning on a single device, as a torchtune recipe.

    tune run lorasc_tune/recipes/lorasc_lora.py --config configs/llama2_7b_alpaca.yaml

This is torchtune's single-device LoRA recipe with LoRA Slow Cascade learning added at the
expert boundaries. The loop reads like a plain LoRA loop; the cascade appears in four places:

    engine.begin_expert()                    # fresh fast expert; noise on W for t > 1
    optimizer, lr_scheduler = fresh ones     # the whole schedule compressed into this expert
    ...ordinary LoRA steps...
    engine.end_expert()                      # slow update, W ← W̃ + s·B_slow·A_slow

What it keeps from the stock recipe: HF/Meta/torchtune checkpointers, gradient accumulation,
gradient clipping, activation checkpointing and offloading, ``compile``, metric loggers,
the profiler, ``max_steps_per_epoch``. What it does differently, on purpose:

* Outputs: ``${output_dir}/epoch_{N}/`` holds the merged model (no adapter), written through
  the checkpointer into a staging folder and moved into place, so a crash never leaves a
  half-written epoch folder. The merge is computed into new tensors, never into the live
  weights.
* Resume: ``${output_dir}/lorasc_state/training_state.pt`` holds the current base of every
  adapted matrix plus the adapter, engine, optimizer and scheduler state, and the position
  in the data. ``resume_from_checkpoint: true`` continues exactly where it stopped, mid-epoch
  or mid-expert included (``save_every_n_steps`` sets how often it is written).
* Precision: ``lorasc.merge_precision`` sets how merges and noise are stored in a bf16 base
  (docs/merge_precision.md). QLoRA/QDoRA models (``qlora_*`` builders, ``quantize_base:
  True``) work too: the engine keeps a full-precision copy of each adapted matrix on CPU,
  merges into it and requantizes the NF4 weight from it; the export folds from that copy.
* Safety: a non-finite loss or gradient norm stops the run before the optimizer step, naming
  the step and expert; a non-finite adapter is never merged or saved. The last saved state
  stays intact.
* The next expert begins (and its noise is added) at its first step, not when the last one
  ends, so ``epoch_{N}/`` is the merged model of that epoch without the next expert's noise.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, ListConfig
from torch.utils.data import ConcatDataset
from torchtune import config, modules, training, utils
from torchtune.modules.peft import get_adapter_params, set_trainable_params
from torchtune.recipe_interfaces import FTRecipeInterface
from torchtune.training import DummyProfiler, PROFILER_KEY
from tqdm import tqdm

from lorasc_tune.adapters import init_dora_magnitudes, merged_state_dict
from lorasc_tune.cascade import CascadeEngine
from lorasc_tune.checkpoint import (
    capture_training_state,
    load_training_state,
    restore_model_state,
    save_training_state,
)
from lorasc_tune.config import (
    LoRASCConfig,
    check_checkpoint_files,
    check_dataset_rows,
    check_tokenizer_file,
    validate_recipe_config,
)
from lorasc_tune.io import removed_on_error, replace_dir
from lorasc_tune.plan import ExpertPlan, build_expert_optimizer, steps_per_epoch
from lorasc_tune.sampling import build_dataloader

log = utils.get_logger("INFO")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/Inf; nothing from that step was applied or saved."""


class LoRASCRecipeSingleDevice(FTRecipeInterface):
    """LoRASC on one device (CUDA, CPU, MPS...). See the module docstring for the behaviour."""

    def __init__(self, cfg: DictConfig) -> None:
        # Every key is checked before anything touches the disk.
        validate_recipe_config(cfg)
        self._lorasc = LoRASCConfig.from_config(cfg.get("lorasc", None))

        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        if self._dtype == torch.float16:
            raise ValueError("fp16 is not supported (no gradient scaling); use fp32 or bf16")

        self._output_dir = Path(cfg.output_dir)
        self._log_every_n_steps = cfg.get("log_every_n_steps", None) or 1
        self._log_peak_memory_stats = cfg.get("log_peak_memory_stats", False) and \
            self._device.type == "cuda"
        self._save_every_n_steps = cfg.get("save_every_n_steps", None)
        # Sweeps with a 7B model may want only the last merged model (13.5 GB per epoch).
        self._save_final_model_only = cfg.get("save_final_model_only", False)
        self.seed = training.set_seed(seed=cfg.seed,
                                      debug_mode=cfg.get("cudnn_deterministic_mode", None))
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch", None)
        self._resume = cfg.get("resume_from_checkpoint", False)
        self._grad_accum = cfg.gradient_accumulation_steps
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        self._act_ckpt = cfg.get("enable_activation_checkpointing", False)
        self._act_offload = cfg.get("enable_activation_offloading", False)
        if self._act_offload and (self._device.type != "cuda" or not self._act_ckpt):
            raise ValueError("enable_activation_offloading needs CUDA and "
                             "enable_activation_checkpointing: true")

        self.epochs_run = 0
        self.global_step = 0
        self._steps_done_in_epoch = 0

    # ---- setup ------------------------------------------------------------------------------

    def setup(self, cfg: DictConfig) -> None:
        # 1. Inputs that can be wrong are read and checked first; nothing is written yet.
        check_checkpoint_files(cfg.checkpointer)
        check_tokenizer_file(cfg.tokenizer)
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._loss_fn = config.instantiate(cfg.loss)
        dataset = self._build_dataset(cfg.dataset)
        if cfg.get("validate_dataset", True):
            check_dataset_rows(dataset)
        resume_state = load_training_state(self._output_dir) if self._resume else None

        # A failure from here on removes the output folder if this run created it.
        with removed_on_error(self._output_dir):
            # 2. Components that write: metric logger, checkpointer.
            self._metric_logger = config.instantiate(cfg.metric_logger)
            self._metric_logger.log_config(cfg)
            self._checkpointer = config.instantiate(cfg.checkpointer, should_load_recipe_state=False)
            base_state = self._checkpointer.load_checkpoint()[training.MODEL_KEY]

            # 3. Model, with the LoRASC engine over its adapters.
            self._model = self._setup_model(cfg, base_state)
            # The checkpoint as loaded seeds the engine's full-precision masters (QLoRA/QDoRA,
            # merge_precision: fp32_master), so they start from the original weights rather than
            # from their NF4 quantization or bf16 rounding.
            self._engine = CascadeEngine(self._model, self._lorasc, seed=self.seed,
                                         master_source=base_state)
            del base_state
            if self._loss_fn.__class__.__name__ == "CEWithChunkedOutputLoss":
                self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)
            if cfg.compile:
                self._loss_fn = training.compile_loss(self._loss_fn)

            # 4. Data and the expert plan over global optimizer steps.
            self._batch_size = cfg.batch_size
            self._sampler, self._dataloader = build_dataloader(
                dataset, cfg, pad_id=self._tokenizer.pad_id,
                ignore_idx=self._loss_fn.ignore_index, seed=self.seed)
            self._steps_per_epoch = steps_per_epoch(len(self._dataloader), self._grad_accum,
                                                    self.max_steps_per_epoch)
            self._plan = ExpertPlan.build(self._lorasc, self._steps_per_epoch, self.total_epochs)
            self._cfg_optimizer, self._cfg_lr_scheduler = cfg.optimizer, cfg.get("lr_scheduler")
            log.info(f"LoRASC: {self._plan.num_experts} expert(s) over {self._plan.total_steps} "
                     f"steps ({self._steps_per_epoch}/epoch); {self._lorasc}")

            # 5. The first expert (or the saved state of the interrupted one).
            if resume_state is None:
                self._start_expert()
            else:
                self._resume_from(resume_state)

            self._profiler = self._setup_profiler(cfg.get(PROFILER_KEY, None))
            self._ignore_labels_cache = torch.full((cfg.batch_size, 1), self._loss_fn.ignore_index,
                                                   device=self._device)

    def _build_dataset(self, cfg_dataset: DictConfig):
        if isinstance(cfg_dataset, ListConfig):
            return ConcatDataset([config.instantiate(c, self._tokenizer) for c in cfg_dataset])
        return config.instantiate(cfg_dataset, self._tokenizer)

    def _setup_model(self, cfg: DictConfig, base_state: Dict[str, Any]) -> torch.nn.Module:
        with training.set_default_dtype(self._dtype), self._device:
            model = config.instantiate(cfg.model)
        set_trainable_params(model, get_adapter_params(model))
        if cfg.compile:
            training.compile_model(model)
        if self._act_ckpt:
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

    def _start_expert(self) -> None:
        """Begin the next expert: engine step, then a fresh optimizer and compressed schedule."""
        t0 = time.perf_counter()
        noise = self._engine.begin_expert()
        if self._engine.expert == 1:
            # DoRA's magnitude starts as the row norm of W; later experts keep training it.
            init_dora_magnitudes(self._model)
        self._build_optimizer()
        widths = list(noise.values())
        self._metric_logger.log_dict(
            {"expert": self._engine.expert,
             "noise_std_mean": sum(widths) / len(widths),
             **{f"noise_std/{name}": w for name, w in noise.items()},
             "boundary_seconds": time.perf_counter() - t0},
            step=self.global_step)

    def _build_optimizer(self) -> None:
        self._optimizer, self._lr_scheduler = build_expert_optimizer(
            self._model, self._cfg_optimizer, self._cfg_lr_scheduler, self._lorasc,
            self._plan, expert=self._engine.expert, global_step=self.global_step)

    def _run_shape(self) -> Dict[str, int]:
        """What a resume must not change: it fixes which samples and steps were already done."""
        return {"steps_per_epoch": self._steps_per_epoch,
                "global_batch_size": self._batch_size * self._grad_accum}

    def _resume_from(self, state: Dict[str, Any]) -> None:
        saved_shape = state.get("run_shape")  # absent in states written before it was saved
        if saved_shape is not None and saved_shape != self._run_shape():
            raise ValueError(f"the saved state was written with {saved_shape}, this config gives "
                             f"{self._run_shape()}; resume with the original batch_size, "
                             f"gradient_accumulation_steps and max_steps_per_epoch")
        restore_model_state(self._model, self._engine, state)
        self.epochs_run = state["epochs_run"]
        self.global_step = state["global_step"]
        self._steps_done_in_epoch = state["steps_done_in_epoch"]
        self._plan.check_resume_position(self.global_step, self._engine.expert,
                                         self._engine.expert_open)
        if self._engine.expert_open:
            self._build_optimizer()
            self._optimizer.load_state_dict(state["optimizer"])
            if self._lr_scheduler is not None:
                self._lr_scheduler.load_state_dict(state["lr_scheduler"])
        # Otherwise the state was saved at a boundary: the training loop begins the next expert.
        where = "" if self._engine.expert_open else " finished, the next begins now"
        log.info(f"Resumed at epoch {self.epochs_run}, step {self.global_step}, "
                 f"expert {self._engine.expert}{where}")

    def _setup_profiler(self, cfg_profiler: Optional[DictConfig]):
        if cfg_profiler is None or not cfg_profiler.get("enabled", False):
            return DummyProfiler()
        if cfg_profiler.get("_component_", None) is None:
            cfg_profiler["_component_"] = "torchtune.training.setup_torch_profiler"
        profiler, _ = config.instantiate(cfg_profiler)
        return profiler

    # ---- training ---------------------------------------------------------------------------

    def _loss_step(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch.pop("labels")
        with self._activations_ctx:
            logits = self._model(**batch)
        # Predict token i+1 at position i: shift labels left, pad with ignore_index.
        labels = torch.hstack((labels[..., 1:], self._ignore_labels_cache[: labels.shape[0]]))
        if not isinstance(logits, list):
            labels = labels.reshape(-1)
            logits = logits.reshape(-1, logits.size(-1))
        return self._loss_fn(logits, labels)

    def train(self) -> None:
        n_experts = self._plan.num_experts
        with self._profiler as prof:
            for epoch in range(self.epochs_run, self.total_epochs):
                skip_steps = self._steps_done_in_epoch
                self._sampler.set_epoch(epoch, skip=skip_steps * self._grad_accum *
                                        self._batch_size)
                pbar = tqdm(total=self._steps_per_epoch, initial=skip_steps)
                running_loss, num_tokens, t0 = 0.0, 0, time.perf_counter()
                for idx, batch in enumerate(self._dataloader):
                    if skip_steps + idx // self._grad_accum >= self._steps_per_epoch:
                        break
                    if idx % self._grad_accum == 0 and not self._engine.expert_open:
                        # The next expert begins here, not when the last one ended, so that the
                        # epoch's export and saved state hold the merged W without its noise.
                        self._start_expert()
                        t0 = time.perf_counter()  # throughput counts training, not the boundary
                    utils.batch_to_device(batch, self._device)
                    tokens = (batch["labels"] != self._loss_fn.ignore_index).sum()
                    # Sum of token losses, so accumulation normalises by all tokens at once.
                    loss = self._loss_step(batch) * tokens
                    running_loss = running_loss + loss.detach()
                    num_tokens += tokens
                    loss.backward()
                    if (idx + 1) % self._grad_accum != 0:
                        prof.step()
                        continue

                    step_loss = (running_loss / num_tokens).item()
                    if not torch.isfinite(torch.tensor(step_loss)):
                        raise NonFiniteLossError(
                            f"loss is {step_loss} at global step {self.global_step + 1} "
                            f"(epoch {epoch + 1}, expert {self._engine.expert}); stopping before "
                            f"the optimizer step. The last saved state is intact.")
                    training.scale_grads(self._model, 1 / num_tokens)
                    grad_norm = None
                    if self._clip_grad_norm is not None:
                        grad_norm = torch.nn.utils.clip_grad_norm_(
                            self._model.parameters(), max_norm=float(self._clip_grad_norm))
                        if not torch.isfinite(grad_norm):
                            raise NonFiniteLossError(
                                f"gradient norm is {float(grad_norm)} at global step "
                                f"{self.global_step + 1} (epoch {epoch + 1}, expert "
                                f"{self._engine.expert}); stopping before the optimizer step. "
                                f"The last saved state is intact.")
                    self._optimizer.step()
                    self._optimizer.zero_grad(set_to_none=True)
                    # The learning rates this step used (LoRA+ puts B in the last group).
                    lr = self._optimizer.param_groups[0]["lr"]
                    lr_B = self._optimizer.param_groups[-1]["lr"]
                    if self._lr_scheduler is not None:
                        self._lr_scheduler.step()
                    self.global_step += 1
                    self._steps_done_in_epoch = skip_steps + (idx + 1) // self._grad_accum

                    pbar.update(1)
                    pbar.set_description(
                        f"expert {self._engine.expert}/{n_experts}|epoch {epoch + 1}|"
                        f"step {self.global_step}|loss {step_loss:.4f}")
                    if self.global_step % self._log_every_n_steps == 0:
                        metrics = {"loss": step_loss, "lr": lr, "expert": self._engine.expert,
                                   "tokens_per_second_per_gpu":
                                       float(num_tokens) / (time.perf_counter() - t0)}
                        if len(self._optimizer.param_groups) > 1:
                            metrics["lr_B"] = lr_B
                        if grad_norm is not None:
                            metrics["grad_norm"] = float(grad_norm)
                        if self._log_peak_memory_stats:
                            metrics.update(training.get_memory_stats(device=self._device))
                        self._metric_logger.log_dict(metrics, step=self.global_step)

                    if self._plan.ends_expert(self.global_step):
                        self._engine.end_expert()
                    end_of_epoch = self._steps_done_in_epoch == self._steps_per_epoch
                    if (self._save_every_n_steps and not end_of_epoch
                            and self.global_step % self._save_every_n_steps == 0):
                        self._save_state(epochs_run=epoch)
                    running_loss, num_tokens, t0 = 0.0, 0, time.perf_counter()
                    prof.step()
                pbar.close()

                self.epochs_run = epoch + 1
                self._steps_done_in_epoch = 0
                self.save_checkpoint(epoch)

    # ---- saving -----------------------------------------------------------------------------

    def _save_state(self, epochs_run: int) -> None:
        # Never replace the last good state with a broken adapter (e.g. NaN from a bad step
        # without gradient clipping): this raises first, naming the layer.
        self._engine.check_finite()
        state = capture_training_state(
            self._model, self._engine, self._optimizer, self._lr_scheduler or _NoScheduler(),
            epochs_run=epochs_run, steps_done_in_epoch=self._steps_done_in_epoch,
            global_step=self.global_step, seed=self.seed, extra={"run_shape": self._run_shape()})
        save_training_state(self._output_dir, state)

    def save_checkpoint(self, epoch: int) -> None:
        """Write ``epoch_{epoch}/`` (merged model) and, while training goes on, the state."""
        t0 = time.perf_counter()
        if self.epochs_run < self.total_epochs:
            self._save_state(epochs_run=self.epochs_run)
            if self._save_final_model_only:
                return
        staging = self._output_dir / ".staging"
        final_dir = self._output_dir / f"epoch_{epoch}"
        # torchtune's checkpointers write into ``<_output_dir>/epoch_N``; point them at a
        # staging folder so the real epoch folder appears only once it is complete.
        real_output_dir = self._checkpointer._output_dir
        self._checkpointer._output_dir = staging
        try:
            # Fold from the engine's masters where it keeps them (QLoRA: the full-precision
            # source of truth, not the NF4 weight); the export is never quantized.
            merged = merged_state_dict(self._model, self._engine.master_weights())
            self._checkpointer.save_checkpoint({training.MODEL_KEY: merged},
                                               epoch=epoch, intermediate_checkpoint=False)
        finally:
            self._checkpointer._output_dir = real_output_dir
        replace_dir(staging / f"epoch_{epoch}", final_dir)
        log.info(f"Merged model for epoch {epoch + 1} saved to {final_dir} "
                 f"in {time.perf_counter() - t0:.1f}s")
        self.last_output_path = final_dir

    def cleanup(self) -> None:
        self._metric_logger.close()


class _NoScheduler:
    def state_dict(self) -> Dict[str, Any]:
        return {}


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run lorasc_tune/recipes/lorasc_lora.py --config <yaml> [k=v ...]``."""
    config.log_config(recipe_name="LoRASCRecipeSingleDevice", cfg=cfg)
    recipe = LoRASCRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()
    print(f"LoRASC: merged model written to {recipe.last_output_path}")


if __name__ == "__main__":
    sys.exit(recipe_main())
