"""Pieces every LoRASC recipe shares, written once: reading inputs, the micro-batch loop, the
LLM loss, exporting through a torchtune checkpointer, and the entry point's error handling.

The recipes in ``lorasc_tune/recipes/`` read top to bottom like torchtune's; what they have in
common lives here (and the cascade itself in :class:`lorasc_tune.driver.Cascade`), so a fork
of a recipe needs only ``lorasc_tune`` installed.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig, ListConfig
from torch.utils.data import ConcatDataset
from tqdm import tqdm

from lorasc_tune.adapters import merged_state_dict
from lorasc_tune.cascade import NonFiniteExpertError
from lorasc_tune.checkpoint import KEEP_STATES, discard_states_after, load_training_state
from lorasc_tune.config import (LoRASCConfigError, check_checkpoint_files, check_dataset_rows,
                                check_json_data_files, check_tokenizer_file)
from lorasc_tune.driver import Cascade
from lorasc_tune.errors import DIVERGED_EXIT_CODE, NonFiniteLossError
from lorasc_tune.io import lock_output_dir, replace_dir, write_failure_explained
from lorasc_tune.peft_export import (ADAPTER_DIRNAME, PeftAdapter, build_peft_adapter, describe,
                                     peft_adapter_problem)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSettings:
    """The top-level training keys every recipe reads, read (and checked) in one place.

    Attributes:
        output_dir: where epochs, the training state and logs go.
        epochs: epochs in the run.
        grad_accum: ``gradient_accumulation_steps``.
        resume: ``resume_from_checkpoint``.
        save_every_n_steps: also save the training state every N optimizer steps (or never).
        save_final_model_only: export only the last epoch's model (a 7B model is 13.5 GB per
            epoch; sweeps rarely want the others).
        adapters_only: ``save_adapter_weights_only``: epoch folders get the PEFT adapter
            (``epoch_N/adapter/``) and no merged model.
        keep_last_n_states: sharded training states kept (the FSDP2 recipe); at least two by
            default, so a damaged newest state has an intact one before it.
        activation_checkpointing / activation_offloading: torchtune's memory savers.
        seed: the run's seed, after ``training.set_seed`` (which draws one for ``seed: null``).
        restart_expert: with ``resume``, restart the expert that was training from its first
            step (the newest state saved between two experts), so that optimizer settings
            (``optimizer.lr``...) may change, e.g. after a divergence.
    """

    output_dir: Path
    epochs: int
    grad_accum: int
    resume: bool
    save_every_n_steps: Optional[int]
    save_final_model_only: bool
    keep_last_n_states: int
    activation_checkpointing: bool
    activation_offloading: bool
    seed: int
    restart_expert: bool = False
    adapters_only: bool = False

    @property
    def export_name(self) -> str:
        """What an epoch folder holds, for log lines: ``"PEFT adapter"`` or ``"merged model"``."""
        return "PEFT adapter" if self.adapters_only else "merged model"

    @classmethod
    def from_config(cls, cfg: DictConfig, device: torch.device) -> "RunSettings":
        from torchtune import training

        act_ckpt = bool(cfg.get("enable_activation_checkpointing", False))
        act_offload = bool(cfg.get("enable_activation_offloading", False))
        if act_offload and (device.type != "cuda" or not act_ckpt):
            raise ValueError("enable_activation_offloading needs CUDA and "
                             "enable_activation_checkpointing: true")
        return cls(
            output_dir=Path(cfg.output_dir), epochs=cfg.epochs,
            grad_accum=cfg.get("gradient_accumulation_steps", 1),
            resume=bool(cfg.get("resume_from_checkpoint", False)),
            save_every_n_steps=cfg.get("save_every_n_steps", None),
            save_final_model_only=bool(cfg.get("save_final_model_only", False)),
            keep_last_n_states=cfg.get("keep_last_n_states", None) or KEEP_STATES,
            activation_checkpointing=act_ckpt, activation_offloading=act_offload,
            seed=training.set_seed(seed=cfg.seed,
                                   debug_mode=cfg.get("cudnn_deterministic_mode", None)),
            restart_expert=bool(cfg.get("restart_expert", False)),
            adapters_only=bool(cfg.get("save_adapter_weights_only", False)))

    def end_epoch(self, cascade: Cascade, export: Callable[[], None],
                  save_state: Callable[[], None]) -> None:
        """At an epoch's end: export its model (unless ``save_final_model_only`` skips it),
        *then* save the training state.

        In this order a crash or a failed export (a full disk) leaves the state of before the
        export, so a resume redoes the epoch and writes its folder; the other order could
        record the epoch as done with its model never written. The last epoch saves a state
        too, which marks the run finished.
        """
        if cascade.finished or not self.save_final_model_only:
            export()
        save_state()

    def periodic_save_due(self, cascade: Cascade) -> bool:
        """True after a step at which ``save_every_n_steps`` asks for a state, or that ended an
        expert (a state ``restart_expert`` can start from), except at an epoch's end (the
        epoch's own save follows)."""
        ended = cascade.last_step is not None and cascade.last_step.ended_expert
        return bool(self.save_every_n_steps and cascade.steps_done_in_epoch
                    and (cascade.global_step % self.save_every_n_steps == 0 or ended))


