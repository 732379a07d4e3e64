"""Finding, reading and exporting torchtune LoRA/DoRA adapters in any ``nn.Module``.

The cascade engine only needs four things from an adapted layer: its base weight ``W``
``[d_out, d_in]``, its fast factors ``A`` ``[r, d_in]`` and ``B`` ``[d_out, r]``, and its scale
``s``. :class:`AdaptedLayer` names them once so that the engine reads like the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn
from torchtune.modules.peft import DoRALinear, LoRALinear


@dataclass
class AdaptedLayer:
    """One adapted linear layer: ``y = (W + s·B·A) x (+ bias)``, DoRA-normalised if ``dora``."""

    name: str  # the layer's state-dict prefix, e.g. "layers.0.attn.q_proj"
    module: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def lora_a(self) -> torch.Tensor:
        return self.module.lora_a.weight

    @property
    def lora_b(self) -> torch.Tensor:
        return self.module.lora_b.weight

    @property
    def scale(self) -> float:
        m = self.module
        return float(m.scaling) if hasattr(m, "scaling") else float(m.alpha) / float(m.rank)

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    @property
    def dora(self) -> bool:
        return isinstance(self.module, DoRALinear)

    @property
    def shape(self) -> tuple:
        """``(d_out, d_in)`` of the full weight (a DTensor reports its global shape too)."""
        return (self.lora_b.shape[0], self.lora_a.shape[1])


class PeftAdaptedLayer(AdaptedLayer):
    """A Hugging Face PEFT ``lora.Linear`` (its active adapter) seen as an :class:`AdaptedLayer`.

    PEFT keeps ``W`` in ``base_layer`` and one ``lora_A`` / ``lora_B`` per adapter name, with
    ``scaling[name] = lora_alpha / r``; the engine needs nothing else, so the cascade runs on
    PEFT models exactly as on torchtune's layers.
    """

    @property
    def _adapter(self) -> str:
        active = self.module.active_adapters
        return active[0] if isinstance(active, (list, tuple)) else active

    @property
    def weight(self) -> torch.Tensor:
        return self.module.base_layer.weight

    @property
    def lora_a(self) -> torch.Tensor:
        return self.module.lora_A[self._adapter].weight

    @property
    def lora_b(self) -> torch.Tensor:
        return self.module.lora_B[self._adapter].weight

    @property
    def scale(self) -> float:
        return float(self.module.scaling[self._adapter])

    @property
    def dora(self) -> bool:
        return False


def _is_peft_lora_linear(module: nn.Module) -> bool:
    """PEFT's LoRA ``Linear`` (duck-typed: PEFT need not be installed to run the rest)."""
    return (isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(module, "base_layer", None), nn.Linear))


def _peft_layer(name: str, module: nn.Module) -> PeftAdaptedLayer:
    layer = PeftAdaptedLayer(name, module)
    adapter = layer._adapter
    if len(module.active_adapters) != 1 or adapter not in module.lora_A:
        raise ValueError(f"{name}: LoRASC drives one active PEFT adapter per layer; this one has "
                         f"{list(module.active_adapters)}")
    if module.use_dora.get(adapter, False):
        raise ValueError(f"{name}: PEFT DoRA layers are not supported by the LoRASC engine; use "
                         f"lorasc_tune.adapters.inject(..., use_dora=True) (torchtune's DoRA)")
    return layer


# Wrappers that add a segment to module and parameter names but not to state-dict keys:
# activation checkpointing (torch's CheckpointWrapper, which torchtune's
# set_activation_checkpointing applies per layer). A whole-module torch.compile's ``_orig_mod.``
# is not one of them: it stays in the state-dict keys too (torchtune compiles layers in place).
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.",)


def state_dict_name(name: str) -> str:
    """``name`` from ``named_modules()``/``named_parameters()`` as its state-dict key.

    ``layers.0._checkpoint_wrapped_module.attn.q_proj`` -> ``layers.0.attn.q_proj``. Every key
    this project builds (checkpoint exports, training states, fp32 masters) uses this form, so
    it does not depend on whether activation checkpointing is on.
    """
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def parameters_by_state_dict_name(model: nn.Module) -> Dict[str, nn.Parameter]:
    """``{state-dict key: parameter}`` for every parameter of ``model``."""
    return {state_dict_name(n): p for n, p in model.named_parameters()}


