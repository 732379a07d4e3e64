# Copyright (c) lorasc-tune contributors. BSD-3-Clause.
"""LoRASC fine-tuning of a CLIP image tower for classification, as a torchtune recipe.

    tune run lorasc_tune/recipes/lorasc_clip_imagenet.py --config configs/clip_vit_bigg_imagenet.yaml

The vision twin of ``lorasc_lora.py``: the same ``lorasc:`` block, the same engine, plan and
training-state helpers; only the model, the data (torchvision) and the loss differ. The
cascade shows up in the same four places:

    engine.begin_expert()                    # fresh fast expert; noise on W for t > 1
    optimizer, lr_scheduler = fresh ones     # the schedule compressed into this expert
    ...ordinary LoRA steps on images...
    engine.end_expert()                      # slow update, W <- W~ + s*B_slow*A_slow

The classifier head is an ordinary trainable layer outside the adapters: it is never merged
or reset, so it trains continuously across experts (it sits in the per-expert optimizer with
the adapters, so its AdamW moments and lr follow each expert's schedule).

Outputs (``output_dir``):

* ``merged/``: the latest merged classifier (tower in the layout of ``checkpoint.path``, head,
  ``vision_meta.json``), replaced atomically at the end of each epoch;
* ``lorasc_state/training_state.pt``: what ``resume_from_checkpoint: true`` continues from;
* ``eval_report.json``: top-1 on ``eval.sets`` for the final model (if any are set).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.recipe_interfaces import FTRecipeInterface
from tqdm import tqdm

from lorasc_tune.adapters import merged_state_dict
from lorasc_tune.cascade import CascadeEngine
from lorasc_tune.checkpoint import (
    capture_training_state,
    load_training_state,
    restore_model_state,
    save_training_state,
)
from lorasc_tune.config import LoRASCConfig, validate_recipe_config
from lorasc_tune.io import replace_dir
from lorasc_tune.plan import ExpertPlan, build_expert_optimizer, steps_per_epoch
from lorasc_tune.sampling import ResumableSampler
from lorasc_tune.vision.convert import check_tower_shapes, load_pretrained_tower
from lorasc_tune.vision.data import build_dataset, build_loader, eval_transform, train_transform
from lorasc_tune.vision.export import save_classifier
from lorasc_tune.vision.memory import estimate_peak_memory
from lorasc_tune.vision.model import init_dora_magnitudes, init_head, is_adapter_param
from lorasc_tune.vision.robustness import (check_eval_sets, evaluate_sets, format_table,
                                           write_json)

log = utils.get_logger("INFO")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/Inf; nothing from that step was applied or saved."""


