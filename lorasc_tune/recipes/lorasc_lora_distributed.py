# Copyright (c) lorasc-tune contributors. BSD-3-Clause.
"""LoRASC fine-tuning with FSDP2 on several processes, GPUs or CPUs, as a torchtune recipe.

    tune run --nnodes 1 --nproc_per_node 8 lorasc_tune/recipes/lorasc_lora_distributed.py \
        --config configs/llama2_7b_alpaca.yaml

The single-device recipe (``lorasc_lora.py``) with the model sharded by FSDP2 ``fully_shard``
per layer; the loop calls the same driver (:class:`lorasc_tune.driver.Cascade`) twice per
step. The process group is NCCL on CUDA and gloo on CPU (``device: cpu``), so it also runs,
and is tested, on machines without GPUs. The cascade runs on the shards themselves:

* merge and slow update: each rank updates its own rows of ``W`` from its rows of ``B`` and the
  gathered ``A`` (``r × d_in``, small); nothing gathers a full weight;
* ``std(s·B_slow·A_slow)``: two partial sums per matrix, all-reduced, identical on all ranks;
* noise and each expert's ``A``: counter-based, a function of (seed, expert, layer, element),
  so the merged weights do not depend on the world size.

What differs from the single-device recipe, and only that: the model is built on meta and
sharded; the loss and token counts are all-reduced before the step; the training state is
sharded (``torch.distributed.checkpoint``) under ``${output_dir}/lorasc_state/step_<N>/``, and
``resume_from_checkpoint: true`` continues from the newest one, also with a different number
of processes as long as the global batch (``batch_size × processes × accumulation``) is the
same; the export gathers the model (and the engine's fp32 masters) to rank 0, which also
factors the PEFT adapter where one is written.
"""

from __future__ import annotations

import os
import sys
import time
from functools import partial
from typing import Dict

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torchtune import config, training, utils
from torchtune.modules.peft import DoRALinear, LoRALinear
from torchtune.recipe_interfaces import FTRecipeInterface

from lorasc_tune.checkpoint import (
    latest_sharded_meta,
    load_sharded_training_state,
    save_sharded_training_state,
)
from lorasc_tune.config import validate_recipe_config
from lorasc_tune.io import removed_on_error
from lorasc_tune.plan import steps_per_epoch
from lorasc_tune import recipe_common as common
from lorasc_tune.sampling import build_dataloader

log = utils.get_logger("INFO")