def find_adapters(model: nn.Module) -> List[AdaptedLayer]:
    """All torchtune ``LoRALinear``/``DoRALinear`` layers (subclasses included) and Hugging Face
    PEFT LoRA ``Linear`` layers, in module order.

    Each layer is named by its state-dict key (see :func:`state_dict_name`).
    """
    layers: List[AdaptedLayer] = []
    for name, m in model.named_modules():
        if isinstance(m, (LoRALinear, DoRALinear)):
            layers.append(AdaptedLayer(state_dict_name(name), m))
        elif _is_peft_lora_linear(m):
            layers.append(_peft_layer(state_dict_name(name), m))
    return layers


def adapter_key_names(layer: AdaptedLayer) -> List[str]:
    keys = [f"{layer.name}.lora_a.weight", f"{layer.name}.lora_b.weight"]
    if layer.dora:
        keys.append(f"{layer.name}.magnitude")
    return keys


@torch.no_grad()
def fold_adapter(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                 magnitude: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                 dtype: Optional[torch.dtype] = None):
    """A layer's effective weight and bias as *new* tensors, with the adapter folded in.

    LoRA: ``W + s·B·A``. DoRA (``magnitude`` given): ``m / ‖W + s·B·A‖_row · (W + s·B·A)``;
    torchtune's DoRA scales the whole base output, bias included, by that factor, so the bias
    is scaled too. Computed in float32 and returned in ``dtype`` (default: ``W``'s dtype; the
    PEFT export asks for float32, the unrounded update).

    Args:
        weight: ``[d_out, d_in]``; lora_a: ``[r, d_in]``; lora_b: ``[d_out, r]``;
        magnitude: ``[d_out]`` or None; bias: ``[d_out]`` or None.
        dtype: the returned weight's dtype, or None for ``weight.dtype``.

    Returns:
        ``(weight [d_out, d_in], bias [d_out] or None)``, never sharing storage with the inputs.
    """
    full = torch.addmm(weight.float(), lora_b.float(), lora_a.float(), alpha=scale)
    if magnitude is not None:
        row_scale = magnitude.float() / torch.linalg.norm(full, dim=1)
        full = full * row_scale[:, None]
        if bias is not None:
            bias = (bias.float() * row_scale).to(bias.dtype)
    elif bias is not None:
        bias = bias.detach().clone()
    return full.to(weight.dtype if dtype is None else dtype), bias


def fold_adapters_in_state_dict(state: Dict[str, torch.Tensor],
                                scales: Dict[str, float]) -> Dict[str, torch.Tensor]:
    """A new state dict with every adapter folded in and its keys removed.

    Works on full (unsharded) tensors, e.g. a state dict gathered on rank 0. The input is not
    modified: a save must never merge into live weights (torchtune's CPU ``.cpu()`` path does,
    which counts the adapter again after every save). Unadapted entries are passed through.

    Args:
        state: ``{name: tensor}`` with ``<layer>.weight``, ``<layer>.lora_a.weight``,
            ``<layer>.lora_b.weight`` (and ``<layer>.magnitude`` for DoRA) per adapted layer.
        scales: ``{layer name: s}`` for every adapted layer.
    """
    out = dict(state)
    for name, scale in scales.items():
        W, b = fold_adapter(
            state[f"{name}.weight"], state[f"{name}.lora_a.weight"],
            state[f"{name}.lora_b.weight"], scale, magnitude=state.get(f"{name}.magnitude"),
            bias=state.get(f"{name}.bias"))
        out[f"{name}.weight"] = W
        if b is not None:
            out[f"{name}.bias"] = b
        for key in ("lora_a.weight", "lora_b.weight", "magnitude"):
            out.pop(f"{name}.{key}", None)
    return out