class LoRASCClipImageNetRecipe(FTRecipeInterface):
    """LoRASC on a CLIP image tower + linear head, on one device (CUDA or CPU)."""

    def __init__(self, cfg: DictConfig) -> None:
        validate_recipe_config(cfg, sections=("model", "data", "optimizer", "output_dir"))
        self._lorasc = LoRASCConfig.from_config(cfg.get("lorasc", None))
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        if self._dtype == torch.float16:
            raise ValueError("fp16 is not supported (no gradient scaling); use fp32 or bf16")
        self._output_dir = Path(cfg.output_dir)
        self.seed = training.set_seed(seed=cfg.seed)
        self.total_epochs = cfg.epochs
        self._grad_accum = cfg.gradient_accumulation_steps
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        self._log_every_n_steps = cfg.get("log_every_n_steps", None) or 1
        self._resume = cfg.get("resume_from_checkpoint", False)
        self.epochs_run = self.global_step = self._steps_done_in_epoch = 0

    # ---- setup ------------------------------------------------------------------------------

    def setup(self, cfg: DictConfig) -> None:
        # 1. Inputs that can be wrong are read first; nothing is written yet.
        d = cfg.data
        # The transform needs the model's input size; it is attached once the model exists.
        self._train_set = build_dataset(d.root, d.get("layout", "imagefolder"),
                                        d.get("train_split", "train"), None,
                                        d.get("on_bad_file", "error"))
        self._class_ids = self._train_set.class_ids
        n_cls = cfg.model.get("num_classes", None)
        if n_cls is not None and n_cls != len(self._class_ids):
            raise ValueError(f"model.num_classes={n_cls} but {d.root} has "
                             f"{len(self._class_ids)} classes")
        # eval.sets is only used after the last epoch; check it now (kinds, folders, the
        # IN-R/IN-A index against this head) so a typo costs seconds, not a training run.
        ev = cfg.get("eval", None) or {}
        check_eval_sets(dict(ev.get("sets", None) or {}), self._class_ids,
                        ev.get("imagenet_index", None), key_prefix="eval.sets.")
        ckpt_path = (cfg.get("checkpoint", None) or {}).get("path", None)
        pretrained = load_pretrained_tower(ckpt_path) if ckpt_path else None
        resume_state = load_training_state(self._output_dir) if self._resume else None

        # 2. Model: tower (+ adapters) and head, pretrained weights, trainable set.
        self._model = self._setup_model(cfg, pretrained)
        self._source = pretrained[1:] if pretrained else None
        aug = d.get("augment", None) or {}
        self._train_set.set_transform(train_transform(
            self._model.arch.image_size, aug.get("scale", (0.08, 1.0)), aug.get("hflip", True)))
        est = estimate_peak_memory(self._model, self._model.arch, cfg.batch_size,
                                   torch.finfo(self._dtype).bits // 8,
                                   cfg.get("enable_activation_checkpointing", False))
        log.info(f"Estimated peak memory at batch {cfg.batch_size}: {est.describe()}")
        self._engine = CascadeEngine(self._model, self._lorasc, seed=self.seed)
        self._loss_fn = config.instantiate(cfg.loss)
        self._metric_logger = config.instantiate(cfg.metric_logger)
        self._metric_logger.log_config(cfg)

        # 3. Data order and the expert plan over global optimizer steps.
        self._batch_size = cfg.batch_size
        self._sampler = ResumableSampler(self._train_set, shuffle=cfg.get("shuffle", True))
        self._loader = build_loader(self._train_set, cfg.batch_size, sampler=self._sampler,
                                    num_workers=d.get("num_workers", 4), seed=self.seed,
                                    drop_last=True, persistent_workers=False)
        self._steps_per_epoch = steps_per_epoch(len(self._loader), self._grad_accum,
                                                cfg.get("max_steps_per_epoch", None))
        self._plan = ExpertPlan.build(self._lorasc, self._steps_per_epoch, self.total_epochs)
        self._cfg_optimizer, self._cfg_lr_scheduler = cfg.optimizer, cfg.get("lr_scheduler")
        log.info(f"LoRASC: {self._plan.num_experts} expert(s) over {self._plan.total_steps} "
                 f"steps ({self._steps_per_epoch}/epoch), {len(self._train_set)} images, "
                 f"{len(self._class_ids)} classes; {self._lorasc}")

        # 4. The first expert (or the saved state of the interrupted one).
        if resume_state is None:
            self._start_expert()
        else:
            self._resume_from(resume_state)

    def _setup_model(self, cfg: DictConfig, pretrained) -> torch.nn.Module:
        model_cfg = OmegaConf.merge(cfg.model, {"num_classes": len(self._class_ids)})
        with training.set_default_dtype(self._dtype), self._device:
            model = config.instantiate(model_cfg)
        if pretrained is not None:
            tower = pretrained[0]
            check_tower_shapes(tower, model.encoder.state_dict())
            model.encoder.load_state_dict(tower, strict=False)  # adapters keep their init
            init_dora_magnitudes(model)  # magnitudes must describe the loaded weights
        head_cfg = cfg.get("head", None) or {}
        init_head(model.head, head_cfg.get("init", "zeros"), head_cfg.get("path", None))
        # Trainable: adapter factors (and DoRA magnitudes) plus the head; the tower is frozen.
        for name, p in model.named_parameters():
            p.requires_grad_(is_adapter_param(name) or name.startswith("head."))
        if cfg.get("enable_activation_checkpointing", False):
            training.set_activation_checkpointing(
                model, auto_wrap_policy={TransformerSelfAttentionLayer})
        return model

    def _start_expert(self) -> None:
        """Begin the next expert: engine step, then a fresh optimizer and compressed schedule."""
        noise = self._engine.begin_expert()
        if self._engine.expert == 1:
            # DoRA's magnitude starts as the row norm of W; later experts keep training it.
            init_dora_magnitudes(self._model)
        self._build_optimizer()
        widths = list(noise.values())
        # The same boundary record as the LLM recipes, so lorasc_tune.diagnostics reads both.
        self._metric_logger.log_dict({"expert": self._engine.expert,
                                      "noise_std_mean": sum(widths) / len(widths),
                                      **{f"noise_std/{name}": w for name, w in noise.items()}},
                                     step=self.global_step)

    def _build_optimizer(self) -> None:
        # Every trainable parameter: adapters (B at lr_ratio_B x lr) and the head at lr.
        self._optimizer, self._lr_scheduler = build_expert_optimizer(
            self._model, self._cfg_optimizer, self._cfg_lr_scheduler, self._lorasc,
            self._plan, expert=self._engine.expert, global_step=self.global_step)

    def _resume_from(self, state: Dict[str, Any]) -> None:
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

    # ---- training ---------------------------------------------------------------------------

    def train(self) -> None:
        n_experts = self._plan.num_experts
        for epoch in range(self.epochs_run, self.total_epochs):
            skip = self._steps_done_in_epoch
            self._sampler.set_epoch(epoch, skip=skip * self._grad_accum * self._batch_size)
            # Augmentation randomness depends on (seed, epoch) only, so a resumed epoch
            # sees the same crops and flips as an uninterrupted run.
            self._loader.generator.manual_seed(self.seed * 100_003 + epoch)
            pbar = tqdm(total=self._steps_per_epoch, initial=skip)
            running, seen, t0 = 0.0, 0, time.perf_counter()
            self._model.train()
            for idx, (images, labels) in enumerate(self._loader):
                if skip + idx // self._grad_accum >= self._steps_per_epoch:
                    break
                if idx % self._grad_accum == 0 and not self._engine.expert_open:
                    # The next expert begins here, not when the last one ended, so that the
                    # epoch's export and saved state hold the merged W without its noise.
                    self._start_expert()
                    t0 = time.perf_counter()  # throughput counts training, not the boundary
                images = images.to(self._device, non_blocking=True)
                labels = labels.to(self._device, non_blocking=True)
                logits = self._model(images)
                loss = self._loss_fn(logits.float(), labels) / self._grad_accum
                running += loss.detach()
                seen += labels.numel()
                loss.backward()
                if (idx + 1) % self._grad_accum != 0:
                    continue

                step_loss = float(running)
                if not torch.isfinite(torch.tensor(step_loss)):
                    raise NonFiniteLossError(
                        f"loss is {step_loss} at global step {self.global_step + 1} (epoch "
                        f"{epoch + 1}, expert {self._engine.expert}); stopping before the "
                        f"optimizer step. The last saved state is intact.")
                grad_norm = None
                if self._clip_grad_norm is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        self._model.parameters(), max_norm=float(self._clip_grad_norm))
                    if not torch.isfinite(grad_norm):
                        raise NonFiniteLossError(
                            f"gradient norm is {float(grad_norm)} at global step "
                            f"{self.global_step + 1} (epoch {epoch + 1}, expert "
                            f"{self._engine.expert}); stopping before the optimizer step. The "
                            f"last saved state is intact.")
                self._optimizer.step()
                self._optimizer.zero_grad(set_to_none=True)
                lr = self._optimizer.param_groups[0]["lr"]
                if self._lr_scheduler is not None:
                    self._lr_scheduler.step()
                self.global_step += 1
                self._steps_done_in_epoch = skip + (idx + 1) // self._grad_accum

                pbar.update(1)
                pbar.set_description(f"expert {self._engine.expert}/{n_experts}|epoch "
                                     f"{epoch + 1}|step {self.global_step}|loss {step_loss:.4f}")
                if self.global_step % self._log_every_n_steps == 0:
                    metrics = {"loss": step_loss, "lr": lr, "expert": self._engine.expert,
                               "images_per_second": seen / (time.perf_counter() - t0)}
                    if grad_norm is not None:
                        metrics["grad_norm"] = float(grad_norm)
                    if self._device.type == "cuda":
                        metrics.update(training.get_memory_stats(device=self._device))
                    self._metric_logger.log_dict(metrics, step=self.global_step)

                if self._plan.ends_expert(self.global_step):
                    self._engine.end_expert()
                    log.info(f"expert {self._engine.expert} merged at step {self.global_step}")
                running, seen, t0 = 0.0, 0, time.perf_counter()
            pbar.close()
            self.epochs_run = epoch + 1
            self._steps_done_in_epoch = 0
            self.save_checkpoint(epoch)

    # ---- saving and evaluation ----------------------------------------------------------------

    def save_checkpoint(self, epoch: int) -> None:
        """Replace ``merged/`` with this epoch's merged model; save the state if not finished."""
        t0 = time.perf_counter()
        # merged/ is the only export: never replace it (or the state) with broken weights. The
        # head trains outside the engine, so it is checked here too.
        self._engine.check_finite()
        bad = [n for n, p in self._model.named_parameters()
               if p.requires_grad and not bool(torch.isfinite(p).all())]
        if bad:
            raise NonFiniteLossError(f"non-finite values in {', '.join(bad[:5])} after epoch "
                                     f"{epoch + 1}; nothing was saved")
        staging = self._output_dir / ".staging_merged"
        merged = merged_state_dict(self._model, self._engine.master_weights())
        save_classifier(merged, self._model.arch, self._class_ids,
                        self._model.normalize, staging, source=self._source)
        final = self._output_dir / "merged"
        replace_dir(staging, final)
        if self.epochs_run < self.total_epochs:
            state = capture_training_state(
                self._model, self._engine, self._optimizer, self._lr_scheduler or _NoScheduler(),
                epochs_run=self.epochs_run, steps_done_in_epoch=0,
                global_step=self.global_step, seed=self.seed)
            save_training_state(self._output_dir, state)
        log.info(f"Merged model after epoch {epoch + 1} saved to {final} "
                 f"in {time.perf_counter() - t0:.1f}s")
        self.last_output_path = final

    def evaluate(self, cfg: DictConfig) -> None:
        """Top-1 of the final model on ``eval.sets``: a table in the log, JSON on disk."""
        ev = cfg.get("eval", None) or {}
        sets = dict(ev.get("sets", None) or {})
        if not sets:
            return
        results = evaluate_sets(
            self._model, sets, self._class_ids, eval_transform(self._model.arch.image_size),
            self._device, batch_size=ev.get("batch_size", 128),
            num_workers=cfg.data.get("num_workers", 4),
            index_dir=ev.get("imagenet_index", None), limit=ev.get("limit", None),
            on_bad_file=cfg.data.get("on_bad_file", "error"))
        path = self._output_dir / "eval_report.json"
        write_json(results, path, extra={"checkpoint": str(self.last_output_path)})
        log.info("Robustness evaluation:\n" + format_table(results) + f"\n(JSON: {path})")
        self._metric_logger.log_dict({f"eval/{k}": v["top1"] for k, v in results.items()},
                                     step=self.global_step)

    def cleanup(self) -> None:
        self._metric_logger.close()


class _NoScheduler:
    def state_dict(self) -> Dict[str, Any]:
        return {}


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run lorasc_tune/recipes/lorasc_clip_imagenet.py --config <yaml>``."""
    config.log_config(recipe_name="LoRASCClipImageNetRecipe", cfg=cfg)
    recipe = LoRASCClipImageNetRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.evaluate(cfg)
    recipe.cleanup()
    print(f"LoRASC: merged model written to {recipe.last_output_path}")


if __name__ == "__main__":
    sys.exit(recipe_main())
