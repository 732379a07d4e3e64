# Copyright (c) lorasc-tune contributors. BSD-3-Clause.
"""LoRASC fine-tuning with FSDP2 on several processes, GPUs or CPUs, as a torchtune recipe.

    tune run --nnodes 1 --nproc_per_node 8 lorasc_tune/recipes/lorasc_lora_distributed.py \
        --config configs/llama2_7b_alpaca.yaml

The single-device recipe (``lorasc_lora.py``) with the model sharded by FSDP2 ``fully_shard``
per layer. The process group is NCCL on CUDA and gloo on CPU (``device: cpu``), so it also
runs, and is tested, on machines without GPUs. The cascade runs on the shards themselves:

* merge and slow update: each rank updates its own rows of ``W`` from its rows of ``B`` and the
  gathered ``A`` (``r × d_in``, small); nothing gathers a full weight;
* ``std(s·B_slow·A_slow)``: two partial sums per matrix, all-reduced, identical on all ranks;
* noise and each expert's ``A``: counter-based, a function of (seed, expert, layer, element),
  so the merged weights do not depend on the world size.

Outputs: ``${output_dir}/epoch_{N}/`` is the merged model, consolidated on rank 0 in the
checkpointer's format (loadable by the single-device recipe and torchtune's checkpointers).
``${output_dir}/lorasc_state/step_<N>/`` is a sharded training state (torch.distributed
.checkpoint); ``resume_from_checkpoint: true`` continues from the newest one, also with a
different number of processes as long as the global batch (``batch_size × processes``) is the
same.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict

import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig
from torch.utils.data import ConcatDataset
from torchtune import config, modules, training, utils
from torchtune.modules.peft import DoRALinear, LoRALinear, get_adapter_params, set_trainable_params
from torchtune.recipe_interfaces import FTRecipeInterface
from tqdm import tqdm

from lorasc_tune.adapters import fold_adapters_in_state_dict, init_dora_magnitudes
from lorasc_tune.cascade import CascadeEngine
from lorasc_tune.checkpoint import (
    latest_sharded_state,
    load_full_optimizer_state,
    load_sharded_training_state,
    save_sharded_training_state,
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


class LoRASCRecipeDistributed(FTRecipeInterface):
    """LoRASC under FSDP2. See the module docstring for the behaviour."""

    def __init__(self, cfg: DictConfig) -> None:
        validate_recipe_config(cfg)
        self._lorasc = LoRASCConfig.from_config(cfg.get("lorasc", None))
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        if self._dtype == torch.float16:
            raise ValueError("fp16 is not supported (no gradient scaling); use fp32 or bf16")
        if _is_quantized_base(cfg.model):
            # NF4's scales are per-matrix statistics, so requantizing from a master is not a
            # row-local operation on FSDP2 shards (docs/merge_precision.md).
            raise ValueError(
                "QLoRA/QDoRA (quantize_base: True or a qlora_* model) is supported by the "
                "single-device recipe only (lorasc_tune/recipes/lorasc_lora.py); the "
                "distributed recipe needs a bf16/fp32 base")
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self._is_rank_zero = self.rank == 0

        self._output_dir = Path(cfg.output_dir)
        self._log_every_n_steps = cfg.get("log_every_n_steps", None) or 1
        self._log_peak_memory_stats = cfg.get("log_peak_memory_stats", False) and \
            self._device.type == "cuda"
        self._save_every_n_steps = cfg.get("save_every_n_steps", None)
        # Sweeps with a 7B model may want only the last merged model (13.5 GB per epoch).
        self._save_final_model_only = cfg.get("save_final_model_only", False)
        self._keep_last_n_states = cfg.get("keep_last_n_states", 1)
        # Every rank draws the same numbers: the cascade's own draws are counter-based, and the
        # model's (dropout) are per rank anyway.
        self.seed = training.set_seed(seed=cfg.seed,
                                      debug_mode=cfg.get("cudnn_deterministic_mode", None))
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch", None)
        self._resume = cfg.get("resume_from_checkpoint", False)
        self._grad_accum = cfg.gradient_accumulation_steps
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        self._act_ckpt = cfg.get("enable_activation_checkpointing", False)
        self._act_offload = cfg.get("enable_activation_offloading", False)
        self._cpu_offload = cfg.get("fsdp_cpu_offload", False)
        if self._act_offload and (self._device.type != "cuda" or not self._act_ckpt):
            raise ValueError("enable_activation_offloading needs CUDA and "
                             "enable_activation_checkpointing: true")

        self.epochs_run = 0
        self.global_step = 0
        self._steps_done_in_epoch = 0

    # ---- setup ------------------------------------------------------------------------------

    def setup(self, cfg: DictConfig) -> None:
        # 1. Checks before anything is written (every rank checks; all fail alike).
        check_checkpoint_files(cfg.checkpointer)
        check_tokenizer_file(cfg.tokenizer)
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._loss_fn = config.instantiate(cfg.loss)
        dataset = self._build_dataset(cfg.dataset)
        if cfg.get("validate_dataset", True):
            check_dataset_rows(dataset)
        state_dir = latest_sharded_state(self._output_dir) if self._resume else None
        if self._resume and state_dir is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint is true but there is no sharded LoRASC training state "
                f"under {self._output_dir / 'lorasc_state'}")

        # A failure from here on removes the output folder if this run created it.
        with removed_on_error(self._output_dir):
            # 2. Components that write (rank 0 logs; every rank reads the checkpoint, mmap'ed).
            if self._is_rank_zero:
                self._metric_logger = config.instantiate(cfg.metric_logger)
                self._metric_logger.log_config(cfg)
            self._checkpointer = config.instantiate(cfg.checkpointer, should_load_recipe_state=False)
            base_state = self._checkpointer.load_checkpoint()[training.MODEL_KEY]

            # 3. Model: built on meta, sharded per layer, then filled; the engine over its adapters.
            self._model = self._setup_model(cfg, base_state)
            # As in the single-device recipe, the fp32 masters (merge_precision: fp32_master)
            # start from the checkpoint as loaded, not from its bf16 rounding; each rank keeps
            # the rows of its own shard.
            self._engine = CascadeEngine(self._model, self._lorasc, seed=self.seed,
                                         master_source=base_state)
            del base_state
            self._scales = {layer.name: layer.scale for layer in self._engine.layers}
            if self._loss_fn.__class__.__name__ == "CEWithChunkedOutputLoss":
                self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)
            if cfg.compile:
                self._loss_fn = training.compile_loss(self._loss_fn, verbose=self._is_rank_zero)

            # 4. Data: each rank takes every world_size-th sample of the shared order.
            self._batch_size = cfg.batch_size
            self._sampler, self._dataloader = build_dataloader(
                dataset, cfg, pad_id=self._tokenizer.pad_id,
                ignore_idx=self._loss_fn.ignore_index, seed=self.seed,
                num_replicas=self.world_size, rank=self.rank)
            self._steps_per_epoch = steps_per_epoch(len(self._dataloader), self._grad_accum,
                                                    self.max_steps_per_epoch)
            self._plan = ExpertPlan.build(self._lorasc, self._steps_per_epoch, self.total_epochs)
            self._cfg_optimizer, self._cfg_lr_scheduler = cfg.optimizer, cfg.get("lr_scheduler")
            utils.log_rank_zero(
                log, f"LoRASC: {self._plan.num_experts} expert(s) over {self._plan.total_steps} steps "
                     f"({self._steps_per_epoch}/epoch) on {self.world_size} processes; {self._lorasc}")

            # 5. The first expert, or the saved state of the interrupted one.
            if state_dir is None:
                self._start_expert()
            else:
                self._resume_from(state_dir)
            self._ignore_labels_cache = torch.full((cfg.batch_size, 1), self._loss_fn.ignore_index,
                                                   device=self._device)
            dist.barrier()

    def _build_dataset(self, cfg_dataset: DictConfig):
        if isinstance(cfg_dataset, ListConfig):
            return ConcatDataset([config.instantiate(c, self._tokenizer) for c in cfg_dataset])
        return config.instantiate(cfg_dataset, self._tokenizer)

    def _setup_model(self, cfg: DictConfig, base_state: Dict[str, Any]) -> torch.nn.Module:
        with training.set_default_dtype(self._dtype), torch.device("meta"):
            model = config.instantiate(cfg.model)
        set_trainable_params(model, get_adapter_params(model))
        if cfg.compile:
            training.compile_model(model, verbose=self._is_rank_zero)
        if self._act_ckpt:
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        training.shard_model(
            model=model,
            shard_conditions=[partial(training.get_shard_conditions,
                                      names_to_match=cfg.get("custom_sharded_layers", None))],
            cpu_offload=self._cpu_offload,
            reshard_after_forward=cfg.get("fsdp_reshard_after_forward", True))
        # Adapters are not in the base checkpoint: materialise them here (the engine draws A
        # and zeroes B when the first expert begins) and the RoPE caches.
        param_device = "cpu" if self._cpu_offload else self._device
        with training.set_default_dtype(self._dtype), self._device:
            for m in model.modules():
                if isinstance(m, (LoRALinear, DoRALinear)):
                    m.to_empty(device=param_device)
                    m.initialize_parameters()
                if hasattr(m, "rope_init"):
                    m.rope_init()
        missing, unexpected = training.load_from_full_model_state_dict(
            model, base_state, self._device, strict=False, cpu_offload=self._cpu_offload)
        adapter_keys = set(get_adapter_params(model))
        missing = [k for k in missing if k not in adapter_keys]
        if missing or unexpected:
            raise ValueError(f"the checkpoint does not fit cfg.model: missing {missing[:5]}, "
                             f"unexpected {list(unexpected)[:5]}")
        training.validate_no_params_on_meta_device(model)
        self._activations_ctx = training.get_act_offloading_ctx_manager(model, self._act_offload)
        return model

    def _start_expert(self) -> None:
        """Begin the next expert: engine step, then a fresh optimizer and compressed schedule."""
        t0 = time.perf_counter()
        noise = self._engine.begin_expert()
        if self._engine.expert == 1:
            # DoRA's magnitude starts as the row norm of W, computed on each rank's rows.
            init_dora_magnitudes(self._model)
        self._build_optimizer()
        if self._is_rank_zero:
            widths = list(noise.values())
            self._metric_logger.log_dict(
                {"expert": self._engine.expert, "noise_std_mean": sum(widths) / len(widths),
                 **{f"noise_std/{name}": w for name, w in noise.items()},
                 "boundary_seconds": time.perf_counter() - t0},
                step=self.global_step)

    def _build_optimizer(self) -> None:
        self._optimizer, self._lr_scheduler = build_expert_optimizer(
            self._model, self._cfg_optimizer, self._cfg_lr_scheduler, self._lorasc,
            self._plan, expert=self._engine.expert, global_step=self.global_step)

    def _resume_from(self, state_dir: Path) -> None:
        meta = load_sharded_training_state(state_dir, self._model, self._engine)
        global_batch = self._batch_size * self.world_size * self._grad_accum
        if meta["global_batch"] != global_batch or meta["steps_per_epoch"] != self._steps_per_epoch:
            raise ValueError(
                f"{state_dir} was saved with a global batch of {meta['global_batch']} "
                f"({meta['steps_per_epoch']} steps/epoch); this run has {global_batch} "
                f"({self._steps_per_epoch}); set batch_size so that batch_size x processes x "
                f"gradient_accumulation_steps matches")
        self.epochs_run, self.global_step = meta["epochs_run"], meta["global_step"]
        self._steps_done_in_epoch = meta["steps_done_in_epoch"]
        self._plan.check_resume_position(self.global_step, self._engine.expert,
                                         self._engine.expert_open)
        if self._engine.expert_open:
            self._build_optimizer()
            load_full_optimizer_state(self._model, self._optimizer, meta["optimizer"])
            if self._lr_scheduler is not None:
                self._lr_scheduler.load_state_dict(meta["lr_scheduler"])
        # Otherwise the state was saved at a boundary: the training loop begins the next expert.
        utils.log_rank_zero(log, f"Resumed from {state_dir} (saved by {meta['world_size']} "
                                 f"processes) at step {self.global_step}, expert "
                                 f"{self._engine.expert}"
                                 f"{'' if self._engine.expert_open else ' finished'}")

    # ---- training ---------------------------------------------------------------------------

    def _loss_step(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch.pop("labels")
        with self._activations_ctx:
            logits = self._model(**batch)
        labels = torch.hstack((labels[..., 1:], self._ignore_labels_cache[: labels.shape[0]]))
        if not isinstance(logits, list):
            labels = labels.reshape(-1)
            logits = logits.reshape(-1, logits.size(-1))
        return self._loss_fn(logits, labels)

    def train(self) -> None:
        n_experts = self._plan.num_experts
        for epoch in range(self.epochs_run, self.total_epochs):
            skip_steps = self._steps_done_in_epoch
            self._sampler.set_epoch(epoch, skip=skip_steps * self._grad_accum * self._batch_size)
            pbar = tqdm(total=self._steps_per_epoch, initial=skip_steps,
                        disable=not self._is_rank_zero)
            running_loss = torch.zeros((), device=self._device)
            num_tokens = torch.zeros((), dtype=torch.long, device=self._device)
            t0 = time.perf_counter()
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
                loss = self._loss_step(batch) * tokens
                running_loss += loss.detach()
                num_tokens += tokens
                loss.backward()
                if (idx + 1) % self._grad_accum != 0:
                    continue

                # Normalise by the tokens of the whole global batch; FSDP averages gradients
                # over ranks, so multiplying by world_size turns that average into a sum.
                dist.all_reduce(num_tokens)
                dist.all_reduce(running_loss)
                step_loss = (running_loss / num_tokens).item()
                if not torch.isfinite(torch.tensor(step_loss)):
                    raise NonFiniteLossError(
                        f"loss is {step_loss} at global step {self.global_step + 1} "
                        f"(epoch {epoch + 1}, expert {self._engine.expert}); stopping before the "
                        f"optimizer step. The last saved state is intact.")
                training.scale_grads(self._model, self.world_size / num_tokens)
                grad_norm = None
                if self._clip_grad_norm is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        self._model.parameters(), max_norm=float(self._clip_grad_norm))
                    if hasattr(grad_norm, "full_tensor"):
                        grad_norm = grad_norm.full_tensor()
                    if not torch.isfinite(grad_norm):  # the same on every rank
                        raise NonFiniteLossError(
                            f"gradient norm is {float(grad_norm)} at global step "
                            f"{self.global_step + 1} (epoch {epoch + 1}, expert "
                            f"{self._engine.expert}); stopping before the optimizer step. The "
                            f"last saved state is intact.")
                self._optimizer.step()
                self._optimizer.zero_grad(set_to_none=True)
                lr = self._optimizer.param_groups[0]["lr"]
                lr_B = self._optimizer.param_groups[-1]["lr"]
                if self._lr_scheduler is not None:
                    self._lr_scheduler.step()
                self.global_step += 1
                self._steps_done_in_epoch = skip_steps + (idx + 1) // self._grad_accum

                pbar.update(1)
                pbar.set_description(f"expert {self._engine.expert}/{n_experts}|epoch "
                                     f"{epoch + 1}|step {self.global_step}|loss {step_loss:.4f}")
                if self._is_rank_zero and self.global_step % self._log_every_n_steps == 0:
                    metrics = {"loss": step_loss, "lr": lr, "expert": self._engine.expert,
                               "tokens_per_second_per_gpu": float(num_tokens) /
                               (time.perf_counter() - t0) / self.world_size}
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
                running_loss.zero_()
                num_tokens.zero_()
                t0 = time.perf_counter()
            pbar.close()

            self.epochs_run = epoch + 1
            self._steps_done_in_epoch = 0
            self.save_checkpoint(epoch)

    # ---- saving -----------------------------------------------------------------------------

    def _save_state(self, epochs_run: int) -> None:
        self._engine.check_finite()  # never replace the last good state with a broken adapter
        meta = {"epochs_run": epochs_run, "steps_done_in_epoch": self._steps_done_in_epoch,
                "global_step": self.global_step, "seed": self.seed,
                "steps_per_epoch": self._steps_per_epoch,
                "global_batch": self._batch_size * self.world_size * self._grad_accum,
                "lr_scheduler": self._lr_scheduler.state_dict() if self._lr_scheduler else {}}
        save_sharded_training_state(self._output_dir, self._model, self._engine,
                                    self._optimizer, meta, keep_last=self._keep_last_n_states)

    def save_checkpoint(self, epoch: int) -> None:
        """Consolidate and write ``epoch_{epoch}/`` on rank 0; save the sharded state."""
        t0 = time.perf_counter()
        if self.epochs_run < self.total_epochs:
            self._save_state(epochs_run=self.epochs_run)
            if self._save_final_model_only:
                return
        full = training.gather_cpu_state_dict(self._model, self._is_rank_zero,
                                              device=self._device)
        final_dir = self._output_dir / f"epoch_{epoch}"
        if self._is_rank_zero:
            merged = fold_adapters_in_state_dict(full, self._scales)
            staging = self._output_dir / ".staging"
            # torchtune's checkpointers write into <_output_dir>/epoch_N; stage, then move.
            real_output_dir = self._checkpointer._output_dir
            self._checkpointer._output_dir = staging
            try:
                self._checkpointer.save_checkpoint({training.MODEL_KEY: merged}, epoch=epoch,
                                                   intermediate_checkpoint=False)
            finally:
                self._checkpointer._output_dir = real_output_dir
            replace_dir(staging / f"epoch_{epoch}", final_dir)
        del full
        dist.barrier()
        utils.log_rank_zero(log, f"Merged model for epoch {epoch + 1} saved to {final_dir} in "
                                 f"{time.perf_counter() - t0:.1f}s")
        self.last_output_path = final_dir

    def cleanup(self) -> None:
        if self._is_rank_zero:
            self._metric_logger.close()


def _is_quantized_base(cfg_model: DictConfig) -> bool:
    component = str(cfg_model.get("_component_", ""))
    return bool(cfg_model.get("quantize_base", False)) or "qlora" in component.rsplit(".", 1)[-1]


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """``tune run --nproc_per_node N lorasc_tune/recipes/lorasc_lora_distributed.py --config ...``"""
    if not training.is_distributed():
        raise RuntimeError("this recipe runs under a distributed launcher: tune run --nnodes 1 "
                           "--nproc_per_node N lorasc_tune/recipes/lorasc_lora_distributed.py ...")
    on_cuda = str(cfg.device).startswith("cuda")
    if on_cuda:
        torch.cuda.set_device(int(__import__("os").environ.get("LOCAL_RANK", 0)))
    # CPU tensors need gloo even on GPUs: with fsdp_cpu_offload the shards the cascade
    # gathers and reduces live in host memory (torchtune's stock recipe does the same).
    dist.init_process_group("cuda:nccl,cpu:gloo" if on_cuda else "gloo")
    if cfg.get("fsdp_cpu_offload", False):
        training.set_torch_num_threads()
    config.log_config(recipe_name="LoRASCRecipeDistributed", cfg=cfg)
    try:
        recipe = LoRASCRecipeDistributed(cfg=cfg)
        recipe.setup(cfg=cfg)
        recipe.train()
        recipe.cleanup()
        if recipe._is_rank_zero:
            print(f"LoRASC: merged model written to {recipe.last_output_path}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(recipe_main())
