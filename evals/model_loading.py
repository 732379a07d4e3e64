"""Load a torchtune decoder and tokenizer from a Hugging Face checkpoint folder, for every model family
the recipes ship configs for: Llama-2, Llama-3.x, Mistral, Qwen2.5 and Phi-3.

A merged checkpoint is a Hugging Face folder: ``config.json`` plus ``model-0000K-of-0000N.safetensors``
(``tune download`` output, or ``${output_dir}/epoch_{N}/`` after training). The weights are read with
torchtune's own ``FullModelHFCheckpointer`` under the family's model type, so the HF -> torchtune key
mapping (and, for Llama/Mistral, the RoPE permutation of q/k; for Phi-3, the split of the fused
projections) is the one training uses. The decoder is assembled from torchtune's modules with every
architectural setting taken from the *whole* ``config.json`` (:func:`decoder_spec`): vocabulary,
depth, heads and KV heads, head size, MLP width, norm epsilon, RoPE base and Llama-3 RoPE scaling
(``rope_parameters`` as transformers 5 writes it, or ``rope_theta`` / ``rope_scaling`` as older
versions did), q/k/v biases, tied embeddings, sliding windows. A setting torchtune cannot reproduce
exactly is refused with an error that names it: the model is never built differently from the one
in the checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import asdict, dataclass, field
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

#: config.json ``model_type`` -> (torchtune checkpointer model type, RoPE layout after conversion,
#: family). torchtune permutes Llama/Mistral q/k weights to interleaved RoPE pairs; Qwen2 and Phi-3
#: weights keep HF's rotate-half layout.
FAMILIES: Dict[str, Tuple[str, str, str]] = {
    "llama": ("LLAMA2", "interleaved", "Llama-2 / Llama-3.x"),
    "mistral": ("MISTRAL", "interleaved", "Mistral"),
    "qwen2": ("QWEN2", "half", "Qwen2 / Qwen2.5"),
    "phi3": ("PHI3_MINI", "half", "Phi-3"),
}

# HF's defaults for keys a config may omit (as the transformers config classes fill them in).
_DEFAULT_ROPE_THETA = {"llama": 10000.0, "mistral": 10000.0, "qwen2": 10000.0, "phi3": 10000.0}


class UnsupportedConfigError(ValueError):
    """``config.json`` asks for something the torchtune decoder cannot reproduce exactly."""


@dataclass(frozen=True)
class DecoderSpec:
    """Everything needed to build the decoder of one checkpoint (see :func:`decoder_spec`)."""

    model_type: str
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int
    norm_eps: float
    rope_base: float
    rope_layout: str                      # "interleaved" (Llama, Mistral) or "half" (Qwen2, Phi-3)
    rope_scaling: Optional[Dict[str, float]] = field(default=None)  # Llama-3 scaling parameters
    qkv_bias: bool = False
    tie_word_embeddings: bool = False

    @property
    def checkpoint_model_type(self) -> str:
        return FAMILIES[self.model_type][0]

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


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


# ---- reading config.json ----------------------------------------------------------------------


def rope_settings(config: Dict[str, Any]) -> Tuple[str, float, Dict[str, Any], str]:
    """``(rope_type, theta, all rope parameters, the key they came from)`` of an HF config.

    transformers 5 writes ``rope_parameters: {rope_type, rope_theta, ...}``; earlier versions wrote
    ``rope_theta`` at the top level and an optional ``rope_scaling: {rope_type | type, factor, ...}``.
    Both are read; when both are present ``rope_parameters`` wins, as it does in transformers 5.
    """
    model_type = config.get("model_type", "llama")
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params and "rope_type" not in params:
        # Per-attention-type parameters (models with sliding and full layers): one set must do.
        kinds = {json.dumps(v, sort_keys=True) for v in params.values()}
        if len(kinds) != 1:
            raise UnsupportedConfigError(f"rope_parameters={params!r}: different RoPE per layer type")
        params = next(iter(params.values()))
    if isinstance(params, dict):
        source = "rope_parameters"
        params = dict(params)
    else:
        source = "rope_scaling" if config.get("rope_scaling") else "rope_theta"
        params = dict(config.get("rope_scaling") or {})
        if "rope_theta" in config:
            params.setdefault("rope_theta", config["rope_theta"])
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    theta = float(params.get("rope_theta", config.get("rope_theta", _DEFAULT_ROPE_THETA.get(model_type, 10000.0))))
    return str(rope_type), theta, params, source


def _sliding_window_limit(config: Dict[str, Any], problems: List[str]) -> Optional[int]:
    """The longest input for which the checkpoint's attention equals full causal attention (its
    sliding window), or None when it has no window. torchtune attends to the whole causal prefix,
    which is exactly the sliding-window model on inputs no longer than the window."""
    model_type = config.get("model_type", "llama")
    window = config.get("sliding_window")
    if model_type == "qwen2":
        layer_types = config.get("layer_types") or []
        uses = config.get("use_sliding_window", False) or "sliding_attention" in layer_types
        if not uses:
            return None
        if window is None:
            problems.append("use_sliding_window=true without a sliding_window size")
            return None
    if window is None:
        return None
    if not isinstance(window, int) or window < 1:
        problems.append(f"sliding_window={window!r} (expected a positive integer or null)")
        return None
    # HF: a query at i sees keys j with i - j < window; on inputs of at most `window` tokens that is
    # every earlier key.
    return int(window)


def unsupported_settings(config: Dict[str, Any]) -> List[str]:
    """One message per ``config.json`` setting the decoder cannot reproduce exactly, each naming the
    key; empty when the checkpoint can be built. See :func:`decoder_spec`."""
    problems: List[str] = []
    _check(config, problems)
    return problems


def _check(config: Dict[str, Any], problems: List[str]) -> Optional[Tuple[str, float, Dict[str, Any], str]]:
    model_type = config.get("model_type", "llama")
    if model_type not in FAMILIES:
        problems.append(f"model_type={model_type!r} (supported: {sorted(FAMILIES)}: "
                        + ", ".join(f[2] for f in FAMILIES.values()) + ")")
        return None
    for key in ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size"):
        if not isinstance(config.get(key), int):
            problems.append(f"{key}={config.get(key)!r} (required, an integer)")
    if problems:
        return None
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if heads % kv_heads:
        problems.append(f"num_key_value_heads={kv_heads} (must divide num_attention_heads={heads})")
    head_dim = config.get("head_dim") or hidden // heads
    if config.get("head_dim") is None and hidden % heads:
        problems.append(f"hidden_size={hidden} (not divisible by num_attention_heads={heads}; set head_dim)")
    if model_type == "phi3" and head_dim * heads != hidden:
        problems.append(f"head_dim={head_dim} (Phi-3 checkpoints need head_dim x heads = hidden_size = {hidden})")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config['hidden_act']!r} (only 'silu')")
    if config.get("mlp_bias", False):
        problems.append("mlp_bias=true (the MLP projections must have no bias)")
    if config.get("attention_bias", False) and model_type != "qwen2":
        problems.append("attention_bias=true (only Qwen2's q/k/v biases are supported)")
    try:
        rope = rope_settings(config)
    except UnsupportedConfigError as err:
        problems.append(str(err))
        return None
    rope_type, theta, params, source = rope
    if rope_type not in ("default", "llama3"):
        problems.append(f"{source}: rope_type={rope_type!r} (supported: 'default', and 'llama3' for "
                        "Llama-3.x)")
    elif rope_type == "llama3":
        if model_type != "llama":
            problems.append(f"{source}: rope_type='llama3' on model_type={model_type!r} (Llama only)")
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                               "original_max_position_embeddings") if k not in params]
        if missing:
            problems.append(f"{source}: llama3 RoPE scaling without {missing}")
        elif params["low_freq_factor"] == params["high_freq_factor"]:
            problems.append(f"{source}: llama3 RoPE scaling with low_freq_factor == high_freq_factor")
    factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor={factor} (only 1.0: RoPE on the whole head)")
    if params.get("attention_factor") not in (None, 1, 1.0):
        problems.append(f"{source}: attention_factor={params['attention_factor']} (only 1.0)")
    if config.get("tie_word_embeddings", False) and model_type == "phi3":
        problems.append("tie_word_embeddings=true (not a Phi-3 layout)")
    for key in ("qk_layernorm", "use_qk_norm"):
        if config.get(key):
            problems.append(f"{key}=true (no q/k norms)")
    return rope


def decoder_spec(config: Dict[str, Any], max_seq_len: Optional[int] = None) -> DecoderSpec:
    """The :class:`DecoderSpec` of an HF ``config.json``, or an :class:`UnsupportedConfigError`
    listing every setting that cannot be built exactly, each by its key.

    ``max_seq_len`` (default: ``max_position_embeddings``) is the context the model is used with;
    a checkpoint with a sliding window is exact only up to the window, so the default is capped at
    it and a longer explicit request is refused (naming ``sliding_window``).
    """
    problems: List[str] = []
    rope = _check(config, problems)
    window = _sliding_window_limit(config, problems) if rope is not None else None
    model_type = config.get("model_type", "llama")
    context = int(max_seq_len or config.get("max_position_embeddings") or 4096)
    if window is not None and context > window:
        if max_seq_len:
            problems.append(f"sliding_window={window} (max_seq_len={max_seq_len} asked for; attention is "
                            f"exact only up to {window} tokens)")
        else:
            log.info("%s: sliding_window=%d < max_position_embeddings=%d; using max_seq_len=%d, where "
                     "full causal attention equals the sliding window", model_type, window, context, window)
            context = window
    if problems:
        raise UnsupportedConfigError(
            f"config.json describes a model that cannot be built exactly: {'; '.join(problems)}")
    assert rope is not None
    rope_type, theta, params, _ = rope
    heads = config["num_attention_heads"]
    scaling = None
    if rope_type == "llama3":
        scaling = {"scale_factor": float(params["factor"]), "low_freq_factor": float(params["low_freq_factor"]),
                   "high_freq_factor": float(params["high_freq_factor"]),
                   "old_context_len": int(params["original_max_position_embeddings"])}
    return DecoderSpec(
        model_type=model_type,
        vocab_size=config["vocab_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        embed_dim=config["hidden_size"],
        intermediate_dim=config["intermediate_size"],
        max_seq_len=context,
        norm_eps=float(config.get("rms_norm_eps", 1e-5 if model_type == "phi3" else 1e-6)),  # HF defaults
        rope_base=theta,
        rope_layout=FAMILIES[model_type][1],
        rope_scaling=scaling,
        qkv_bias=model_type == "qwen2",
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


# ---- building the decoder ---------------------------------------------------------------------


def _rope(spec: DecoderSpec) -> torch.nn.Module:
    if spec.rope_scaling is not None:
        from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE

        return Llama3ScaledRoPE(dim=spec.head_dim, max_seq_len=spec.max_seq_len, base=spec.rope_base,
                                **spec.rope_scaling)
    if spec.rope_layout == "interleaved":
        from torchtune.modules import RotaryPositionalEmbeddings

        return RotaryPositionalEmbeddings(dim=spec.head_dim, max_seq_len=spec.max_seq_len, base=spec.rope_base)
    if spec.model_type == "phi3":
        from torchtune.models.phi3._position_embeddings import Phi3RotaryPositionalEmbeddings

        return Phi3RotaryPositionalEmbeddings(dim=spec.head_dim, max_seq_len=spec.max_seq_len, base=spec.rope_base)
    from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings

    return Qwen2RotaryPositionalEmbeddings(dim=spec.head_dim, max_seq_len=spec.max_seq_len, base=spec.rope_base)


def build_decoder(spec: DecoderSpec) -> torch.nn.Module:
    """A torchtune ``TransformerDecoder`` laid out as ``spec`` says (on the current default device),
    with the parameter names torchtune's HF converters produce."""
    from torch import nn
    from torchtune.modules import (FeedForward, MultiHeadAttention, RMSNorm, TiedLinear, TransformerDecoder,
                                   TransformerSelfAttentionLayer)

    rope = _rope(spec)  # shared by the layers, as in torchtune's builders
    d, h, kv, hd = spec.embed_dim, spec.num_heads, spec.num_kv_heads, spec.head_dim
    layers = nn.ModuleList()
    for _ in range(spec.num_layers):
        attn = MultiHeadAttention(
            embed_dim=d, num_heads=h, num_kv_heads=kv, head_dim=hd,
            q_proj=nn.Linear(d, h * hd, bias=spec.qkv_bias), k_proj=nn.Linear(d, kv * hd, bias=spec.qkv_bias),
            v_proj=nn.Linear(d, kv * hd, bias=spec.qkv_bias), output_proj=nn.Linear(h * hd, d, bias=False),
            pos_embeddings=rope, max_seq_len=spec.max_seq_len, attn_dropout=0.0)
        mlp = FeedForward(gate_proj=nn.Linear(d, spec.intermediate_dim, bias=False),
                          down_proj=nn.Linear(spec.intermediate_dim, d, bias=False),
                          up_proj=nn.Linear(d, spec.intermediate_dim, bias=False))
        layers.append(TransformerSelfAttentionLayer(
            attn=attn, mlp=mlp, sa_norm=RMSNorm(d, eps=spec.norm_eps), mlp_norm=RMSNorm(d, eps=spec.norm_eps)))
    tok_embeddings = nn.Embedding(spec.vocab_size, d)
    output = TiedLinear(tok_embeddings) if spec.tie_word_embeddings else nn.Linear(d, spec.vocab_size, bias=False)
    return TransformerDecoder(tok_embeddings=tok_embeddings, layers=layers, max_seq_len=spec.max_seq_len,
                              num_heads=h, head_dim=hd, norm=RMSNorm(d, eps=spec.norm_eps), output=output)