def cascade_from_config(model: torch.nn.Module, cfg: DictConfig, run: RunSettings, *,
                        steps_per_epoch: int, device: torch.device, global_batch_size: int,
                        throughput_name: str, world_size: int = 1,
                        master_source: Optional[Dict[str, torch.Tensor]] = None) -> Cascade:
    """The driver from a recipe config: ``lorasc``, ``optimizer``, ``lr_scheduler``,
    ``clip_grad_norm``, ``log_every_n_steps`` and ``log_peak_memory_stats`` are read here.
    Its metric logger is attached by :func:`start_writing`, once every check has passed."""
    return Cascade(
        model, cfg.get("lorasc", None), seed=run.seed, steps_per_epoch=steps_per_epoch,
        epochs=run.epochs, optimizer=cfg.optimizer, lr_scheduler=cfg.get("lr_scheduler", None),
        clip_grad_norm=cfg.get("clip_grad_norm", None), global_batch_size=global_batch_size,
        master_source=master_source,
        log_every_n_steps=cfg.get("log_every_n_steps", None), throughput_name=throughput_name,
        world_size=world_size,
        memory_device=device if cfg.get("log_peak_memory_stats", False) and device.type == "cuda"
        else None)


class RunAlreadyFinished(Exception):
    """``resume_from_checkpoint`` on a run whose saved state is its last: nothing to do."""


def load_resume_state(run: RunSettings, cfg: DictConfig, load: Callable[[Path], Dict[str, Any]]
                      ) -> Tuple[Optional[Dict[str, Any]], RunSettings]:
    """Read the state to resume from with ``load(output_dir)`` (None without
    ``resume_from_checkpoint``); refuse a finished run.

    Under ``seed: null`` (torchtune's configs) the run continues with the seed it was saved
    with, rather than refusing the freshly drawn one.

    Raises:
        RunAlreadyFinished: the state is the one a finished run wrote last.
    """
    from torchtune import training

    if not run.resume:
        return None, run
    if run.restart_expert:
        if load is not load_training_state:
            raise ValueError("restart_expert is supported by the single-device recipes; resume "
                             "the distributed run without it")
        state = load_training_state(run.output_dir, boundary_only=True)
    else:
        state = load(run.output_dir)
    if state.get("finished"):
        raise RunAlreadyFinished(
            f"LoRASC: the run in {run.output_dir} had already finished (step "
            f"{state['global_step']}); nothing was changed")
    if cfg.get("seed", None) is None and state.get("seed") is not None:
        run = replace(run, seed=training.set_seed(seed=int(state["seed"]),
                                                  debug_mode=cfg.get("cudnn_deterministic_mode",
                                                                     None)))
    return state, run