class LoRASCRecipeDistributed(FTRecipeInterface):
    """LoRASC under FSDP2. See the module docstring for the behaviour."""

    def __init__(self, cfg: DictConfig) -> None:
        validate_recipe_config(cfg)
        self._device, self._dtype = common.device_and_dtype(cfg)
        if _is_quantized_base(cfg.model):
            # NF4's scales are per-matrix statistics, so requantizing from a master is not a
            # row-local operation on FSDP2 shards (docs/merge_precision.md).
            raise ValueError(
                "QLoRA/QDoRA (quantize_base: True or a qlora_* model) is supported by the "
                "single-device recipe only (lorasc_tune/recipes/lorasc_lora.py); the "
                "distributed recipe needs a bf16/fp32 base")
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self.is_rank_zero = self.rank == 0
        # Every rank draws the same numbers: the cascade's own draws are counter-based, and the
        # model's (dropout) are per rank anyway.
        self._run = common.RunSettings.from_config(cfg, self._device)
        self._cpu_offload = cfg.get("fsdp_cpu_offload", False)

    # ---- setup ------------------------------------------------------------------------------

    def setup(self, cfg: DictConfig) -> None:
        # 1. Checks before anything is written (every rank checks; all fail alike). Nothing is
        # written until step 5, so a refused run or resume leaves output_dir as it was.
        self._tokenizer, self._loss_fn, dataset, state_dir, self._run = common.read_llm_inputs(
            cfg, self._run, latest_sharded_meta)
        run = self._run

        # A failure from here on removes the output folder if this run created it.
        with removed_on_error(run.output_dir):
            # 2. Every rank reads the checkpoint (mmap'ed); the model is built on meta, sharded
            # per layer, then filled.
            self._checkpointer, base_state = common.load_base_checkpoint(cfg)
            self._model = self._setup_model(cfg, base_state)
            if self._loss_fn.__class__.__name__ == "CEWithChunkedOutputLoss":
                self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)
            if cfg.compile:
                self._loss_fn = training.compile_loss(self._loss_fn, verbose=self.is_rank_zero)

            # 3. Data (each rank takes every world_size-th sample of the shared order), and the
            # cascade on the shards; as on one device, the fp32 masters start from the
            # checkpoint as loaded, each rank keeping the rows of its own shard.
            self._sampler, self._dataloader = build_dataloader(
                dataset, cfg, pad_id=self._tokenizer.pad_id,
                ignore_idx=self._loss_fn.ignore_index, seed=run.seed,
                num_replicas=self.world_size, rank=self.rank)
            self._cascade = common.cascade_from_config(
                self._model, cfg, run, device=self._device, master_source=base_state,
                steps_per_epoch=steps_per_epoch(len(self._dataloader), run.grad_accum,
                                                cfg.get("max_steps_per_epoch", None)),
                global_batch_size=cfg.batch_size * self.world_size * run.grad_accum,
                throughput_name="tokens_per_second_per_gpu", world_size=self.world_size)
            del base_state
            # PEFT adapters: refused here (before any write) if save_adapter_weights_only asks
            # for one that cannot be written (every rank alike); otherwise said once.
            self._adapter_problem = common.check_adapter_export(
                self._cascade, self._checkpointer, run, rank_zero=self.is_rank_zero)

            # 4. The saved state of an interrupted run, checked against this one.
            if state_dir is not None:
                load_sharded_training_state(state_dir["path"], self._model, self._cascade)

            # 5. Every check passed on every rank: now write.
            dist.barrier()
            self._metric_logger = common.start_writing(cfg, run, self._cascade, self.is_rank_zero)
            utils.log_rank_zero(log, f"{self._cascade.describe_plan()}; {self.world_size} "
                                     f"processes")
            if state_dir is not None:
                utils.log_rank_zero(log, f"{self._cascade.describe_resume()} (from "
                                         f"{state_dir['path']}, saved by "
                                         f"{state_dir['world_size']} processes)")
            dist.barrier()

    def _setup_model(self, cfg: DictConfig, base_state: Dict[str, torch.Tensor]
                     ) -> torch.nn.Module:
        with training.set_default_dtype(self._dtype), torch.device("meta"):
            model = config.instantiate(cfg.model)
        common.prepare_lora_model(model, cfg, self._run, verbose=self.is_rank_zero)
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
        common.check_checkpoint_fits(model, *training.load_from_full_model_state_dict(
            model, base_state, self._device, strict=False, cpu_offload=self._cpu_offload))
        training.validate_no_params_on_meta_device(model)
        self._activations_ctx = training.get_act_offloading_ctx_manager(
            model, self._run.activation_offloading)
        return model

    def _loss_step(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return common.lm_loss(self._model, self._loss_fn, batch, self._activations_ctx)

    def train(self) -> None:
        c, run = self._cascade, self._run
        for epoch in range(c.epoch, run.epochs):
            for micro_batches in common.optimizer_steps(self._dataloader, self._sampler, c,
                                                        epoch, run.grad_accum, self.is_rank_zero):
                c.begin_step()
                loss_sum, num_tokens = common.backward_token_sums(
                    micro_batches, self._device, self._loss_fn.ignore_index, self._loss_step)
                # Normalise by the tokens of the whole global batch; FSDP averages gradients
                # over ranks, so multiplying by world_size turns that average into a sum.
                dist.all_reduce(num_tokens)
                dist.all_reduce(loss_sum)
                training.scale_grads(self._model, self.world_size / num_tokens)
                c.step(loss_sum / num_tokens, num_items=num_tokens)
                if run.periodic_save_due(c):
                    self._save_state()
            self.save_checkpoint(epoch)

    # ---- saving -----------------------------------------------------------------------------

    def _save_state(self) -> None:
        save_sharded_training_state(self._run.output_dir, self._model, self._cascade,
                                    seed=self._run.seed, keep_last=self._run.keep_last_n_states)

    def save_checkpoint(self, epoch: int) -> None:
        """Write ``epoch_{epoch}/`` (consolidated on rank 0), then the sharded state."""
        self._run.end_epoch(self._cascade, lambda: self._export(epoch), self._save_state)

    def _export(self, epoch: int) -> None:
        t0 = time.perf_counter()
        # Gather the model, and fold from the engine's fp32 masters where it keeps them, as
        # the single-device recipe does (a bf16 run then rounds once, at the export).
        full = training.gather_cpu_state_dict(self._model, self.is_rank_zero,
                                              device=self._device)
        masters = self._cascade.engine.full_master_weights()
        final_dir = self._run.output_dir / f"epoch_{epoch}"
        if self.is_rank_zero:
            common.export_epoch(self._checkpointer, self._model, self._cascade, self._run, epoch,
                                with_adapter=self._adapter_problem is None, masters=masters,
                                state=full, device=self._device)
        del full, masters
        dist.barrier()
        utils.log_rank_zero(log, f"Epoch {epoch}: {self._run.export_name} saved to {final_dir} "
                                 f"in {time.perf_counter() - t0:.1f}s")
        self.last_output_path = final_dir

    def cleanup(self) -> None:
        if self.is_rank_zero:
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
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # CPU tensors need gloo even on GPUs: with fsdp_cpu_offload the shards the cascade
    # gathers and reduces live in host memory (torchtune's stock recipe does the same).
    dist.init_process_group("cuda:nccl,cpu:gloo" if on_cuda else "gloo")
    if cfg.get("fsdp_cpu_offload", False):
        training.set_torch_num_threads()
    config.log_config(recipe_name="LoRASCRecipeDistributed", cfg=cfg)
    try:
        common.run_recipe(LoRASCRecipeDistributed, cfg)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(recipe_main())
