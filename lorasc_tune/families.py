"""Model families: the corrections Gemma2 needs before torchtune 0.6.1 trains the model that
Hugging Face's checkpoint describes.

The recipes train any torchtune decoder read through ``FullModelHFCheckpointer``; Llama-3.1,
Llama-3.2, Qwen2.5, Mistral, Phi-3 and Phi-4 need nothing from this module
(``tests/test_model_families.py`` trains each through the recipe and checks its export
against transformers). torchtune 0.6.1's Gemma2 differs from Hugging Face's ``Gemma2`` in
three ways, each of which changes the logits:

1. **Weight conversion.** ``torchtune.models.gemma2._convert_weights`` maps HF's
   ``pre_feedforward_layernorm`` to ``mlp_scale`` (torchtune's norm *after* the MLP) and
   ``post_feedforward_layernorm`` to ``mlp_norm`` (the norm *before* it): the wrong way round.
   The export applies the inverse mapping, so the names come back right and the mistake is
   invisible in the files, but training runs on a different network (the logits of a tiny
   random Gemma2 differ by far more than rounding), and the updates merged into the export were learnt
   on it. :func:`fix_gemma2_conversion` swaps the two entries of torchtune's mapping, in place
   and only while they are wrong; both directions (load and export) read that one mapping.
2. **Final logit soft-capping.** torchtune's ``Gemma2FinalNorm`` soft-caps the *normalised
   hidden state* before the output projection; Gemma2 soft-caps the *logits*.
   :func:`cap_gemma2_logits` moves the cap to the logits (no parameter or state-dict key
   changes).
3. **Capping values.** torchtune's named builders (``gemma2_2b``, ``gemma2_9b``, their LoRA
   versions) pass an attention cap of 30 and a final cap of 50; Gemma-2's ``config.json``
   has ``attn_logit_softcapping: 50`` and ``final_logit_softcapping: 30``.

The builders here (:func:`lora_gemma2_2b`, :func:`lora_gemma2_9b`, :func:`lora_gemma2` for
any size, and their non-LoRA counterparts) build torchtune's Gemma2 with 2 and 3 corrected;
:func:`prepare_checkpoint_conversion`, which the recipes call where they load the base
checkpoint, applies 1 for ``model_type: GEMMA2`` and warns, once, when ``model`` is one of
torchtune's own Gemma2 builders. With all three, a tiny random Gemma2 gives transformers'
logits to within 1e-5 in fp32, trained or not.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List

import torch
from torch import nn

_HF_PRE_FF = "model.layers.{}.pre_feedforward_layernorm.weight"
_HF_POST_FF = "model.layers.{}.post_feedforward_layernorm.weight"
_TUNE_BEFORE_MLP = "layers.{}.mlp_norm.scale"
_TUNE_AFTER_MLP = "layers.{}.mlp_scale.scale"

# Gemma-2's own settings (config.json of google/gemma-2-2b and -9b); torchtune's named
# builders agree on everything but the two capping values.
GEMMA2_2B = dict(vocab_size=256_000, num_layers=26, num_heads=8, head_dim=256, num_kv_heads=4,
                 embed_dim=2304, intermediate_dim=9216, max_seq_len=8192, norm_eps=1e-6,
                 sliding_window_size=4096, hidden_capping_value=50.0, final_capping_value=30.0)
GEMMA2_9B = dict(GEMMA2_2B, num_layers=42, num_heads=16, num_kv_heads=8, embed_dim=3584,
                 intermediate_dim=14336)

_warned = False


def fix_gemma2_conversion() -> bool:
    """Make torchtune's Gemma2 HF <-> torchtune weight conversion map the feed-forward norms
    the right way round: HF ``pre_feedforward_layernorm`` <-> ``mlp_norm`` (applied before the
    MLP), ``post_feedforward_layernorm`` <-> ``mlp_scale`` (after it).

    Edits ``torchtune.models.gemma2._convert_weights._GEMMA2_FROM_HF`` in place, which both
    ``gemma2_hf_to_tune`` and ``gemma2_tune_to_hf`` read when called. Idempotent, and a no-op
    on a torchtune whose mapping is already right.

    Returns:
        True if this call changed the mapping.
    """
    from torchtune.models.gemma2 import _convert_weights

    mapping = _convert_weights._GEMMA2_FROM_HF
    if mapping.get(_HF_PRE_FF) == _TUNE_AFTER_MLP and mapping.get(_HF_POST_FF) == _TUNE_BEFORE_MLP:
        mapping[_HF_PRE_FF], mapping[_HF_POST_FF] = _TUNE_BEFORE_MLP, _TUNE_AFTER_MLP
        return True
    return False


class _SoftCappedOutput(nn.Module):
    """``cap * tanh(output(h) / cap)``: the output projection with Gemma2's logit soft-capping.

    Holds torchtune's ``TiedLinear`` (not a module, so no state-dict key moves)."""

    def __init__(self, output: Any, capping_value: float) -> None:
        super().__init__()
        if isinstance(output, nn.Module):
            raise TypeError("Gemma2's output projection is expected to be torchtune's TiedLinear")
        self.output = output
        self.capping_value = float(capping_value)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (..., embed_dim) -> logits (..., vocab_size), soft-capped."""
        return torch.tanh(self.output(h) / self.capping_value) * self.capping_value


def cap_gemma2_logits(model: nn.Module) -> nn.Module:
    """Move a torchtune Gemma2's final soft-capping from the normalised hidden state (where
    torchtune 0.6.1's ``Gemma2FinalNorm`` applies it) to the logits, where Gemma2 applies it.
    The cap keeps the model's ``final_capping_value``. Returns ``model``, changed in place."""
    norm = model.norm
    if not hasattr(norm, "logit_capping"):
        raise TypeError(f"not a torchtune Gemma2 decoder: its norm is {type(norm).__name__}")
    if isinstance(norm.logit_capping, nn.Identity):  # already moved
        return model
    norm.logit_capping = nn.Identity()
    model.output = _SoftCappedOutput(model.output, norm.capping_value)
    return model