def remove_orphans(output_dir: Path) -> None:
    """Delete what an interrupted save leaves behind: staging folders, folders set aside while
    being replaced, and torn temporary or undigested state files. The complete epoch folders
    and intact states are never touched."""
    import shutil

    from lorasc_tune.checkpoint import DIGEST_SUFFIX, STATE_DIRNAME, STATE_PREFIX

    output_dir = Path(output_dir)
    for folder in [output_dir / ".staging", output_dir / ".staging_merged",
                   *output_dir.glob("epoch_*.old"), output_dir / "merged.old"]:
        if folder.is_dir():
            shutil.rmtree(folder)
    state_dir = output_dir / STATE_DIRNAME
    if state_dir.is_dir():
        for path in state_dir.glob(".*.tmp"):  # atomic writes torn by a crash
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        for path in state_dir.glob(f"{STATE_PREFIX}*.pt"):
            if not path.with_name(path.name + DIGEST_SUFFIX).is_file():
                path.unlink()  # its save never finished


def start_writing(cfg: DictConfig, run: RunSettings, cascade: Cascade,
                  rank_zero: bool = True) -> Any:
    """Once every check has passed: claim output_dir (refused if another live run holds it),
    clear a crash's leftovers, start the metric logger (which writes the config into
    output_dir) and give it to the cascade. Returns the logger (None off rank 0)."""
    from torchtune import config

    if not rank_zero:
        return None
    lock_output_dir(run.output_dir)  # refuses a folder another run is writing
    remove_orphans(run.output_dir)
    if run.restart_expert:
        # The states the restarted expert wrote (diverged, perhaps) must never be resumed.
        discard_states_after(run.output_dir, cascade.global_step)
    metric_logger = config.instantiate(cfg.metric_logger)
    metric_logger.log_config(cfg)
    cascade.metric_logger = metric_logger
    return metric_logger


def load_base_checkpoint(cfg: DictConfig) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """The checkpointer and the base model's state dict; a conversion that fails because the
    weights and the checkpoint's ``config.json`` disagree is named as such."""
    import json

    from torchtune import config, training

    from lorasc_tune.families import prepare_checkpoint_conversion

    prepare_checkpoint_conversion(cfg)  # Gemma2: torchtune's conversion corrected (families.py)
    checkpointer = config.instantiate(cfg.checkpointer, should_load_recipe_state=False)
    try:
        return checkpointer, checkpointer.load_checkpoint()[training.MODEL_KEY]
    except RuntimeError as err:
        if "is invalid for input of size" not in str(err):
            raise
        folder = Path(str(cfg.checkpointer.get("checkpoint_dir", "")))
        hf = folder / "config.json"
        facts = ""
        if hf.is_file():
            conf = json.loads(hf.read_text())
            keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
            facts = ", ".join(f"{k}={conf[k]}" for k in keys if k in conf)
            facts = f" ({hf} says {facts})"
        raise ValueError(
            f"checkpointer: the weights in {folder} do not have the shapes its config.json "
            f"describes{facts}, so torchtune could not convert them ({err}); check that the "
            f"config.json belongs to these weights") from None


def check_checkpoint_fits(model: torch.nn.Module, missing: List[str], unexpected: List[str]
                          ) -> None:
    """Refuse a base checkpoint that does not fit ``cfg.model`` (adapters are not in it)."""
    from torchtune.modules.peft import get_adapter_params

    adapter_keys = set(get_adapter_params(model))
    missing = [k for k in missing if k not in adapter_keys]
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not fit cfg.model: missing {missing[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")


def prepare_lora_model(model: torch.nn.Module, cfg: DictConfig, run: RunSettings,
                       verbose: bool = True) -> None:
    """Adapters trainable, the rest frozen; then ``compile`` and activation checkpointing."""
    from torchtune import modules, training
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    set_trainable_params(model, get_adapter_params(model))
    if cfg.compile:
        training.compile_model(model, verbose=verbose)
    if run.activation_checkpointing:
        training.set_activation_checkpointing(
            model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})


def device_and_dtype(cfg: DictConfig) -> Tuple[torch.device, torch.dtype]:
    """The run's device and dtype; fp16 is refused (the recipes have no gradient scaling)."""
    from torchtune import training, utils

    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {cfg.device} was asked for, but this machine has no CUDA "
                         f"device torch can use; set device: cpu to train on the CPU")
    device = utils.get_device(device=cfg.device)
    dtype = training.get_dtype(cfg.dtype, device=device)
    if dtype == torch.float16:
        raise ValueError("dtype: fp16 is not supported (no gradient scaling); use fp32 or bf16")
    return device, dtype


