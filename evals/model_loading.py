"""Load a torchtune decoder and tokenizer from the checkpoint folders our recipes write.

A merged checkpoint is a Hugging Face folder: ``config.json`` plus ``model-0000K-of-0000N.safetensors``
(``tune download`` output, or ``${output_dir}/epoch_{N}/`` after training). We read it with torchtune's
own ``FullModelHFCheckpointer`` so the HF -> torchtune key and RoPE-permutation conversion is the one
training uses, and build the matching ``llama2(...)`` decoder from ``config.json``.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

log = logging.getLogger(__name__)

# HF weight files in a checkpoint folder, best first. Adapter-only files are never model weights.
_WEIGHT_PATTERNS = ("model-*-of-*.safetensors", "*.safetensors", "pytorch_model*.bin", "model-*-of-*.bin")
_NOT_WEIGHTS = re.compile(r"^adapter_model")

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}

# config.json ``model_type`` -> torchtune checkpointer model type. Only Llama-2-shaped models are
# built here; anything else gets a clear error rather than a silently wrong architecture.
_SUPPORTED_MODEL_TYPES = {"llama": "LLAMA2"}


def resolve_device(device: Optional[str]) -> torch.device:
    """``None``/``"auto"`` -> cuda if present else cpu; a CUDA request on a machine without CUDA
    falls back to cpu with a warning (lm-eval's CLI passes ``cuda:0`` unless told otherwise)."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        log.warning("device=%s requested but CUDA is not available; using cpu", device)
        return torch.device("cpu")
    return dev


def resolve_dtype(dtype: Optional[str | torch.dtype], device: torch.device) -> torch.dtype:
    """``None``/``"auto"`` -> bf16 on a GPU that supports it, else fp32; names like ``bf16``/``float32``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    key = str(dtype).replace("torch.", "").lower()
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))} or 'auto'")
    return _DTYPES[key]


def find_checkpoint_files(checkpoint_dir: Path) -> List[str]:
    """Names of the model weight files in ``checkpoint_dir`` (sorted shard order).

    Raises ``FileNotFoundError`` naming the folder when there is no ``config.json`` or no weights.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir / 'config.json'} not found: checkpoint_dir must be a Hugging Face "
            "checkpoint folder (config.json + model-*.safetensors), e.g. <output_dir>/epoch_0"
        )
    for pattern in _WEIGHT_PATTERNS:
        names = sorted(p.name for p in checkpoint_dir.glob(pattern) if not _NOT_WEIGHTS.match(p.name))
        if names:
            return names
    raise FileNotFoundError(
        f"no model weights (model-*-of-*.safetensors or pytorch_model*.bin) in {checkpoint_dir}"
    )


def unsupported_settings(config: Dict[str, Any]) -> List[str]:
    """One message per ``config.json`` setting that torchtune's ``llama2(...)`` cannot build, each
    naming the key; empty for a Llama-2-shaped config.

    ``llama2`` has plain RoPE, separate input and output embeddings, ``hidden_size / heads``-wide
    heads, bias-free projections and a SiLU MLP. A config asking for anything else would load (or
    fail on a shape) as a different network from the one that was trained, so it is refused.
    HF's defaults apply to absent keys, as ``LlamaConfig`` fills them in.
    """
    problems = []
    model_type = config.get("model_type", "llama")
    if model_type not in _SUPPORTED_MODEL_TYPES:
        problems.append(f"model_type={model_type!r} (supported: {sorted(_SUPPORTED_MODEL_TYPES)})")
    if config.get("rope_scaling") is not None:
        problems.append(f"rope_scaling={config['rope_scaling']!r} (only unscaled RoPE: null)")
    if config.get("tie_word_embeddings", False):
        problems.append("tie_word_embeddings=true (the output projection must be its own weight)")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    head_dim = config.get("head_dim")
    if head_dim is not None and hidden is not None and heads and head_dim * heads != hidden:
        problems.append(f"head_dim={head_dim} (must equal hidden_size / num_attention_heads = "
                        f"{hidden} / {heads})")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key, False):
            problems.append(f"{key}=true (projections must have no bias)")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config['hidden_act']!r} (only 'silu')")
    return problems