def gemma2(**kwargs: Any) -> nn.Module:
    """torchtune's ``gemma2`` component builder (any size; same arguments), soft-capping the
    logits as Gemma2 does."""
    from torchtune.models.gemma2 import gemma2 as _gemma2

    return cap_gemma2_logits(_gemma2(**kwargs))


def lora_gemma2(lora_attn_modules: List[str], apply_lora_to_mlp: bool = False,
                **kwargs: Any) -> nn.Module:
    """torchtune's ``lora_gemma2`` component builder (any size; same arguments), soft-capping
    the logits as Gemma2 does."""
    from torchtune.models.gemma2 import lora_gemma2 as _lora_gemma2

    return cap_gemma2_logits(_lora_gemma2(lora_attn_modules, apply_lora_to_mlp, **kwargs))


def gemma2_2b() -> nn.Module:
    """Gemma-2-2B as Hugging Face's ``google/gemma-2-2b`` computes it."""
    return gemma2(**GEMMA2_2B)


def gemma2_9b() -> nn.Module:
    """Gemma-2-9B as Hugging Face's ``google/gemma-2-9b`` computes it."""
    return gemma2(**GEMMA2_9B)


def _lora_gemma2_sized(size: Dict[str, Any], name: str):
    """A LoRA builder for one Gemma-2 size, with the arguments of torchtune's own (``name``)."""

    def build(lora_attn_modules: List[str], apply_lora_to_mlp: bool = False, lora_rank: int = 8,
              lora_alpha: float = 16, lora_dropout: float = 0.0, use_dora: bool = False,
              quantize_base: bool = False) -> nn.Module:
        return lora_gemma2(lora_attn_modules, apply_lora_to_mlp, lora_rank=lora_rank,
                           lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_dora=use_dora,
                           quantize_base=quantize_base, **size)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"{name} with LoRA: the arguments of ``torchtune.models.gemma2.{name}``, "
                     f"with Gemma-2's capping values and the cap on the logits.")
    return build


lora_gemma2_2b = _lora_gemma2_sized(GEMMA2_2B, "lora_gemma2_2b")
lora_gemma2_9b = _lora_gemma2_sized(GEMMA2_9B, "lora_gemma2_9b")


_BUILDERS = ("gemma2", "lora_gemma2", "gemma2_2b", "gemma2_9b", "lora_gemma2_2b", "lora_gemma2_9b")


def prepare_checkpoint_conversion(cfg: Any) -> None:
    """Called where a recipe loads its base checkpoint, before it converts anything.

    For ``checkpointer.model_type: GEMMA2``: corrects torchtune's weight conversion
    (:func:`fix_gemma2_conversion`), and warns once if ``model`` is one of torchtune's own
    Gemma2 builders, whose logits are not Gemma2's (see the module docstring). Other model
    types are left alone.
    """
    global _warned

    checkpointer = cfg.get("checkpointer", None) or {}
    if str(checkpointer.get("model_type", "")).upper() != "GEMMA2":
        return
    fix_gemma2_conversion()
    model = cfg.get("model", None) or {}
    component = str(model.get("_component_", ""))
    if component.startswith("torchtune.models.gemma2") and not _warned:
        _warned = True
        name = component.rsplit(".", 1)[-1]
        instead = (f"lorasc_tune.families.{name} (same arguments)" if name in _BUILDERS else
                   "a builder from lorasc_tune.families (gemma2, lora_gemma2, lora_gemma2_2b, "
                   "lora_gemma2_9b...)")
        warnings.warn(
            f"model: {component} is torchtune 0.6.1's Gemma2, which is not the model in the "
            f"Hugging Face checkpoint: it soft-caps the normalised hidden state instead of the "
            f"logits, and its named builders swap the attention and final capping values "
            f"(30 and 50; Gemma-2 uses 50 and 30). Training and the exported weights will not "
            f"match transformers' Gemma2. Use {instead} instead.", UserWarning, stacklevel=2)