def read_llm_inputs(cfg: DictConfig, run: RunSettings, load_state: Callable[[Path], Any]
                    ) -> Tuple[Any, Any, Any, Any, RunSettings]:
    """Check and load what an LLM run reads before it writes anything.

    Returns:
        ``(tokenizer, loss_fn, dataset, resume_state, run)``: every dataset row has been
        transformed once, so a bad row fails here, naming it (unless ``validate_dataset:
        false``); ``resume_state`` and ``run`` are :func:`load_resume_state`'s, read with
        ``load_state``.
    """
    from torchtune import config

    check_checkpoint_files(cfg.checkpointer)
    check_tokenizer_file(cfg.tokenizer)
    tokenizer = config.instantiate(cfg.tokenizer)
    loss_fn = config.instantiate(cfg.loss)
    parts = list(cfg.dataset) if isinstance(cfg.dataset, ListConfig) else [cfg.dataset]
    for i, part in enumerate(parts):
        check_json_data_files(part, "dataset" if len(parts) == 1 else f"dataset[{i}]")
    datasets = [config.instantiate(part, tokenizer) for part in parts]
    dataset = datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
    if cfg.get("validate_dataset", True):
        check_dataset_rows(dataset, max_seq_len=getattr(tokenizer, "max_seq_len", None))
    return (tokenizer, loss_fn, dataset, *load_resume_state(run, cfg, load_state))


def optimizer_steps(loader: Any, sampler: Any, cascade: Cascade, epoch: int,
                    grad_accum: int, show_progress: bool = True) -> Iterator[List[Any]]:
    """The micro-batches of each optimizer step of ``epoch`` still to do, as lists.

    A resumed epoch starts where the saved state stopped: the sampler skips the samples of
    the steps already done (``cascade.steps_done_in_epoch``), so the data order matches an
    uninterrupted run. Incomplete accumulation groups at the end of an epoch are dropped, as
    :func:`lorasc_tune.plan.steps_per_epoch` counts. Shows a progress bar with the cascade's
    position and the last step's loss.
    """
    skip = cascade.steps_done_in_epoch if cascade.epoch == epoch else 0
    sampler.set_epoch(epoch, skip=skip * grad_accum * loader.batch_size)
    pbar = tqdm(total=cascade.steps_per_epoch, initial=skip, disable=not show_progress)
    group: List[Any] = []
    steps = skip
    for batch in loader:
        if steps >= cascade.steps_per_epoch:
            break
        group.append(batch)
        if len(group) < grad_accum:
            continue
        yield group
        group, steps = [], steps + 1
        pbar.update(1)
        if cascade.last_step is not None:
            pbar.set_description(f"{cascade.describe()}|loss {cascade.last_step.loss:.4f}")
    pbar.close()


def lm_loss(model: torch.nn.Module, loss_fn: Any, batch: Dict[str, torch.Tensor],
            activations_ctx: Any) -> torch.Tensor:
    """Next-token cross-entropy of one batch, as torchtune's recipes compute it.

    Position ``i`` predicts token ``i+1``: labels are shifted left and padded with the loss's
    ``ignore_index``. Works with chunked-output losses (``CEWithChunkedOutputLoss``).
    """
    labels = batch.pop("labels")
    with activations_ctx:
        logits = model(**batch)
    pad = torch.full((labels.shape[0], 1), loss_fn.ignore_index, dtype=labels.dtype,
                     device=labels.device)
    labels = torch.hstack((labels[..., 1:], pad))
    if not isinstance(logits, list):
        labels = labels.reshape(-1)
        logits = logits.reshape(-1, logits.size(-1))
    return loss_fn(logits, labels)


