"""PEFT-format LoRA adapters of a LoRASC run: ``W_T − W_0`` as a Hugging Face PEFT adapter.

What an epoch folder's merged model adds to the base, per adapted matrix, is
``Δ = W_T − W_0``, with ``W_T`` the fp32 fold the merged export is cast from (the engine's fp32
master where it keeps one, the live expert's ``s·B·A`` folded in). In a bf16 run the merged
files are that fold rounded to bf16; the adapter is the unrounded update, so base + adapter
equals the merged files only up to that rounding (it is, if anything, the better copy).

* Noise off (``lorasc.noise_lambda: 0``) or cascade off: ``Δ`` is the sum of the merged slow
  experts ``s·B_slow^(t)·A_slow^(t)`` plus the live expert's ``s·B·A``: rank ≤ ``t·r`` after
  ``t`` experts. It is written exactly (to fp32 rounding) at that rank.
* Noise on: every expert after the first adds full-rank noise, so no low-rank adapter is exact;
  none is written unless ``lorasc.adapter_export_rank: k`` asks for the rank-``k`` truncated
  SVD of ``Δ`` (the best rank-``k`` approximation), whose error is reported per matrix.

Design: ``W_0`` is re-read from the base checkpoint at each export (only the adapted
matrices, in Hugging Face layout) rather than tracked during training, so neither the
training state nor resume changes, and both cases share one computation. ``Δ`` is formed in
torchtune's layout from the same fp32 fold the merged export uses, converted to the Hugging
Face layout with the checkpointer's own weight converter (which applies the Llama-family q/k
row permutation, and none for Qwen2), and factored there; the PEFT keys are then the Hugging
Face weight names with ``lora_A`` / ``lora_B``.

Where ``t·r`` (or ``k``) reaches ``min(d_out, d_in)`` (e.g. 1250 experts), no smaller
factorization exists: that matrix is written exactly at full rank (``Δ`` against an fp32
identity), at least twice the size of the fp32 weight; the export says so.

The files go to ``epoch_N/adapter/`` rather than next to the merged weights: transformers
loads a folder holding both ``config.json`` and ``adapter_config.json`` as that folder's model
*with the adapter applied on top*, which would count ``Δ`` twice.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from lorasc_tune.adapters import find_adapters, fold_adapter
from lorasc_tune.config import LoRASCConfig

log = logging.getLogger(__name__)

ADAPTER_DIRNAME = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_REPORT = "adapter_export.json"
# torchtune model types whose checkpointer maps each adapted matrix to one Hugging Face matrix
# (Phi-3/4 fuse q, k, v into one qkv_proj; the others are not causal LMs PEFT can load here).
PEFT_MODEL_TYPES = ("LLAMA2", "LLAMA3", "LLAMA3_2", "MISTRAL", "GEMMA", "GEMMA2", "QWEN2")
# Extra columns of the randomized range finder beyond the rank bound (Halko et al. 2011).
_OVERSAMPLE = 8


@dataclass(frozen=True)
class HFCheckpoint:
    """What the adapter export needs to know about the base checkpoint."""

    model_type: str  # torchtune's ModelType name, e.g. "LLAMA3"
    config: Dict[str, Any]  # its config.json
    paths: Tuple[Path, ...]  # its weight files
    source: str  # the hub id where known, else the local folder (adapter_config.json)


def hf_checkpoint(checkpointer: Any) -> HFCheckpoint:
    """Read :class:`HFCheckpoint` from a ``FullModelHFCheckpointer``.

    torchtune 0.6.1's checkpointer keeps these in private attributes and offers no public
    accessor, so they are read here, in one place.
    """
    return HFCheckpoint(model_type=checkpointer._model_type.name, config=checkpointer._config,
                        paths=tuple(map(Path, checkpointer._checkpoint_paths)),
                        source=checkpointer.repo_id or str(checkpointer._checkpoint_dir))


def peft_adapter_problem(lorasc: LoRASCConfig, *, dora: bool, checkpointer: Any = None,
                         experts: Optional[int] = None, rounded_base: bool = False
                         ) -> Optional[str]:
    """Why this run cannot write a PEFT adapter, or None.

    Args:
        lorasc: the run's ``lorasc:`` block.
        dora: whether the model's adapters are DoRA.
        checkpointer: the run's torchtune checkpointer; ``None`` skips the checks on it (the
            config check runs before it is built).
        experts: the run's planned number of experts; ``None`` (not known yet, the config
            check) leaves the noise check to the set-up one. One expert never gets noise.
        rounded_base: whether some adapted weight is stored below 32 bits with no fp32 master
            (``merge_precision: nearest`` / ``stochastic`` on a bf16 base): each merge then
            rounds into ``W``, and ``W_T - W_0`` holds that rounding, which is full rank.
    """
    if dora:
        return ("the model uses DoRA, whose per-row magnitude rescales the merged weight; that "
                "cannot be written as a plain LoRA adapter")
    if checkpointer is not None:
        from torchtune.training import FullModelHFCheckpointer

        if not isinstance(checkpointer, FullModelHFCheckpointer):
            return (f"PEFT adapters sit on a Hugging Face base, and the checkpointer is "
                    f"{type(checkpointer).__name__}, not torchtune.training."
                    f"FullModelHFCheckpointer")
        model_type = hf_checkpoint(checkpointer).model_type
        if model_type not in PEFT_MODEL_TYPES:
            return (f"model_type {model_type} has no one-to-one Hugging Face mapping of its "
                    f"adapted matrices (supported: {', '.join(PEFT_MODEL_TYPES)})")
    if lorasc.adapter_export_rank is not None:
        return None  # the approximate adapter: always possible, its error reported
    if lorasc.noise_enabled and experts is not None and experts > 1:
        return ("lorasc noise is on, so W_T - W_0 is full rank and no low-rank adapter is "
                "exact; set lorasc.adapter_export_rank: k for an approximate rank-k adapter "
                "(truncated SVD, error reported per matrix), or lorasc.noise_lambda: 0")
    if rounded_base:
        return ("the adapted weights are stored below 32 bits with no fp32 master "
                "(lorasc.merge_precision is not fp32_master), so every merge rounds into W and "
                "W_T - W_0 is full rank; use merge_precision: fp32_master, or set "
                "lorasc.adapter_export_rank: k for an approximate rank-k adapter")
    return None


@dataclass
class PeftAdapter:
    """A PEFT LoRA adapter ready to write: ``B @ A`` per module, scale 1 (``lora_alpha = r``).

    Attributes:
        tensors: ``{"base_model.model.<hf module>.lora_A.weight": [r_m, d_in],
            "....lora_B.weight": [d_out, r_m]}``, float32 on CPU.
        config: the ``adapter_config.json`` contents.
        report: ``adapter_export.json``: mode, ranks, relative Frobenius error per module.
    """

    tensors: Dict[str, torch.Tensor]
    config: Dict[str, Any]
    report: Dict[str, Any] = field(default_factory=dict)

    def save(self, folder: Path) -> Path:
        """Write the three files into ``folder`` (created); returns it."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, folder / ADAPTER_WEIGHTS,
                  metadata={"format": "pt"})
        (folder / ADAPTER_CONFIG).write_text(json.dumps(self.config, indent=2) + "\n")
        (folder / ADAPTER_REPORT).write_text(json.dumps(self.report, indent=2) + "\n")
        return folder