def merged_state_dict(model: nn.Module,
                      base_weights: Optional[Dict[str, torch.Tensor]] = None,
                      state: Optional[Dict[str, torch.Tensor]] = None
                      ) -> Dict[str, torch.Tensor]:
    """The model's state dict with every adapter folded in, on CPU.

    Args:
        state: the model's full state dict where the model itself is sharded (FSDP2: gathered
            on rank 0 by the caller); default ``model.state_dict()``.
        base_weights: optional ``{"<layer>.weight": full-precision W}`` that replace the
            model's own base weights in the fold, e.g. the engine's fp32 masters
            (:meth:`CascadeEngine.master_weights`): a QLoRA export then folds from the
            full-precision source of truth, not from the NF4 weight, and a bf16 run with an
            fp32 master rounds once, at the end. Each folded weight is stored in the dtype the
            model's state dict has for it (bf16 for a bf16 or QLoRA model).
    """
    state = {k: v.detach() for k, v in (model.state_dict() if state is None else state).items()}
    dtypes = {}
    for key, master in (base_weights or {}).items():
        if key not in state:
            raise KeyError(f"merged_state_dict: {key!r} is not in the model's state dict")
        dtypes[key] = state[key].dtype
        # Fold on the adapter's device; NF4 state-dict hooks may have moved W to CPU.
        lora_a = state[key[: -len("weight")] + "lora_a.weight"]
        state[key] = master.to(device=lora_a.device, dtype=torch.float32)
    merged = fold_adapters_in_state_dict(state, {l.name: l.scale for l in find_adapters(model)})
    for key, dtype in dtypes.items():
        merged[key] = merged[key].to(dtype)
    return {k: v.cpu() for k, v in merged.items()}


@torch.no_grad()
def init_dora_magnitudes(model: nn.Module) -> None:
    """Set every DoRA magnitude to the row norms of ``W + s·B·A`` (DoRA's initialisation).

    Done row by row on each rank's own shard, so it is exact under FSDP2 as well (the
    magnitude, ``W`` and ``B`` are all sharded on dim 0; ``A`` is gathered, ``r × d_in``).
    """
    from lorasc_tune.sharding import gather_rows, local_rows

    for layer in find_adapters(model):
        if not layer.dora:
            continue
        W, _ = local_rows(layer.weight)
        B, _ = local_rows(layer.lora_b)
        a_local, _ = local_rows(layer.lora_a)
        A = gather_rows(a_local, layer.lora_a)
        mag, _ = local_rows(layer.module.magnitude)
        full = torch.addmm(W.float(), B.float(), A.float().to(W.device), alpha=layer.scale)
        mag.copy_(torch.linalg.norm(full, dim=1).to(mag.dtype))


def inject(
    model: nn.Module,
    target_names: Iterable[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    use_dora: bool = False,
) -> List[str]:
    """Swap named ``nn.Linear`` children for torchtune ``LoRALinear``/``DoRALinear`` in place.

    Any module whose attribute name is in ``target_names`` (e.g. ``("query", "value")`` for
    BERT-style models) is replaced; its weight and bias are kept, so with ``B = 0`` the model's
    outputs are unchanged. Only the adapter parameters are left trainable.

    Returns:
        The dotted names of the replaced modules.
    """
    targets = set(target_names)
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name not in targets or not isinstance(child, nn.Linear):
                continue
            cls = DoRALinear if use_dora else LoRALinear
            new = cls(child.in_features, child.out_features, rank=rank, alpha=alpha,
                      dropout=dropout, use_bias=child.bias is not None)
            new = new.to(device=child.weight.device, dtype=child.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(child.weight)
                if child.bias is not None:
                    new.bias.copy_(child.bias)
            setattr(parent, child_name, new)
            replaced.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    if not replaced:
        raise ValueError(f"inject: no nn.Linear named any of {sorted(targets)} in the model")
    if use_dora:
        init_dora_magnitudes(model)
    adapter_names = set()
    for layer in find_adapters(model):
        adapter_names.update(adapter_key_names(layer))
    for name, p in model.named_parameters():
        p.requires_grad_(name in adapter_names)
    return replaced
