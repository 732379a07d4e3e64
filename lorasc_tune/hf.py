"""LoRASC in a transformers ``Trainer``: a callback on the same driver the recipes use.

    from lorasc_tune.adapters import inject
    from lorasc_tune.hf import LoRASCCallback

    inject(model, ("q_proj", "v_proj"), rank=8, alpha=16)     # torchtune LoRA layers
    trainer = Trainer(model=model, args=TrainingArguments(..., lr_scheduler_type="linear"),
                      train_dataset=data, callbacks=[LoRASCCallback(slow_alpha=0.5, seed=0)])
    trainer.train()

The callback takes the keys of the recipes' ``lorasc:`` block (one expert per epoch by
default) and drives :class:`lorasc_tune.driver.Cascade` from the Trainer's events:

* ``on_train_begin``: builds the expert plan from the Trainer's steps per epoch and epochs;
  replaces the LR schedule's factor with the compressed per-expert one (the run's warmup
  shared out as the recipes do), and with ``lr_ratio_B != 1`` moves every ``lora_b`` into its
  own parameter groups at ``lr_ratio_B ×`` the lr (LoRA+);
* ``on_step_begin``: begins an expert when one is due (fresh A and B, noise on ``W``) and
  clears the optimizer's state, which makes it a fresh optimizer, as each recipe expert gets;
* ``on_step_end``: ends the expert after its last step (slow update and merge);
* ``on_save``: writes the cascade's state into the Trainer's checkpoint folder, from which a
  ``trainer.train(resume_from_checkpoint=...)`` continues.

Models: any module whose adapters are torchtune ``LoRALinear``/``DoRALinear`` layers (a
torchtune ``lora_*`` model, or :func:`lorasc_tune.adapters.inject` on a transformers model),
or a Hugging Face PEFT LoRA model (``peft.get_peft_model``; PEFT 0.18.1 is the newest that
accepts torchao 0.15, which torchtune 0.6.1's ``tune`` needs; PEFT's DoRA is refused).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch

from lorasc_tune.adapters import find_adapters
from lorasc_tune.config import LoRASCConfig
from lorasc_tune.driver import Cascade
from lorasc_tune.io import atomic_torch_save
from lorasc_tune.plan import ExpertPlan, expert_lr_factor

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - transformers is an optional dependency
    raise ImportError("lorasc_tune.hf needs transformers: pip install transformers") from err

STATE_FILENAME = "lorasc_cascade.pt"
# transformers' checkpoint folders are <output_dir>/checkpoint-<global step>.
_CHECKPOINT_PREFIX = "checkpoint"
_SCHEDULES = ("linear", "constant")


def _unwrap(obj: Any, attr: str) -> Any:
    """accelerate wraps the optimizer and scheduler; the callback edits the torch objects."""
    while hasattr(obj, attr) and not isinstance(obj, (torch.optim.Optimizer,
                                                      torch.optim.lr_scheduler.LRScheduler)):
        obj = getattr(obj, attr)
    return obj


class LoRASCCallback(TrainerCallback):
    """LoRA Slow Cascade learning for a transformers ``Trainer``.

    Args:
        seed: keys the cascade's random draws (each expert's A, the noise).
        **lorasc_keys: the ``lorasc:`` block's keys (``slow_alpha``, ``noise_lambda``,
            ``steps_per_expert``, ``num_experts``, ``lr_ratio_B``, ``schedule``, ...),
            validated at once; a bad one is named.
    """

    def __init__(self, seed: int = 0, **lorasc_keys: Any) -> None:
        self.lorasc = LoRASCConfig.from_config(lorasc_keys)
        self.seed = int(seed)
        self.cascade: Optional[Cascade] = None

    # ---- events ----------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None,
                       lr_scheduler=None, train_dataloader=None, **kwargs):
        schedule_type = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
        if schedule_type not in _SCHEDULES:
            raise ValueError(f"LoRASCCallback: lr_scheduler_type={schedule_type!r} is not "
                             f"supported; use one of {_SCHEDULES} (each expert restarts it)")
        steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        epochs = max(1, math.ceil(state.max_steps / steps_per_epoch))
        self.cascade = Cascade(model, self.lorasc, seed=self.seed,
                               steps_per_epoch=steps_per_epoch, epochs=epochs)
        plan = self.cascade.plan
        if state.max_steps < plan.total_steps:  # max_steps can end a run mid-epoch
            self.cascade.plan = ExpertPlan(
                starts=tuple(s for s in plan.starts if s < state.max_steps),
                total_steps=state.max_steps)
        warmup = args.get_warmup_steps(state.max_steps) if schedule_type == "linear" else 0
        self._restart_schedule_per_expert(optimizer, lr_scheduler, schedule_type, warmup)
        if state.global_step > 0:
            self._resume(args, state)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.cascade.begin_step():
            # An empty state is what a freshly built optimizer has: moments and step counts
            # start again for the new expert's factors.
            _unwrap(optimizer, "optimizer").state.clear()

    def on_step_end(self, args, state, control, **kwargs):
        self.cascade.after_step()

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{_CHECKPOINT_PREFIX}-{state.global_step}"
        if folder.is_dir():  # only the process that wrote the checkpoint
            atomic_torch_save(self.cascade.state_dict(), folder / STATE_FILENAME)

    # ---- helpers ---------------------------------------------------------------------------

    def _restart_schedule_per_expert(self, optimizer: Any, lr_scheduler: Any, schedule_type: str,
                                     warmup: int) -> None:
        """Make the Trainer's LambdaLR follow the recipes' per-expert schedule (and LoRA+)."""
        opt = _unwrap(optimizer, "optimizer")
        sched = _unwrap(lr_scheduler, "scheduler")
        if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            raise ValueError(f"LoRASCCallback: the Trainer's scheduler is a "
                             f"{type(sched).__name__}, not a LambdaLR; use lr_scheduler_type "
                             f"'linear' or 'constant'")
        if self.lorasc.lr_ratio_B != 1.0:
            _split_lora_b_groups(opt, self.cascade.model, self.lorasc.lr_ratio_B)
        plan, lorasc = self.cascade.plan, self.lorasc

        def factor(step: int) -> float:
            if schedule_type == "constant":
                return 1.0
            return expert_lr_factor(plan, lorasc.schedule, warmup, step)

        sched.base_lrs = [group["initial_lr"] for group in opt.param_groups]
        sched.lr_lambdas = [factor] * len(opt.param_groups)
        for group, base in zip(opt.param_groups, sched.base_lrs):
            group["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in opt.param_groups]

    def _resume(self, args, state) -> None:
        path = Path(args.output_dir) / f"{_CHECKPOINT_PREFIX}-{state.global_step}" / STATE_FILENAME
        if not path.is_file():
            raise FileNotFoundError(
                f"LoRASCCallback: resuming at step {state.global_step} but {path} is missing; "
                f"the Trainer restored the model, but without the cascade's state (slow expert, "
                f"position) the run cannot continue exactly")
        saved = torch.load(path, map_location="cpu", weights_only=False)
        # The Trainer restored the optimizer; the cascade restores everything else.
        saved["optimizer"] = None
        self.cascade.load_state_dict(saved, load_optimizer=lambda opt, s: None)


def _split_lora_b_groups(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                         ratio: float) -> None:
    """Move every ``lora_b`` parameter into a copy of its group at ``ratio ×`` the lr."""
    b_ids = {id(layer.lora_b) for layer in find_adapters(model)}
    added = []
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        moved = [p for p in group["params"] if id(p) in b_ids]
        if not moved:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in b_ids]
        twin = {k: v for k, v in group.items() if k != "params"}
        twin.update(params=moved, lr=group["lr"] * ratio, initial_lr=group["initial_lr"] * ratio)
        added.append(twin)
    for twin in added:
        optimizer.add_param_group(twin)
    if not added:
        raise ValueError("LoRASCCallback: lr_ratio_B is set but the optimizer holds no lora_b "
                         "parameters")


__all__ = ["LoRASCCallback", "STATE_FILENAME"]