# ---- tensors ----------------------------------------------------------------------------------


@torch.no_grad()
def lowrank_factors(delta: torch.Tensor, rank: int, *, exact: bool, seed: int = 0
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Factor ``delta ≈ B @ A`` at rank ``k = min(rank, d_out, d_in)``.

    Args:
        delta: ``[d_out, d_in]`` float32.
        rank: the rank asked for.
        exact: True where ``delta`` is known to have rank ≤ ``rank`` up to rounding (noise off):
            a randomized range finder with a seeded Gaussian sketch, ``O(d_out·d_in·k)``,
            exact in that case. False: the truncated SVD, the best rank-``k`` approximation
            in Frobenius norm.
        seed: the sketch's seed (its own generator: the run's RNG state is not touched).

    Returns:
        ``(B [d_out, k], A [k, d_in])`` on ``delta``'s device, balanced
        (``B = U·√S``, ``A = √S·Vᵀ``). At ``k = min(d_out, d_in)`` the factorization is
        ``delta`` against an identity, exactly.
    """
    d_out, d_in = delta.shape
    k = max(1, min(int(rank), d_out, d_in))
    if k == min(d_out, d_in):
        eye = torch.eye(k, dtype=delta.dtype, device=delta.device)
        return (eye, delta.clone()) if d_out <= d_in else (delta.clone(), eye)
    if exact:
        gen = torch.Generator(device=delta.device).manual_seed(seed)
        sketch = torch.randn(d_in, min(k + _OVERSAMPLE, d_out, d_in), generator=gen,
                             dtype=delta.dtype, device=delta.device)
        Q, _ = torch.linalg.qr(delta @ sketch)  # [d_out, p]: an orthonormal basis of the range
        U_small, S, Vh = torch.linalg.svd(Q.T @ delta, full_matrices=False)
        U = Q @ U_small
    else:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    root = S[:k].sqrt()
    return U[:, :k] * root, root[:, None] * Vh[:k]


def relative_error(delta: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    """``‖delta − B·A‖_F / ‖delta‖_F`` (0 for a zero ``delta``)."""
    norm = float(torch.linalg.norm(delta))
    return 0.0 if norm == 0.0 else float(torch.linalg.norm(delta - B @ A)) / norm


def hf_converter(checkpointer: Any) -> Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
    """The checkpointer's torchtune → Hugging Face weight conversion, for a partial state dict.

    The same functions ``FullModelHFCheckpointer.save_checkpoint`` applies to the merged model
    (so the q/k row permutation of Llama-family models is the one the exported weights get).
    torchtune's ``tune_to_peft_adapter_weights`` is not used: it permutes ``lora_B`` of q/k
    for every model type, Qwen2 included, whose weights torchtune does not permute.
    """
    from torchtune.models import convert_weights

    facts = hf_checkpoint(checkpointer)
    conf, model_type = facts.config, facts.model_type
    kwargs = dict(num_heads=conf["num_attention_heads"], num_kv_heads=conf["num_key_value_heads"],
                  dim=conf["hidden_size"])
    if model_type == "QWEN2":
        from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

        return partial(qwen2_tune_to_hf, **kwargs,
                       tie_word_embeddings=conf.get("tie_word_embeddings", False))
    if model_type == "GEMMA2":
        from torchtune.models.gemma2._convert_weights import gemma2_tune_to_hf

        return partial(gemma2_tune_to_hf, **kwargs, head_dim=conf.get("head_dim", None))
    if model_type in PEFT_MODEL_TYPES:
        return partial(convert_weights.tune_to_hf, **kwargs, head_dim=conf.get("head_dim", None))
    raise ValueError(f"model_type {model_type}: no PEFT adapter export (supported: "
                     f"{', '.join(PEFT_MODEL_TYPES)})")


class _BaseWeights:
    """Reads single matrices of the base checkpoint (Hugging Face layout) on demand."""

    def __init__(self, paths) -> None:
        self._where: Dict[str, Path] = {}
        self._bin: Dict[Path, Dict[str, torch.Tensor]] = {}
        for path in map(Path, paths):
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    self._where.update({k: path for k in f.keys()})
            else:  # .bin / .pt: memory-mapped, read lazily
                self._bin[path] = torch.load(path, map_location="cpu", mmap=True,
                                             weights_only=True)
                self._where.update({k: path for k in self._bin[path]})

    def get(self, key: str) -> torch.Tensor:
        path = self._where.get(key)
        if path is None:
            raise KeyError(f"the base checkpoint has no {key!r}, which the adapter export needs")
        if path in self._bin:
            return self._bin[path][key]
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)


@torch.no_grad()
def build_peft_adapter(model: nn.Module, checkpointer: Any, *, experts: int,
                       rank: Optional[int], base_weights: Optional[Dict[str, torch.Tensor]] = None,
                       state: Optional[Dict[str, torch.Tensor]] = None,
                       device: Optional[torch.device] = None, seed: int = 0) -> PeftAdapter:
    """The PEFT adapter of what the epoch export adds to the base checkpoint.

    Args:
        model: the (possibly FSDP-sharded) model; used for its adapted layers and scales.
        checkpointer: the run's ``FullModelHFCheckpointer``; ``W_0`` is read from its files.
        experts: experts begun so far (merged or live); with noise off the delta's rank is at
            most ``experts × r``.
        rank: ``lorasc.adapter_export_rank`` (truncated SVD at this rank), or ``None`` for the
            exact adapter (only valid with noise off, see :func:`peft_adapter_problem`).
        base_weights: the engine's fp32 masters (``{"<layer>.weight": W}``), which the merged
            export folds from where kept; ``state`` (or the model) gives ``W`` elsewhere.
        state: the full state dict where the model is sharded (gathered on rank 0).
        device: where to factor (the run's device; default CPU).

    Returns:
        A :class:`PeftAdapter`; its report holds each module's relative Frobenius error.
    """
    state = model.state_dict() if state is None else state
    masters = base_weights or {}
    to_hf = hf_converter(checkpointer)
    base = _BaseWeights(hf_checkpoint(checkpointer).paths)
    device = torch.device("cpu") if device is None else torch.device(device)
    tensors: Dict[str, torch.Tensor] = {}
    ranks: Dict[str, int] = {}
    errors: Dict[str, float] = {}
    full_rank = []
    for layer in find_adapters(model):
        key = f"{layer.name}.weight"
        W = masters[key] if key in masters else state[key]
        A = state[f"{layer.name}.lora_a.weight"].to(device, torch.float32)
        B = state[f"{layer.name}.lora_b.weight"].to(device, torch.float32)
        # The merged export's fold, kept in fp32 (a bf16 merged file rounds it; the adapter
        # is the unrounded update).
        W_T, _ = fold_adapter(W.to(device), A, B, layer.scale, dtype=torch.float32)
        [(hf_key, W_T_hf)] = to_hf({key: W_T}).items()
        delta = W_T_hf - base.get(hf_key).to(device, torch.float32)
        want = layer.rank * experts if rank is None else rank
        B_f, A_f = lowrank_factors(delta, want, exact=rank is None, seed=seed)
        module = hf_key[: -len(".weight")]
        errors[module] = relative_error(delta, B_f, A_f)
        ranks[module] = A_f.shape[0]
        if want >= min(delta.shape):
            full_rank.append(module)
        tensors[f"base_model.model.{module}.lora_A.weight"] = A_f.cpu()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B_f.cpu()
        del W_T, W_T_hf, delta
    r = max(ranks.values())
    # PEFT scales by lora_alpha / r; the scale s is already in B, so alpha = rank everywhere.
    pattern = {m: k for m, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": hf_checkpoint(checkpointer).source,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    report = {
        "mode": "exact" if rank is None else "truncated_svd",
        "experts": experts,
        "rank_asked": rank,
        "ranks": ranks,
        "full_rank_modules": full_rank,
        "relative_frobenius_error": errors,
        "max_relative_frobenius_error": max(errors.values()),
    }
    return PeftAdapter(tensors, config, report)


def describe(adapter: PeftAdapter) -> str:
    """One log line: mode, rank and the error summary (every module's error is in the JSON)."""
    rep = adapter.report
    errors = rep["relative_frobenius_error"]
    worst = max(errors, key=errors.get)
    line = (f"PEFT adapter ({rep['mode']}, r={adapter.config['r']}, {len(errors)} matrices): "
            f"relative Frobenius error of W_T - W_0 max {errors[worst]:.3g} ({worst}), mean "
            f"{math.fsum(errors.values()) / len(errors):.3g}")
    if rep["full_rank_modules"]:
        line += (f"; {len(rep['full_rank_modules'])} matrices written at full rank (the rank "
                 f"asked for reaches min(d_out, d_in)), no smaller than the weights themselves")
    return line


__all__ = ["ADAPTER_DIRNAME", "PeftAdapter", "build_peft_adapter", "describe", "hf_converter",
           "lowrank_factors", "peft_adapter_problem", "relative_error"]
