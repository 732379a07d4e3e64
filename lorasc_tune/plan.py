"""Which optimizer steps belong to which expert, and what each expert's optimizer looks like.

* :class:`ExpertPlan`: the expert boundaries over the run's global optimizer steps.
* :func:`expert_warmup_steps`: the run's warmup compressed into one expert.
* :func:`optimizer_param_groups`: LoRA+ groups (B at ``lr_ratio_B ×`` the base lr).
* :func:`build_expert_optimizer`: the fresh optimizer and scheduler every expert starts with.
* :func:`get_linear_schedule_with_warmup`: the paper's linear schedule as a torchtune
  ``lr_scheduler`` component (torchtune 0.6.1 ships only a cosine one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lorasc_tune.config import LoRASCConfig


@dataclass(frozen=True)
class ExpertPlan:
    """Expert ``k`` (0-based) trains global optimizer steps ``starts[k] … starts[k+1] - 1``.

    Attributes:
        starts: first global step of each expert, ``starts[0] == 0``.
        total_steps: optimizer steps in the whole run.
    """

    starts: Tuple[int, ...]
    total_steps: int

    @property
    def num_experts(self) -> int:
        return len(self.starts)

    def expert_at(self, step: int) -> int:
        """0-based index of the expert that trains global step ``step`` (0-based)."""
        lo, hi = 0, len(self.starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.starts[mid] <= step:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def bounds(self, k: int) -> Tuple[int, int]:
        stop = self.starts[k + 1] if k + 1 < len(self.starts) else self.total_steps
        return self.starts[k], stop

    def num_steps(self, k: int) -> int:
        a, b = self.bounds(k)
        return b - a

    def check_resume_position(self, global_step: int, expert: int, expert_open: bool) -> None:
        """Raise ``ValueError`` if a saved position does not fit this plan.

        A state saved after ``global_step`` optimizer steps holds either the open expert that
        trains the next step (1-based ``expert == expert_at(global_step) + 1``) or, when it
        was written at a boundary, the last finished one (the next begins at ``global_step``).
        Anything else means the steps per epoch or per expert changed since the save.
        """
        if global_step >= self.total_steps:
            raise ValueError(f"the saved state is at step {global_step} of a {self.total_steps}-step "
                             f"run: it had already finished")
        k = self.expert_at(global_step)
        fits = (expert == k + 1) if expert_open else (expert == k and self.starts[k] == global_step)
        if not fits:
            state = "open" if expert_open else "finished"
            raise ValueError(
                f"the saved state (step {global_step}, expert {expert} {state}) does not fit this "
                f"run's plan, where step {global_step} belongs to expert {k + 1}; were batch_size, "
                f"gradient_accumulation_steps, max_steps_per_epoch, epochs or the cascade "
                f"frequency changed since it was saved?")

    def ends_expert(self, steps_done: int) -> bool:
        """True when ``steps_done`` optimizer steps complete an expert."""
        return steps_done == self.total_steps or steps_done in self.starts[1:]

    @classmethod
    def build(cls, cfg: LoRASCConfig, steps_per_epoch: int, epochs: int) -> "ExpertPlan":
        """One expert per epoch (default), every N steps (``steps_per_expert``), T spread evenly
        over the run (``num_experts``: expert k starts at step ``k·total // T``), or one in all
        (``cascade: false``)."""
        if steps_per_epoch <= 0:
            raise ValueError(
                f"an epoch has {steps_per_epoch} optimizer steps: the dataset is smaller than "
                f"batch_size × gradient_accumulation_steps"
            )
        total = steps_per_epoch * epochs
        if not cfg.cascade:
            starts = (0,)
        elif cfg.num_experts is not None:
            if cfg.num_experts > total:
                raise ValueError(
                    f"lorasc.num_experts={cfg.num_experts} is more than the run's {total} "
                    f"optimizer steps ({epochs} epochs x {steps_per_epoch}); every expert needs "
                    f"at least one step")
            starts = tuple(k * total // cfg.num_experts for k in range(cfg.num_experts))
        elif cfg.steps_per_expert is None:
            starts = tuple(range(0, total, steps_per_epoch))
        else:
            starts = tuple(range(0, total, cfg.steps_per_expert))
        return cls(starts=starts, total_steps=total)


def expert_warmup_steps(run_warmup_steps: int, expert_steps: int, total_steps: int) -> int:
    """The run's warmup scaled to one expert, so each expert sees the whole schedule's shape.

    No floor of one step: the linear warmup's first step has lr 0, so a floor would waste the
    first step of every expert (all of them with one step per expert, as in the paper's 1250
    experts over 5 epochs). The cap leaves every expert at least one step past warmup.
    """
    if run_warmup_steps <= 0:
        return 0
    return max(0, min(expert_steps - 1, round(run_warmup_steps * expert_steps / total_steps)))


def optimizer_param_groups(model: nn.Module, lr: float, lr_ratio_B: float) -> List[Dict]:
    """Trainable parameters split for LoRA+: every ``lora_b`` at ``lr_ratio_B × lr``.

    Everything else that trains (A, DoRA magnitudes, a classifier head) stays at ``lr``.
    The scheduler scales each group's initial lr by the same factor, so the ratio holds at
    every step.
    """
    from lorasc_tune.adapters import find_adapters

    b_ids = {id(layer.lora_b) for layer in find_adapters(model)}  # torchtune's and PEFT's B
    base, b_params = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (b_params if id(p) in b_ids else base).append(p)
    groups = [{"params": base, "lr": lr, "name": "base"}]
    if b_params:
        groups.append({"params": b_params, "lr": lr * lr_ratio_B, "name": "lora_b"})
    return groups


def get_linear_schedule_with_warmup(
    optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int, last_epoch: int = -1
) -> LambdaLR:
    """Linear warmup from 0 to the group's lr, then linear decay to 0 at ``num_training_steps``."""

    def factor(step: int) -> float:
        return _linear_factor(step, num_warmup_steps, num_training_steps)

    return LambdaLR(optimizer, factor, last_epoch)


def expert_lr_factor(plan: ExpertPlan, schedule: str, run_warmup_steps: int, step: int) -> float:
    """The linear schedule's factor at global step ``step``, as each expert's scheduler gives it.

    ``schedule == "expert"``: the whole schedule (warmup share and decay) compressed into the
    expert that trains ``step``; ``"run"``: one schedule over the run. This is what
    :func:`build_expert_optimizer` builds with :func:`get_linear_schedule_with_warmup`, as a
    function of the global step, for loops that keep one scheduler (the Trainer callback).
    """
    if schedule == "run":
        n_steps, warmup, local = plan.total_steps, run_warmup_steps, step
    else:
        k = plan.expert_at(step)
        n_steps = plan.num_steps(k)
        warmup = expert_warmup_steps(run_warmup_steps, n_steps, plan.total_steps)
        local = step - plan.starts[k]
    return _linear_factor(local, warmup, n_steps)


def _linear_factor(step: int, num_warmup_steps: int, num_training_steps: int) -> float:
    if step < num_warmup_steps:
        return step / max(1, num_warmup_steps)
    remaining = num_training_steps - step
    return max(0.0, remaining / max(1, num_training_steps - num_warmup_steps))


def steps_per_epoch(num_batches: int, gradient_accumulation_steps: int,
                    max_steps_per_epoch: int | None) -> int:
    """Optimizer steps in an epoch: whole accumulation groups only, capped by the config."""
    steps = num_batches // gradient_accumulation_steps
    if max_steps_per_epoch is not None:
        steps = min(steps, int(max_steps_per_epoch))
    return steps


__all__ = [
    "ExpertPlan",
    "build_expert_optimizer",
    "expert_lr_factor",
    "expert_warmup_steps",
    "get_linear_schedule_with_warmup",
    "optimizer_param_groups",
    "steps_per_epoch",
]


def build_expert_optimizer(model: nn.Module, cfg_optimizer: Any, cfg_lr_scheduler: Any,
                           lorasc: LoRASCConfig, plan: ExpertPlan, expert: int,
                           global_step: int) -> Tuple[Optimizer, Optional[Any]]:
    """A fresh optimizer (LoRA+ groups) and LR scheduler for expert ``expert`` (1-based).

    ``cfg_optimizer`` / ``cfg_lr_scheduler`` are torchtune component configs; the scheduler
    must accept ``num_warmup_steps``, ``num_training_steps`` and ``last_epoch``.

    * ``lorasc.schedule == "expert"`` (LoRASC): the whole schedule, warmup and decay,
      compressed into this expert's steps; ``num_warmup_steps`` in the config is for the run
      and each expert gets its proportional share.
    * ``"run"``: one schedule over the whole run, picked up at ``global_step``.
    """
    from torchtune import config

    groups = optimizer_param_groups(model, float(cfg_optimizer.lr), lorasc.lr_ratio_B)
    optimizer = config.instantiate(cfg_optimizer, groups)
    if cfg_lr_scheduler is None:
        return optimizer, None
    run_warmup = cfg_lr_scheduler.get("num_warmup_steps", 0)
    if lorasc.schedule == "expert":
        n_steps = plan.num_steps(expert - 1)
        warmup, done = expert_warmup_steps(run_warmup, n_steps, plan.total_steps), 0
    else:
        n_steps, warmup, done = plan.total_steps, run_warmup, global_step
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]  # lets the scheduler start part-way (last_epoch)
    scheduler = config.instantiate(cfg_lr_scheduler, optimizer, num_warmup_steps=warmup,
                                   num_training_steps=n_steps, last_epoch=done - 1)
    return optimizer, scheduler