def _read_state_dict(checkpoint_dir: Path, files: List[str], spec: DecoderSpec) -> Dict[str, torch.Tensor]:
    from torchtune import training

    # The checkpointer insists on an output folder (it would write there when saving); reading only,
    # so a throwaway folder outside the checkpoint keeps the user's tree untouched.
    with tempfile.TemporaryDirectory(prefix="lorasc_eval_ckpt_") as scratch:
        checkpointer = training.FullModelHFCheckpointer(
            checkpoint_dir=str(checkpoint_dir), checkpoint_files=files,
            model_type=spec.checkpoint_model_type, output_dir=scratch)
        try:
            state_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]
        except Exception as err:  # torchtune's key mapper raises a bare Exception on unknown keys
            raise UnsupportedConfigError(
                f"{checkpoint_dir}: weights do not convert as a {FAMILIES[spec.model_type][2]} checkpoint "
                f"(model_type={spec.model_type!r}): {err}") from err
    if spec.tie_word_embeddings and "output.weight" in state_dict:
        # A tied checkpoint may still store lm_head; it must then be the embedding itself.
        head = state_dict.pop("output.weight")
        if not torch.equal(head, state_dict["tok_embeddings.weight"]):
            raise UnsupportedConfigError(
                f"{checkpoint_dir}: tie_word_embeddings=true but lm_head.weight differs from the embedding")
    return state_dict


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
    ``model(tokens[b, s]) -> logits[b, s, vocab]``. Refuses, before reading any weight, a config
    it cannot build exactly (:class:`UnsupportedConfigError` naming each setting).
    """
    checkpoint_dir = Path(checkpoint_dir)
    files = list(checkpoint_files) if checkpoint_files else find_checkpoint_files(checkpoint_dir)
    config = json.loads((checkpoint_dir / "config.json").read_text())
    spec = decoder_spec(config, max_seq_len=max_seq_len)
    state_dict = _read_state_dict(checkpoint_dir, files, spec)
    # Build on the meta device (no random init of billions of weights), then adopt the loaded
    # tensors, already cast and moved, with assign=True.
    with torch.device("meta"):
        model = build_decoder(spec)
    state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise UnsupportedConfigError(
            f"{checkpoint_dir}: weights do not match config.json ({FAMILIES[spec.model_type][2]}): "
            f"missing {sorted(result.missing_keys)[:6]}, unexpected {sorted(result.unexpected_keys)[:6]}")
    # RoPE tables are non-persistent buffers, still on meta: rebuild them on the device. They stay
    # fp32 (rope_init builds them in the default dtype), as HF computes rotations in fp32.
    with torch.device(device):
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()
    model.requires_grad_(False)
    model.spec = spec  # what was built, for reports
    return model.eval()


# ---- tokenizers -------------------------------------------------------------------------------


def _is_tiktoken_file(path: Path) -> bool:
    """Llama-3's ``tokenizer.model`` is tiktoken's text format (``<base64> <rank>`` lines); Llama-2's
    is a SentencePiece protobuf."""
    with open(path, "rb") as f:
        head = f.read(256)
    first = head.split(b"\n", 1)[0]
    return bool(re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", first))


def load_tokenizer(tokenizer_path: str | Path, max_seq_len: Optional[int] = None,
                   model_type: Optional[str] = None):
    """torchtune tokenizer for ``tokenizer_path``, with no prompt template (lm-eval builds the whole
    prompt text itself), chosen by the checkpoint's ``model_type`` (default ``llama``):

    * ``llama``: SentencePiece ``tokenizer.model`` (Llama-2) or tiktoken ``tokenizer.model`` (Llama-3.x);
    * ``mistral``, ``phi3``: their SentencePiece ``tokenizer.model``;
    * ``qwen2``: ``vocab.json`` (with ``merges.txt`` beside it), or the folder holding both.
    """
    path = Path(tokenizer_path)
    model_type = model_type or "llama"
    if model_type == "qwen2":
        vocab = path / "vocab.json" if path.is_dir() else path
        merges = vocab.parent / "merges.txt"
        for needed in (vocab, merges):
            if not needed.is_file():
                raise FileNotFoundError(f"tokenizer file not found: {needed} (Qwen2.5 needs vocab.json and "
                                        "merges.txt; pass tokenizer_path=<folder or .../vocab.json>)")
        from torchtune.models.qwen2_5 import qwen2_5_tokenizer

        return qwen2_5_tokenizer(str(vocab), str(merges), max_seq_len=max_seq_len, prompt_template=None)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path} (pass tokenizer_path=<.../tokenizer.model>)")
    if model_type == "mistral":
        from torchtune.models.mistral import mistral_tokenizer

        return mistral_tokenizer(str(path), max_seq_len=max_seq_len, prompt_template=None)
    if model_type == "phi3":
        from torchtune.models.phi3 import phi3_mini_tokenizer

        return phi3_mini_tokenizer(str(path), max_seq_len=max_seq_len, prompt_template=None)
    if model_type != "llama":
        raise ValueError(f"no tokenizer for model_type={model_type!r} (supported: {sorted(FAMILIES)})")
    if _is_tiktoken_file(path):
        from torchtune.models.llama3 import llama3_tokenizer

        return llama3_tokenizer(str(path), max_seq_len=max_seq_len, prompt_template=None)
    from torchtune.models.llama2 import llama2_tokenizer

    return llama2_tokenizer(str(path), max_seq_len=max_seq_len, prompt_template=None)


def checkpoint_model_type(checkpoint_dir: str | Path) -> str:
    """``model_type`` of ``checkpoint_dir/config.json`` (``llama`` when absent)."""
    config_path = Path(checkpoint_dir) / "config.json"
    return json.loads(config_path.read_text()).get("model_type", "llama") if config_path.is_file() else "llama"


def load_model_and_tokenizer(
    checkpoint_dir: str | Path, tokenizer_path: str | Path, **kwargs: Any
) -> Tuple[torch.nn.Module, Any]:
    """Convenience: ``(load_model(checkpoint_dir, **kwargs), load_tokenizer(tokenizer_path))``."""
    return (load_model(checkpoint_dir, **kwargs),
            load_tokenizer(tokenizer_path, model_type=checkpoint_model_type(checkpoint_dir)))