def llama2_args_from_hf_config(config: Dict[str, Any], max_seq_len: Optional[int] = None) -> Dict[str, Any]:
    """torchtune ``llama2(...)`` builder arguments for an HF ``LlamaForCausalLM`` ``config.json``;
    a ``ValueError`` listing every setting ``llama2`` cannot build (see :func:`unsupported_settings`)."""
    problems = unsupported_settings(config)
    if problems:
        raise ValueError("config.json describes a model llama2(...) cannot build: " + "; ".join(problems))
    num_heads = config["num_attention_heads"]
    return dict(
        vocab_size=config["vocab_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads,
        embed_dim=config["hidden_size"],
        intermediate_dim=config.get("intermediate_size"),
        max_seq_len=int(max_seq_len or config.get("max_position_embeddings", 4096)),
        norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_base=config.get("rope_theta", 10000.0),
    )


def load_model(
    checkpoint_dir: str | Path,
    *,
    checkpoint_files: Optional[Sequence[str]] = None,
    max_seq_len: Optional[int] = None,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """Build the decoder described by ``checkpoint_dir/config.json`` and load its weights.

    Returns a ``TransformerDecoder`` in eval mode on ``device`` with parameters in ``dtype``;
    ``model(tokens[b, s]) -> logits[b, s, vocab]``.
    """
    from torchtune import training
    from torchtune.models.llama2 import llama2

    checkpoint_dir = Path(checkpoint_dir)
    files = list(checkpoint_files) if checkpoint_files else find_checkpoint_files(checkpoint_dir)
    config = json.loads((checkpoint_dir / "config.json").read_text())
    args = llama2_args_from_hf_config(config, max_seq_len=max_seq_len)
    # The checkpointer insists on an output folder (it would write there when saving); reading only,
    # so a throwaway folder outside the checkpoint keeps the user's tree untouched.
    with tempfile.TemporaryDirectory(prefix="lorasc_eval_ckpt_") as scratch:
        checkpointer = training.FullModelHFCheckpointer(
            checkpoint_dir=str(checkpoint_dir), checkpoint_files=files,
            model_type=_SUPPORTED_MODEL_TYPES[config.get("model_type", "llama")],
            output_dir=scratch,
        )
        state_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]
    # Build on the meta device (no random init of billions of weights), then adopt the loaded
    # tensors, already cast and moved, with assign=True.
    with torch.device("meta"):
        model = llama2(**args)
    state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    # RoPE tables are non-persistent buffers, still on meta: rebuild them on the device. They stay
    # fp32 (rope_init builds them in the default dtype), as HF Llama computes rotations in fp32.
    with torch.device(device):
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()
    model.requires_grad_(False)
    return model.eval()


def load_tokenizer(tokenizer_path: str | Path, max_seq_len: Optional[int] = None):
    """torchtune ``Llama2Tokenizer`` (SentencePiece) for ``tokenizer_path``, with no prompt template:
    lm-eval builds the full prompt text itself."""
    from torchtune.models.llama2 import llama2_tokenizer

    path = Path(tokenizer_path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path} (pass tokenizer_path=<.../tokenizer.model>)")
    return llama2_tokenizer(str(path), max_seq_len=max_seq_len, prompt_template=None)


def load_model_and_tokenizer(
    checkpoint_dir: str | Path, tokenizer_path: str | Path, **kwargs: Any
) -> Tuple[torch.nn.Module, Any]:
    """Convenience: ``(load_model(checkpoint_dir, **kwargs), load_tokenizer(tokenizer_path))``."""
    return load_model(checkpoint_dir, **kwargs), load_tokenizer(tokenizer_path)
