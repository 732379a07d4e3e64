# Copyright (c) lorasc-tune contributors. BSD-3-Clause.
"""LoRASC fine-tuning of a CLIP image tower for classification, as a torchtune recipe.

    tune run lorasc_tune/recipes/lorasc_clip_imagenet.py --config configs/clip_vit_bigg_imagenet.yaml

The vision twin of ``lorasc_lora.py``: the same ``lorasc:`` block and the same driver
(:class:`lorasc_tune.driver.Cascade`), called twice per step; only the model, the data
(torchvision), the loss and the export differ:

    cascade.begin_step()     # the next expert when due: fresh A/B, noise, fresh optimizer
    ...ordinary LoRA step on images...
    cascade.step(loss)       # checks, optimizer step; slow update and merge at an expert's end

The classifier head is an ordinary trainable layer outside the adapters: it is never merged
or reset, so it trains continuously across experts (it sits in the per-expert optimizer with
the adapters, so its AdamW moments and lr follow each expert's schedule).

Outputs (``output_dir``):

* ``merged/``: the latest merged classifier (tower in the layout of ``checkpoint.path``, head,
  ``vision_meta.json``), replaced atomically at the end of each epoch;
* ``lorasc_state/training_state_<step>.pt``: what ``resume_from_checkpoint: true`` continues from;
* ``eval_report.json``: top-1 on ``eval.sets`` for the final model (if any are set).
"""

from __future__ import annotations

import sys
import time

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.recipe_interfaces import FTRecipeInterface

from lorasc_tune.adapters import init_dora_magnitudes, merged_state_dict
from lorasc_tune.checkpoint import load_training_state, restore_training_state, save_training_state
from lorasc_tune.config import VISION_KEYS, validate_recipe_config
from lorasc_tune.errors import NonFiniteLossError
from lorasc_tune.io import replace_dir
from lorasc_tune.plan import steps_per_epoch
from lorasc_tune.recipe_common import (RunSettings, cascade_from_config, device_and_dtype,
                                       load_resume_state, optimizer_steps, run_recipe,
                                       start_writing)
from lorasc_tune.sampling import ResumableSampler
from lorasc_tune.vision.convert import check_tower_shapes, load_pretrained_tower
from lorasc_tune.vision.data import build_dataset, build_loader, eval_transform, train_transform
from lorasc_tune.vision.export import save_classifier
from lorasc_tune.vision.memory import estimate_peak_memory
from lorasc_tune.vision.model import init_head, is_adapter_param
from lorasc_tune.vision.robustness import (check_eval_sets, evaluate_sets, format_table,
                                           write_json)

log = utils.get_logger("INFO")