def backward_token_sums(micro_batches: List[Dict[str, torch.Tensor]], device: torch.device,
                        ignore_index: int, loss_of: Callable[[Dict[str, torch.Tensor]], torch.Tensor]
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward through each micro-batch's *summed* token loss; return (loss sum, tokens).

    Summing token losses and dividing the gradients once by the step's token count (the
    caller does, after any all-reduce) weights every token equally however the tokens fall
    into micro-batches, as torchtune's recipes do.
    """
    from torchtune import utils

    loss_sum, num_tokens = None, None
    for batch in micro_batches:
        utils.batch_to_device(batch, device)
        tokens = (batch["labels"] != ignore_index).sum()
        loss = loss_of(batch) * tokens
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        num_tokens = tokens if num_tokens is None else num_tokens + tokens
        loss.backward()
    return loss_sum, num_tokens


def save_with_checkpointer(checkpointer: Any, state_dict: Optional[Dict[str, torch.Tensor]],
                           output_dir: Path, epoch: int,
                           adapter: Optional[PeftAdapter] = None) -> Path:
    """Write ``output_dir/epoch_{epoch}/`` through a torchtune checkpointer, atomically.

    torchtune 0.6.1's checkpointers write straight into ``<their output dir>/epoch_N`` and
    offer no public way to write elsewhere, so this is the one place that points their private
    ``_output_dir`` at a staging folder for the save. The epoch folder then appears (or is
    replaced) only once it is complete.

    Args:
        state_dict: the merged model, or None to write no model (``save_adapter_weights_only``).
        adapter: a PEFT adapter to write into ``epoch_{epoch}/adapter/``, or None.
    """
    from torchtune import training

    import shutil

    staging = Path(output_dir) / ".staging"
    if (staging / f"epoch_{epoch}").exists():  # a failed attempt's partial folder
        shutil.rmtree(staging / f"epoch_{epoch}")
    real_output_dir = checkpointer._output_dir
    checkpointer._output_dir = staging
    try:
        with write_failure_explained(f"exporting epoch_{epoch} to {staging}",
                                     "the epoch folders and training state saved before are "
                                     "intact"):
            if state_dict is not None:
                checkpointer.save_checkpoint({training.MODEL_KEY: state_dict}, epoch=epoch,
                                             intermediate_checkpoint=False)
            (staging / f"epoch_{epoch}").mkdir(parents=True, exist_ok=True)
            if adapter is not None:
                adapter.save(staging / f"epoch_{epoch}" / ADAPTER_DIRNAME)
    finally:
        checkpointer._output_dir = real_output_dir
    final_dir = Path(output_dir) / f"epoch_{epoch}"
    replace_dir(staging / f"epoch_{epoch}", final_dir)
    staging.rmdir()  # empty now; a leftover .staging/ then always means a failed save
    return final_dir


def check_adapter_export(cascade: Cascade, checkpointer: Any, run: RunSettings,
                         rank_zero: bool = True) -> Optional[str]:
    """Why this run writes no PEFT adapter (warned once, here), or None.

    Call once the checkpointer and the cascade are built and before anything is written: with
    ``save_adapter_weights_only`` a reason is an error, so a refused run writes nothing.
    """
    engine = cascade.engine
    masters = engine.master_weights()
    rounded = any(f"{layer.name}.weight" not in masters and layer.weight.element_size() < 4
                  for layer in engine.layers)
    problem = peft_adapter_problem(cascade.cfg, checkpointer=checkpointer,
                                   dora=any(layer.dora for layer in engine.layers),
                                   experts=cascade.plan.num_experts, rounded_base=rounded)
    if problem is not None and run.adapters_only:
        raise LoRASCConfigError(f"save_adapter_weights_only is true, but {problem}; nothing was "
                                f"written")
    if problem is not None and rank_zero:
        log.warning(f"LoRASC: no PEFT adapter will be written: {problem}")
    return problem


def export_epoch(checkpointer: Any, model: torch.nn.Module, cascade: Cascade, run: RunSettings,
                 epoch: int, *, with_adapter: bool,
                 masters: Optional[Dict[str, torch.Tensor]] = None,
                 state: Optional[Dict[str, torch.Tensor]] = None,
                 device: Optional[torch.device] = None) -> Path:
    """Write ``epoch_{epoch}/``: the merged model (unless ``save_adapter_weights_only``) and,
    ``with_adapter``, the PEFT adapter of what it adds to the base (``adapter/``).

    Under FSDP2 rank 0 calls it with the gathered ``state`` and the full ``masters``. The
    adapter is computed before anything is staged, and the merge into new tensors, never
    into the live weights.
    """
    adapter = None
    # One state dict for both (for QLoRA each call dequantizes the whole model).
    state = model.state_dict() if state is None else state
    if with_adapter:
        try:
            adapter = build_peft_adapter(model, checkpointer, experts=cascade.engine.expert,
                                         rank=cascade.cfg.adapter_export_rank,
                                         base_weights=masters, state=state, device=device,
                                         seed=run.seed)
        except torch.OutOfMemoryError as err:
            # Factoring needs a few d_out x d_in fp32 buffers per matrix (a full SVD of a
            # LoRA'd lm_head, say). The adapter is an extra: the epoch's merged model, which
            # needs none of them, is still written, and only an adapters-only run stops.
            where = (f"factoring epoch {epoch}'s PEFT adapter ran out of memory on "
                     f"{device or 'cpu'}")
            if run.adapters_only:
                raise RuntimeError(f"{where}, and save_adapter_weights_only is true, so "
                                   f"nothing of epoch {epoch} was written; the epoch folders "
                                   f"and training state saved before are intact: {err}") from err
            log.warning(f"LoRASC: {where}; epoch_{epoch}/ gets the merged model only: {err}")
        else:
            log.info(f"LoRASC: epoch {epoch}: {describe(adapter)}")
    merged = None if run.adapters_only else merged_state_dict(model, masters, state=state)
    return save_with_checkpointer(checkpointer, merged, run.output_dir, epoch, adapter=adapter)


def setup_profiler(cfg_profiler: Optional[DictConfig]):
    """torchtune's profiler from the ``profiler:`` block, or a no-op one."""
    from torchtune import config
    from torchtune.training import DummyProfiler

    if cfg_profiler is None or not cfg_profiler.get("enabled", False):
        return DummyProfiler()
    if cfg_profiler.get("_component_", None) is None:
        cfg_profiler["_component_"] = "torchtune.training.setup_torch_profiler"
    profiler, _ = config.instantiate(cfg_profiler)
    return profiler


