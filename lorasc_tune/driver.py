"""The one driver every LoRASC training loop uses: recipes, the Trainer callback, benchmarks.

:class:`Cascade` wraps the engine (:class:`~lorasc_tune.cascade.CascadeEngine`, Algorithm 1's
boundary steps) with everything a loop needs around it, so a loop touches it twice per
optimizer step::

    cascade = Cascade(model, {"slow_alpha": 0.5, "noise_lambda": 1.0}, seed=0,
                      steps_per_epoch=len(loader), epochs=3,
                      optimizer={"_component_": "torch.optim.AdamW", "lr": 1e-3})
    for epoch in range(3):
        for x, y in loader:
            cascade.begin_step()               # begins an expert when one is due
            loss_fn(model(x), y).backward()
            cascade.step(loss)                 # checks, optimizer step, ends the expert when due

What it owns:

* the expert plan (:class:`~lorasc_tune.plan.ExpertPlan`) over global optimizer steps;
* beginning an expert (fresh fast factors, noise on ``W``, DoRA magnitudes at the first) and
  ending it (slow update and merge) at the right steps;
* a fresh optimizer (LoRA+ groups) and the whole LR schedule compressed into each expert;
* the non-finite checks: a NaN/Inf loss or gradient norm stops before the optimizer step, and
  a fast expert with NaN/Inf values is never merged or saved;
* per-step and per-expert metrics (loss per expert, noise width, boundary seconds) through
  any object with ``log_dict(metrics, step)`` (torchtune's metric loggers);
* its share of the training state: ``state_dict()`` / ``load_state_dict()``.

What it leaves to the loop: data, the forward and loss (and any gradient normalisation, e.g.
by token count), sharding, and writing files.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from lorasc_tune.adapters import init_dora_magnitudes
from lorasc_tune.cascade import CascadeEngine
from lorasc_tune.config import LoRASCConfig, clip_grad_norm_value
from lorasc_tune.errors import NonFiniteLossError
from lorasc_tune.plan import ExpertPlan, build_expert_optimizer

MetricLogger = Any  # anything with ``log_dict(metrics: dict, step: int)``


@dataclass(frozen=True)
class StepInfo:
    """What one optimizer step did. ``lr`` / ``lr_B`` are the rates the step used."""

    loss: float
    lr: float
    lr_B: float
    grad_norm: Optional[float]
    expert: int
    global_step: int
    ended_expert: bool


class Cascade:
    """LoRASC around a training loop: the engine, the expert plan and each expert's optimizer.

    Args:
        model: a module holding torchtune ``LoRALinear``/``DoRALinear`` layers (a torchtune
            ``lora_*`` builder, or :func:`lorasc_tune.adapters.inject` on any model).
        lorasc: the ``lorasc:`` block, as a mapping or a validated :class:`LoRASCConfig`.
        seed: keys every random draw of the cascade (each expert's A, the noise).
        steps_per_epoch: optimizer steps in one epoch (after gradient accumulation).
        epochs: epochs in the run; with ``steps_per_epoch`` this fixes the expert plan.
        optimizer: a torchtune-style component mapping, ``{"_component_": "torch.optim.AdamW",
            "lr": ..., ...}``; built fresh for every expert with LoRA+ groups. ``None``: the
            loop owns the optimizer (the Trainer callback) and calls :meth:`after_step`.
        lr_scheduler: optional component mapping accepting ``num_warmup_steps``,
            ``num_training_steps`` and ``last_epoch`` (e.g.
            ``lorasc_tune.plan.get_linear_schedule_with_warmup``); its ``num_warmup_steps`` is
            for the whole run.
        clip_grad_norm: clip the gradient norm to this before each step (``None``: no
            clipping; the norm is then not computed).
        global_batch_size: samples per optimizer step over all processes; saved with the state
            so a resume that would change it is refused.
        master_source: the checkpoint as loaded, to seed full-precision masters (see
            :class:`CascadeEngine`).
        metric_logger: optional; gets per-step metrics every ``log_every_n_steps`` steps and
            a record at every expert boundary.
        throughput_name: the metric name for items (tokens, images) per second per process.
        world_size: processes sharing each step (throughput is reported per process).
        memory_device: a CUDA device to log peak memory for, or ``None``.
    """

    def __init__(self, model: nn.Module, lorasc: Union[LoRASCConfig, Mapping[str, Any], None], *,
                 seed: int, steps_per_epoch: int, epochs: int,
                 optimizer: Optional[Mapping[str, Any]] = None,
                 lr_scheduler: Optional[Mapping[str, Any]] = None,
                 clip_grad_norm: Optional[float] = None,
                 global_batch_size: Optional[int] = None,
                 master_source: Optional[Mapping[str, torch.Tensor]] = None,
                 metric_logger: Optional[MetricLogger] = None, log_every_n_steps: int = 1,
                 throughput_name: str = "items_per_second", world_size: int = 1,
                 memory_device: Optional[torch.device] = None) -> None:
        self.cfg = lorasc if isinstance(lorasc, LoRASCConfig) else LoRASCConfig.from_config(lorasc)
        self.model = model
        self.steps_per_epoch = int(steps_per_epoch)
        self.plan = ExpertPlan.build(self.cfg, self.steps_per_epoch, int(epochs))
        self.engine = CascadeEngine(model, self.cfg, seed=seed, master_source=master_source)
        if self.cfg.cascade and self.plan.num_experts == 1:
            # torchtune's stock configs train 1 epoch; one expert per epoch is then plain LoRA.
            warnings.warn(
                f"LoRASC: the cascade is on but this run has a single expert ({epochs} epoch(s), "
                f"{self.plan.total_steps} steps), so it trains as plain LoRA; set "
                f"lorasc.num_experts: T (or lorasc.steps_per_expert: N) for T experts",
                stacklevel=2)
        self._cfg_optimizer = _as_config(optimizer)
        self._cfg_lr_scheduler = _as_config(lr_scheduler)
        # inf: the norm is computed and logged, nothing is clipped (as in torchtune).
        self.clip_grad_norm = clip_grad_norm_value(clip_grad_norm)
        self.run_shape = {"steps_per_epoch": self.steps_per_epoch,
                          "global_batch_size": global_batch_size}
        self.metric_logger = metric_logger
        self.log_every_n_steps = max(1, int(log_every_n_steps or 1))
        self.throughput_name = throughput_name
        self.world_size = world_size
        self.memory_device = memory_device

        self.global_step = 0
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.lr_scheduler: Optional[Any] = None
        self.last_step: Optional[StepInfo] = None
        # Set by whoever writes the training state (or by a resume), so a divergence error
        # says whether there is a saved state to go back to.
        self.saved_once = False
        self.expert_losses: List[float] = []  # mean training loss of each finished expert
        self._losses: List[float] = []  # this expert's step losses so far
        self._t0 = time.perf_counter()

    # ---- where the run is ------------------------------------------------------------------

    @property
    def num_experts(self) -> int:
        return self.plan.num_experts

    @property
    def epoch(self) -> int:
        """0-based epoch that the next optimizer step belongs to (== epochs finished)."""
        return self.global_step // self.steps_per_epoch

    @property
    def steps_done_in_epoch(self) -> int:
        return self.global_step % self.steps_per_epoch

    @property
    def finished(self) -> bool:
        return self.global_step >= self.plan.total_steps

    def describe(self) -> str:
        """``expert t/T|epoch e|step n``: the step just taken, for progress bars."""
        epoch = max(self.global_step - 1, 0) // self.steps_per_epoch
        return (f"expert {self.engine.expert}/{self.num_experts}|epoch {epoch}|"
                f"step {self.global_step}")

    def describe_plan(self) -> str:
        """The line a recipe logs once the plan is known."""
        return (f"LoRASC: {self.num_experts} expert(s) over {self.plan.total_steps} steps "
                f"({self.steps_per_epoch}/epoch); {self.cfg}")

    def describe_resume(self) -> str:
        """The line a recipe logs after :meth:`load_state_dict`."""
        where = "" if self.engine.expert_open else " finished, the next begins now"
        return (f"Resumed at epoch {self.epoch}, step {self.global_step}, "
                f"expert {self.engine.expert}{where}")

    # ---- the two calls a loop makes --------------------------------------------------------

    def begin_step(self) -> bool:
        """Call before the forward pass of every optimizer step (its first micro-batch).

        Begins the next expert if none is open: fresh fast factors, noise on ``W`` (from the
        second expert on), a fresh optimizer and schedule. The expert begins here rather than
        when the last one ended, so a model or state saved in between holds the merged ``W``
        without the next expert's noise.

        Returns:
            True if an expert began.
        """
        began = False
        if not self.engine.expert_open:
            self._begin_expert()
            began = True
        self._t0 = time.perf_counter()  # throughput counts training, not the boundary
        return began

    def step(self, loss: Union[float, torch.Tensor], num_items: Optional[float] = None
             ) -> StepInfo:
        """Call after the backward pass(es) of an optimizer step, gradients ready.

        Checks the loss (and clips and checks the gradient norm), steps the optimizer and the
        schedule, logs, and ends the expert when its last step is done.

        Args:
            loss: the step's loss (for the non-finite check and the metrics).
            num_items: tokens or samples this process trained on in the step, for throughput.

        Raises:
            NonFiniteLossError: before the optimizer step, if the loss or gradient norm is
                NaN/Inf. Nothing of the step is applied.
        """
        if self.optimizer is None:
            raise RuntimeError("Cascade.step: built without an optimizer; the loop steps its "
                               "own and calls after_step()")
        loss = float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss} at {self._where()}; stopping before the "
                                     f"optimizer step. {self._saved_note()}")
        grad_norm = None
        if self.clip_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                  max_norm=self.clip_grad_norm)
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor, the same on every rank
                norm = norm.full_tensor()
            grad_norm = float(norm)
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(
                    f"gradient norm is {grad_norm} at {self._where()}; stopping before the "
                    f"optimizer step. {self._saved_note()}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The learning rates this step used (LoRA+ puts B in the last group).
        lr = self.optimizer.param_groups[0]["lr"]
        lr_B = self.optimizer.param_groups[-1]["lr"]
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        expert = self.engine.expert
        ended = self.after_step(loss)
        info = StepInfo(loss=loss, lr=lr, lr_B=lr_B, grad_norm=grad_norm, expert=expert,
                        global_step=self.global_step, ended_expert=ended)
        self.last_step = info
        if self.metric_logger is not None and self.global_step % self.log_every_n_steps == 0:
            self.metric_logger.log_dict(self._step_metrics(info, num_items), step=self.global_step)
        return info

    def after_step(self, loss: Optional[float] = None) -> bool:
        """Count one optimizer step taken by the loop; end the expert if it is due.

        :meth:`step` calls it; a loop that steps its own optimizer (the Trainer callback)
        calls it after each optimizer step. Returns True if an expert ended.
        """
        self.global_step += 1
        if loss is not None:
            self._losses.append(float(loss))
        if not self.plan.ends_expert(self.global_step):
            return False
        self.engine.end_expert()  # raises, merging nothing, if the fast expert is non-finite
        if self._losses:
            self.expert_losses.append(statistics.fmean(self._losses))
            self._log({"expert_loss": self.expert_losses[-1]})
        self._losses = []
        return True

    # ---- experts ---------------------------------------------------------------------------

    def _begin_expert(self) -> None:
        t0 = time.perf_counter()
        widths = self.engine.begin_expert()
        if self.engine.expert == 1:
            # DoRA's magnitude starts as the row norm of W; later experts keep training it.
            init_dora_magnitudes(self.model)
        self.optimizer, self.lr_scheduler = self.build_optimizer()
        values = list(widths.values())
        self._log({"expert": self.engine.expert,
                   "noise_width_mean": sum(values) / len(values),
                   **{f"noise_width/{name}": w for name, w in widths.items()},
                   "boundary_seconds": time.perf_counter() - t0})

    def build_optimizer(self):
        """The open expert's fresh optimizer and scheduler (``(None, None)`` without a config)."""
        if self._cfg_optimizer is None:
            return None, None
        return build_expert_optimizer(self.model, self._cfg_optimizer, self._cfg_lr_scheduler,
                                      self.cfg, self.plan, expert=self.engine.expert,
                                      global_step=self.global_step)

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self, optimizer_state: Any = None) -> Dict[str, Any]:
        """The driver's share of a training state (the engine's included).

        Raises :class:`~lorasc_tune.cascade.NonFiniteExpertError` first if the open expert has
        NaN/Inf values, so a broken expert never replaces a good saved state.

        Args:
            optimizer_state: the optimizer's state as the caller gathered it (FSDP2 needs
                a collective for that); default ``self.optimizer.state_dict()``.
        """
        self.engine.check_finite()
        if optimizer_state is None and self.optimizer is not None:
            optimizer_state = self.optimizer.state_dict()
        return {
            "engine": self.engine.state_dict(),
            "optimizer": optimizer_state,
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler else {},
            "global_step": self.global_step,
            "run_shape": dict(self.run_shape),
            "expert_losses": list(self.expert_losses),
            "losses": list(self._losses),
        }

    def load_state_dict(self, state: Mapping[str, Any],
                        load_optimizer: Optional[Callable[[Any, Any], None]] = None) -> None:
        """Continue from :meth:`state_dict`; refuses a state that does not fit this run.

        Args:
            load_optimizer: ``fn(optimizer, saved_state)`` (FSDP2 needs its own); default
                ``optimizer.load_state_dict``.
        """
        saved_shape = state.get("run_shape")
        if saved_shape is not None and saved_shape != self.run_shape:
            raise ValueError(
                f"the saved state was written with a global batch of "
                f"{saved_shape['global_batch_size']} and {saved_shape['steps_per_epoch']} steps "
                f"per epoch; this run has {self.run_shape['global_batch_size']} and "
                f"{self.run_shape['steps_per_epoch']} (global_batch_size = batch_size x "
                f"processes x gradient_accumulation_steps); resume with the original batch_size, "
                f"number of processes, gradient_accumulation_steps and max_steps_per_epoch")
        self.engine.load_state_dict(state["engine"])
        self.global_step = int(state["global_step"])
        self.plan.check_resume_position(self.global_step, self.engine.expert,
                                        self.engine.expert_open)
        self.expert_losses = list(state.get("expert_losses", []))
        self._losses = list(state.get("losses", []))
        self.saved_once = True
        self.optimizer = self.lr_scheduler = None
        if self.engine.expert_open:
            self.optimizer, self.lr_scheduler = self.build_optimizer()
            if self.optimizer is not None:
                (load_optimizer or (lambda o, s: o.load_state_dict(s)))(
                    self.optimizer, state["optimizer"])
            if self.lr_scheduler is not None:
                self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        # Otherwise the state was saved at a boundary: the next begin_step begins the next expert.

    # ---- helpers ---------------------------------------------------------------------------

    def _where(self) -> str:
        return (f"global step {self.global_step + 1} (epoch {self.epoch}, "
                f"expert {self.engine.expert})")

    def _saved_note(self) -> str:
        # Said only when true: a run that diverges before its first save has nothing to keep.
        return ("The last saved state is intact." if self.saved_once
                else "No training state had been saved yet.")

    def _log(self, metrics: Dict[str, Any]) -> None:
        if self.metric_logger is not None:
            self.metric_logger.log_dict(metrics, step=self.global_step)

    def _step_metrics(self, info: StepInfo, num_items: Optional[float]) -> Dict[str, Any]:
        metrics: Dict[str, Any] = {"loss": info.loss, "lr": info.lr, "expert": info.expert}
        if num_items is not None:
            elapsed = max(time.perf_counter() - self._t0, 1e-9)
            metrics[self.throughput_name] = float(num_items) / elapsed / self.world_size
        if self.optimizer is not None and len(self.optimizer.param_groups) > 1:
            metrics["lr_B"] = info.lr_B
        if info.grad_norm is not None:
            metrics["grad_norm"] = info.grad_norm
        if self.memory_device is not None:
            from torchtune import training

            metrics.update(training.get_memory_stats(device=self.memory_device))
        return metrics


def _as_config(component: Optional[Mapping[str, Any]]):
    """torchtune's ``config.instantiate`` takes an OmegaConf node; accept a plain dict too."""
    if component is None:
        return None
    from omegaconf import DictConfig, OmegaConf

    return component if isinstance(component, DictConfig) else OmegaConf.create(dict(component))


__all__ = ["Cascade", "StepInfo"]