class LoRASCClipImageNetRecipe(FTRecipeInterface):
    """LoRASC on a CLIP image tower + linear head, on one device (CUDA or CPU)."""

    def __init__(self, cfg: DictConfig) -> None:
        validate_recipe_config(cfg, sections=("model", "data", "optimizer", "output_dir"),
                               known_keys=VISION_KEYS)
        self._device, self._dtype = device_and_dtype(cfg)
        self._run = RunSettings.from_config(cfg, self._device)

    # ---- setup ------------------------------------------------------------------------------

    def setup(self, cfg: DictConfig) -> None:
        run = self._run
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
        resume_state, run = load_resume_state(run, cfg, load_training_state)
        self._run = run

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
        self._loss_fn = config.instantiate(cfg.loss)

        # 3. Data order, and the cascade over the run's optimizer steps.
        self._sampler = ResumableSampler(self._train_set, shuffle=cfg.get("shuffle", True))
        self._loader = build_loader(self._train_set, cfg.batch_size, sampler=self._sampler,
                                    num_workers=d.get("num_workers", 4), seed=run.seed,
                                    drop_last=True, persistent_workers=False)
        self._cascade = cascade_from_config(
            self._model, cfg, run, device=self._device,
            steps_per_epoch=steps_per_epoch(len(self._loader), run.grad_accum,
                                            cfg.get("max_steps_per_epoch", None)),
            global_batch_size=cfg.batch_size * run.grad_accum,
            throughput_name="images_per_second")

        # 4. The saved state of an interrupted run, checked against this one.
        if resume_state is not None:
            restore_training_state(self._model, self._cascade, resume_state)

        # 5. Every check passed: now write (crash leftovers cleared, metric logger).
        self._metric_logger = start_writing(cfg, run, self._cascade)
        log.info(f"{self._cascade.describe_plan()}; {len(self._train_set)} images, "
                 f"{len(self._class_ids)} classes")
        if resume_state is not None:
            log.info(self._cascade.describe_resume())

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

    # ---- training ---------------------------------------------------------------------------

    def train(self) -> None:
        c, run = self._cascade, self._run
        for epoch in range(c.epoch, run.epochs):
            # Augmentation randomness depends on (seed, epoch) only, so a resumed epoch
            # sees the same crops and flips as an uninterrupted run.
            self._loader.generator.manual_seed(run.seed * 100_003 + epoch)
            self._model.train()
            for micro_batches in optimizer_steps(self._loader, self._sampler, c, epoch,
                                                 run.grad_accum):
                c.begin_step()
                step_loss, seen = 0.0, 0
                for images, labels in micro_batches:
                    images = images.to(self._device, non_blocking=True)
                    labels = labels.to(self._device, non_blocking=True)
                    loss = self._loss_fn(self._model(images).float(), labels) / run.grad_accum
                    step_loss, seen = step_loss + loss.detach(), seen + labels.numel()
                    loss.backward()
                if c.step(step_loss, num_items=seen).ended_expert:
                    log.info(f"expert {c.engine.expert} merged at step {c.global_step}")
            self.save_checkpoint(epoch)

    # ---- saving and evaluation ----------------------------------------------------------------

    def save_checkpoint(self, epoch: int) -> None:
        """Replace ``merged/`` with this epoch's merged model, then save the training state."""
        self._run.end_epoch(self._cascade, lambda: self._export(epoch), lambda: save_training_state(
            self._run.output_dir, self._model, self._cascade, seed=self._run.seed))

    def _export(self, epoch: int) -> None:
        t0 = time.perf_counter()
        # merged/ is the only export: never replace it (or the state) with broken weights. The
        # head trains outside the engine, so it is checked here too.
        self._cascade.engine.check_finite()
        bad = [n for n, p in self._model.named_parameters()
               if p.requires_grad and not bool(torch.isfinite(p).all())]
        if bad:
            raise NonFiniteLossError(f"non-finite values in {', '.join(bad[:5])} after epoch "
                                     f"{epoch}; nothing was saved")
        staging = self._run.output_dir / ".staging_merged"
        merged = merged_state_dict(self._model, self._cascade.engine.master_weights())
        save_classifier(merged, self._model.arch, self._class_ids,
                        self._model.normalize, staging, source=self._source)
        self.last_output_path = self._run.output_dir / "merged"
        replace_dir(staging, self.last_output_path)
        log.info(f"Merged model after epoch {epoch} saved to {self.last_output_path} "
                 f"in {time.perf_counter() - t0:.1f}s")

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
        path = self._run.output_dir / "eval_report.json"
        write_json(results, path, extra={"checkpoint": str(self.last_output_path)})
        log.info("Robustness evaluation:\n" + format_table(results) + f"\n(JSON: {path})")
        self._metric_logger.log_dict({f"eval/{k}": v["top1"] for k, v in results.items()},
                                     step=self._cascade.global_step)

    def cleanup(self) -> None:
        self._metric_logger.close()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run lorasc_tune/recipes/lorasc_clip_imagenet.py --config <yaml>``."""
    config.log_config(recipe_name="LoRASCClipImageNetRecipe", cfg=cfg)
    run_recipe(LoRASCClipImageNetRecipe, cfg, after_train=lambda recipe: recipe.evaluate(cfg))


if __name__ == "__main__":
    sys.exit(recipe_main())
