"""Cascade-aware training state: what a LoRASC run must save to resume exactly.

torchtune's stock LoRA resume reloads the *original* base weights and the adapter. After a
cascade merge that would silently drop every expert merged so far (and all the noise), so a
LoRASC resume needs the *current* base of every adapted matrix as well. Only adapted
matrices change during a run, so that is all we save of the base (for Llama-2-7B with LoRA on
q and v: 64 matrices, 2.1 GB in bf16, against 13.5 GB for the whole model).

Single-device states live in ``${output_dir}/lorasc_state/training_state_<step>.pt``, each
written atomically and followed by ``<same name>.sha256``, the digest of its bytes. A state is
used only if its digest matches; the last :data:`KEEP_STATES` are kept, so a state torn or
corrupted on disk is passed over for the one before it, and the resume says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from lorasc_tune.adapters import parameters_by_state_dict_name
from lorasc_tune.cascade import CascadeEngine

if TYPE_CHECKING:
    from lorasc_tune.driver import Cascade
from lorasc_tune.io import atomic_torch_save, atomic_write_text, write_failure_explained

log = logging.getLogger(__name__)

STATE_DIRNAME = "lorasc_state"
STATE_PREFIX = "training_state_"
DIGEST_SUFFIX = ".sha256"
# Two, so that a state that fails its integrity check has an intact one to fall back to.
KEEP_STATES = 2
# 2: the cascade driver's state (position, run shape, per-expert losses) replaced the
# recipes' epoch counters.
TRAINING_STATE_VERSION = 2


def _state_files(output_dir: str | Path) -> List[Path]:
    """Saved single-device states, newest first (by the step in their name)."""
    root = Path(output_dir) / STATE_DIRNAME
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob(f"{STATE_PREFIX}*.pt") if p.name[len(STATE_PREFIX):-3]
                   .isdigit()), reverse=True)


def training_state_path(output_dir: str | Path) -> Optional[Path]:
    """The newest saved state file (intact or not), or None."""
    files = _state_files(output_dir)
    return files[0] if files else None


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_boundary_state(path: Path) -> bool:
    """Whether ``path`` was saved between two experts (its digest file says so)."""
    sidecar = path.with_name(path.name + DIGEST_SUFFIX)
    return sidecar.is_file() and "boundary" in sidecar.read_text().split()[2:]


def integrity_problem(path: Path) -> Optional[str]:
    """Why ``path`` must not be used (no digest, a digest that does not match), or None."""
    sidecar = path.with_name(path.name + DIGEST_SUFFIX)
    if not sidecar.is_file():
        return "it has no digest file (the save did not finish)"
    expected = sidecar.read_text().split()[:1]
    if expected != [file_digest(path)]:
        return "its bytes do not match its digest (the file is corrupted or truncated)"
    return None


def capture_training_state(model: nn.Module, cascade: "Cascade", *, seed: int) -> Dict[str, Any]:
    """Everything needed to continue a run bit-for-bit, as CPU tensors.

    ``base`` holds the current (noised and merged) weight of every adapted layer that has
    no fp32 master; where the engine keeps one (NF4 bases, ``merge_precision: fp32_master``),
    the master is saved in the engine state instead and ``W`` is re-derived from it on
    restore, exactly. ``trainable`` holds every parameter with ``requires_grad`` (the fast
    expert, DoRA magnitudes, any head). The cascade's own share (engine, optimizer, schedule,
    position) comes from :meth:`Cascade.state_dict`, which refuses a non-finite expert.
    """
    engine = cascade.engine
    masters = engine.master_weights()
    state = {
        "version": TRAINING_STATE_VERSION,
        **cascade.state_dict(),
        "base": {f"{l.name}.weight": l.weight.detach().cpu().clone() for l in engine.layers
                 if f"{l.name}.weight" not in masters},
        "trainable": {n: p.detach().cpu().clone()
                      for n, p in parameters_by_state_dict_name(model).items() if p.requires_grad},
        "seed": seed,
        "finished": cascade.finished,
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    return state


def save_training_state(output_dir: str | Path, model: nn.Module, cascade: "Cascade", *,
                        seed: int) -> Path:
    """Capture and write the training state and its digest; keep the last :data:`KEEP_STATES`.

    Each file is written atomically and the digest only after the state, so a crash at any
    point leaves the previous states intact and the new one either complete or unused.
    """
    root = Path(output_dir) / STATE_DIRNAME
    path = root / f"{STATE_PREFIX}{cascade.global_step:08d}.pt"
    with write_failure_explained(f"writing the training state {path}",
                                 "the states saved before it are intact"):
        atomic_torch_save(capture_training_state(model, cascade, seed=seed), path)
    # "boundary": saved between two experts, where a restart of the next expert can begin.
    tag = "" if cascade.engine.expert_open else "  boundary"
    atomic_write_text(path.with_name(path.name + DIGEST_SUFFIX),
                      f"{file_digest(path)}  {path.name}{tag}\n")
    cascade.saved_once = True
    prune_states(output_dir)
    return path


def prune_states(output_dir: str | Path, keep: int = KEEP_STATES) -> None:
    """Delete all but the newest ``keep`` states and the newest boundary state, which
    ``restart_expert`` needs (digests last, so a crash here leaves each remaining state either
    whole with its digest, or without one and so never used)."""
    files = _state_files(output_dir)
    boundary = next((p for p in files if _is_boundary_state(p)), None)
    for old in files[keep:]:
        if old == boundary:
            continue
        old.unlink(missing_ok=True)
        old.with_name(old.name + DIGEST_SUFFIX).unlink(missing_ok=True)


def discard_states_after(output_dir: str | Path, step: int) -> None:
    """Delete the states saved after optimizer step ``step`` (a restarted expert's)."""
    for path in _state_files(output_dir):
        if int(path.name[len(STATE_PREFIX):-3]) > step:
            path.with_name(path.name + DIGEST_SUFFIX).unlink(missing_ok=True)
            path.unlink()


def load_training_state(output_dir: str | Path, boundary_only: bool = False) -> Dict[str, Any]:
    """The newest intact state a previous run saved (``boundary_only``: the newest saved
    between two experts, from which the next expert can be restarted).

    A state that fails its integrity check is never used: the next older intact one is, with a
    warning naming the file passed over; with none intact, the error names every file and why.
    """
    root = Path(output_dir) / STATE_DIRNAME
    passed_over: List[Tuple[Path, str]] = []
    candidates = _state_files(output_dir)
    if boundary_only:
        candidates = [p for p in candidates if _is_boundary_state(p)]
        if not candidates:
            raise FileNotFoundError(
                f"restart_expert: there is no state saved between two experts in {root} to "
                f"restart from (one is written at every epoch end, and at every expert end when "
                f"save_every_n_steps is set)")
    for path in candidates:
        problem = integrity_problem(path)
        if problem is not None:
            passed_over.append((path, problem))
            continue
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("version") != TRAINING_STATE_VERSION:
            raise ValueError(f"{path}: training state version {state.get('version')} is not "
                             f"supported")
        for bad, why in passed_over:
            log.warning(f"LoRASC: not resuming from {bad}: {why}; using the previous state "
                        f"{path.name} (step {state['global_step']}) instead")
        return state
    if passed_over:
        raise ValueError("resume_from_checkpoint: no intact training state in " + str(root) + ": "
                         + "; ".join(f"{p.name}: {why}" for p, why in passed_over))
    raise FileNotFoundError(
        f"resume_from_checkpoint is true but there is no LoRASC training state in {root}; "
        f"point output_dir at the run to resume, or set resume_from_checkpoint: false")


@torch.no_grad()
def restore_training_state(model: nn.Module, cascade: "Cascade", state: Dict[str, Any]) -> None:
    """Put the saved base of adapted layers, the trainable parameters and the cascade back."""
    params = parameters_by_state_dict_name(model)
    for name, value in {**state["base"], **state["trainable"]}.items():
        if name not in params:
            raise KeyError(f"training state has {name!r}, which the model does not have; "
                           f"was the model config changed since the run was saved?")
        if params[name].shape != value.shape:
            raise ValueError(
                f"the training state's {name} has shape {tuple(value.shape)} but the model's has "
                f"{tuple(params[name].shape)}: model settings (lora_rank, the model size or its "
                f"adapted layers) changed since the run was saved; resume with the original ones")
        params[name].copy_(value)
    cascade.load_state_dict(state)
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


# ---- sharded (FSDP2) training state ----------------------------------------------------------
#
# ${output_dir}/lorasc_state/step_<N>/ holds
#   * a torch.distributed.checkpoint (DCP) of the tensors that scale with the model: the current
#     base of every adapted matrix, the trainable parameters, the slow expert and (with
#     merge_precision: fp32_master) the fp32 masters, each saved
#     shard by shard (no rank ever holds a full matrix), re-shardable to any world size;
#   * meta.pt, written by rank 0: counters, engine scalars, scheduler state and the optimizer
#     state, which is adapter-sized (two moments per LoRA parameter) and gathered to rank 0.
# The folder is written under a temporary name and renamed once every rank has finished.

SHARDED_PREFIX = "step_"
SHARDED_DIGEST = "digest.json"


def _sharded_tensors(model: nn.Module, engine: CascadeEngine, slow: Dict[str, Any]):
    params = parameters_by_state_dict_name(model)
    return {
        "base": {f"{l.name}.weight": params[f"{l.name}.weight"] for l in engine.layers},
        "trainable": {n: p for n, p in params.items() if p.requires_grad},
        "slow": slow,
    }


def sharded_integrity_problem(folder: Path) -> Optional[str]:
    """Why a sharded state folder must not be used, or None."""
    listing = folder / SHARDED_DIGEST
    if not listing.is_file():
        return f"it has no {SHARDED_DIGEST} (the save did not finish)"
    for name, digest in json.loads(listing.read_text()).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if file_digest(path) != digest:
            return f"{name} does not match its digest (corrupted or truncated)"
    return None


def latest_sharded_meta(output_dir: str | Path) -> Dict[str, Any]:
    """The newest intact sharded state's position: ``path``, ``global_step``, ``seed``,
    ``world_size`` and ``finished``. States failing their digests are passed over, with a
    warning; with none intact, the error names each folder and why."""
    root = Path(output_dir) / STATE_DIRNAME
    done = sorted((p for p in root.iterdir() if p.name.startswith(SHARDED_PREFIX)
                   and (p / "meta.pt").is_file()), reverse=True) if root.is_dir() else []
    if not done:
        raise FileNotFoundError(
            f"resume_from_checkpoint is true but there is no sharded LoRASC training state "
            f"under {root}")
    passed_over = []
    for folder in done:
        problem = sharded_integrity_problem(folder)
        if problem is not None:
            passed_over.append((folder, problem))
            continue
        for bad, why in passed_over:
            log.warning(f"LoRASC: not resuming from {bad}: {why}; using {folder.name} instead")
        meta = torch.load(folder / "meta.pt", map_location="cpu", weights_only=False)
        return {"path": folder, **{k: meta.get(k) for k in
                                   ("global_step", "seed", "world_size", "finished")}}
    raise ValueError("resume_from_checkpoint: no intact sharded training state in " + str(root)
                     + ": " + "; ".join(f"{p.name}: {why}" for p, why in passed_over))


def save_sharded_training_state(output_dir: str | Path, model: nn.Module, cascade: "Cascade",
                                *, seed: int, keep_last: int = 1) -> Path:
    """Collective: every rank calls it. Returns the final folder."""
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    rank = dist.get_rank()
    root = Path(output_dir) / STATE_DIRNAME
    final = root / f"{SHARDED_PREFIX}{cascade.global_step:08d}"
    staging = root / f".{final.name}.tmp"
    # A fresh expert's optimizer has no state yet. get_optimizer_state_dict would create it by
    # taking a zero-gradient step, which advances Adam's step count and so changes its bias
    # correction; save "no state" instead (every rank sees the same emptiness).
    optim = None
    if cascade.optimizer is not None and cascade.optimizer.state:
        optim = get_optimizer_state_dict(
            model, cascade.optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    meta = cascade.state_dict(optimizer_state=optim)  # refuses a non-finite expert first
    if rank == 0:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    dist.barrier()
    dcp.save(_sharded_tensors(model, cascade.engine, meta["engine"].pop("slow")),
             checkpoint_id=str(staging))
    rng = [None] * dist.get_world_size()
    dist.all_gather_object(rng, torch.get_rng_state())
    if rank == 0:
        torch.save({**meta, "version": TRAINING_STATE_VERSION, "seed": seed, "rng": rng,
                    "finished": cascade.finished, "world_size": dist.get_world_size()},
                   staging / "meta.pt")
        # Written last: a folder is used only if every file still matches its digest.
        digests = {p.name: file_digest(p) for p in sorted(staging.iterdir()) if p.is_file()}
        atomic_write_text(staging / SHARDED_DIGEST, json.dumps(digests, indent=1))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        older = sorted(p for p in root.iterdir()
                       if p.name.startswith(SHARDED_PREFIX) and p != final)
        for old in older[: max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(old)
    dist.barrier()
    cascade.saved_once = True
    return final


def load_sharded_training_state(path: Path, model: nn.Module, cascade: "Cascade"
                                ) -> Dict[str, Any]:
    """Collective: load the tensors into the (sharded) model and the cascade; return the meta.

    The optimizer state (saved full) is loaded into the open expert's fresh optimizer.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from lorasc_tune.sharding import as_dtensor_like, local_rows

    meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
    if meta.get("version") != TRAINING_STATE_VERSION:
        raise ValueError(f"{path}: training state version {meta.get('version')} is not supported")
    engine = cascade.engine
    slow = {}
    for layer in engine.layers:
        for key, like in (("slow_A", layer.lora_a), ("slow_B", layer.lora_b)):
            local, _ = local_rows(like)
            zeros = torch.zeros(local.shape, dtype=torch.float32, device=local.device)
            slow[f"{layer.name}.{key}"] = as_dtensor_like(zeros, like)
    for layer, master in zip(engine.layers, engine.master):
        if master is not None:  # merge_precision: fp32_master, sharded like W
            slow[f"{layer.name}.master"] = as_dtensor_like(torch.zeros_like(master), layer.weight)
    tensors = _sharded_tensors(model, engine, slow)
    dcp.load(tensors, checkpoint_id=str(path))
    meta["engine"]["slow"] = tensors["slow"]
    cascade.load_state_dict(meta, load_optimizer=lambda optimizer, full: load_full_optimizer_state(
        model, optimizer, full))
    rank, world = dist.get_rank(), dist.get_world_size()
    if meta["world_size"] == world:
        torch.set_rng_state(meta["rng"][rank])
    return meta


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              full_state: Optional[Dict[str, Any]]) -> None:
    """Load a state saved by :func:`save_sharded_training_state` (None: a fresh optimizer)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if full_state is None:
        return
    set_optimizer_state_dict(model, optimizer, optim_state_dict=full_state,
                             options=StateDictOptions(full_state_dict=True))