def run_recipe(recipe_cls: type, cfg: DictConfig, after_train: Optional[Callable] = None,
               announce: bool = True) -> Any:
    """setup, train, (``after_train``), cleanup; a divergence exits with its own code.

    A NaN/Inf loss, gradient norm or expert ends the process with
    :data:`~lorasc_tune.errors.DIVERGED_EXIT_CODE` and the error as its last line, so a sweep
    can record "this learning rate diverged" without parsing logs.
    """
    recipe = recipe_cls(cfg=cfg)
    try:
        recipe.setup(cfg=cfg)
    except RunAlreadyFinished as done:
        print(done, flush=True)
        return recipe
    try:
        recipe.train()
        if after_train is not None:
            after_train(recipe)
    except (NonFiniteLossError, NonFiniteExpertError) as err:
        print(f"LoRASC: training diverged: {err}", file=sys.stderr, flush=True)
        sys.exit(DIVERGED_EXIT_CODE)
    recipe.cleanup()
    if announce and getattr(recipe, "is_rank_zero", True):
        run, path = getattr(recipe, "_run", None), recipe.last_output_path
        if run is not None and run.adapters_only:
            path = Path(path) / ADAPTER_DIRNAME
        what = run.export_name if run is not None else "merged model"
        print(f"LoRASC: {what} written to {path}")
    return recipe


__all__ = [
    "RunAlreadyFinished",
    "RunSettings",
    "backward_token_sums",
    "cascade_from_config",
    "check_adapter_export",
    "check_checkpoint_fits",
    "prepare_lora_model",
    "device_and_dtype",
    "export_epoch",
    "lm_loss",
    "optimizer_steps",
    "load_base_checkpoint",
    "load_resume_state",
    "read_llm_inputs",
    "remove_orphans",
    "run_recipe",
    "save_with_checkpointer",
    "setup_profiler",
    "start_writing",
]
