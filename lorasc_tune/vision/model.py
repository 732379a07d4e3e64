"""CLIP image towers built from torchtune's vision-transformer pieces, with LoRA/DoRA on q and v.

torchtune's own ``lora_clip_vision_encoder`` is close to what we need but not usable as is for
OpenCLIP/HF checkpoints: it builds the adapted q/v projections *without* biases and fixes the
MLP at 4x the width. OpenCLIP's ViT-bigG-14 has biases on all of q/k/v/out and an MLP of 8192
(ratio 4.9231 of 1664). :func:`clip_vision_lora` therefore assembles the same torchtune modules
(``VisionTransformer``, ``MultiHeadAttention``, ``TransformerSelfAttentionLayer``,
``FeedForward``) itself, with ``LoRALinear``/``DoRALinear(use_bias=True)`` on the chosen
projections and an explicit ``mlp_dim``.

Token flow for an image batch ``[B, 3, H, W]`` (one tile, one image per sample):
conv patchify ``[B, D, H/p, W/p]`` -> tokens ``[B, N, D]`` -> prepend class token ``[B, N+1, D]``
-> + positional embedding -> ``ln_pre`` -> L pre-norm blocks -> ``ln_post`` -> class token
``[B, D]`` -> ``@ proj`` ``[B, output_dim]``. This is OpenCLIP's ``VisionTransformer`` with
``pool_type='tok'`` and HF's ``CLIPVisionModelWithProjection``: LayerNorm is per token, so
``ln_post`` before or after taking the class token gives the same result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.models.clip._position_embeddings import TokenPositionalEmbedding
from torchtune.models.clip._text_encoder import QuickGELU
from torchtune.modules import (
    FeedForward,
    Fp32LayerNorm,
    MultiHeadAttention,
    TransformerSelfAttentionLayer,
)
from torchtune.modules.peft import DoRALinear, LoRALinear
from torchtune.modules.vision_transformer import CLSProjection, VisionTransformer
from lorasc_tune.adapters import init_dora_magnitudes

ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "output_proj")

# OpenCLIP "ViT-bigG-14" (model_configs/ViT-bigG-14.json): width 1664, head_width 104 -> 16 heads,
# mlp_ratio 4.9231 -> int(1664 * 4.9231) = 8192, patch 14 at 224 px, embed_dim 1280, and no
# quick_gelu flag, so the MLP uses exact (erf) GELU. HF's conversion says hidden_act="gelu".
BIGG14_ARCH = dict(
    width=1664, layers=48, heads=16, mlp_dim=8192, patch_size=14, image_size=224,
    output_dim=1280, activation="gelu",
)
# Parameters of that tower (conv, class token, positions, ln_pre/ln_post, 48 blocks, projection).
BIGG14_NUM_PARAMS = 1_844_907_264


@dataclass
class VisionArch:
    """Shape of a CLIP image tower; everything a checkpoint does not say about itself.

    ``output_dim=None`` means no projection (HF ``CLIPVisionModel``): the embedding is the
    ``ln_post``-normalised class token, ``[B, width]``.
    """

    width: int
    layers: int
    heads: int
    mlp_dim: int
    patch_size: int
    image_size: int
    output_dim: Optional[int] = None
    activation: str = "gelu"
    norm_eps: float = 1e-5

    @property
    def embed_dim(self) -> int:
        """Size of the image embedding the classifier head sees."""
        return self.output_dim if self.output_dim else self.width

    def to_dict(self) -> dict:
        return asdict(self)


def _activation(name: str) -> nn.Module:
    # "gelu" is the exact erf form (torch's default, OpenCLIP's nn.GELU, HF's "gelu");
    # "quick_gelu" is x * sigmoid(1.702 x), used by OpenAI's original CLIP weights.
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"activation must be 'gelu' or 'quick_gelu', got {name!r}")


def _projection(
    name: str, dim: int, lora_modules: Sequence[str], rank: int, alpha: float,
    dropout: float, use_dora: bool,
) -> nn.Module:
    if name not in lora_modules:
        return nn.Linear(dim, dim, bias=True)
    cls = DoRALinear if use_dora else LoRALinear
    # use_bias=True: OpenCLIP/HF carry a bias on every attention projection; dropping it
    # (as torchtune's lora_clip_attention does) would change the pretrained function.
    return cls(dim, dim, rank=rank, alpha=alpha, dropout=dropout, use_bias=True)


def clip_vision_lora(
    width: int,
    layers: int,
    heads: int,
    mlp_dim: int,
    patch_size: int,
    image_size: int,
    output_dim: Optional[int],
    lora_modules: Sequence[str] = ("q_proj", "v_proj"),
    lora_rank: int = 16,
    lora_alpha: float = 32.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    activation: str = "gelu",
    norm_eps: float = 1e-5,
) -> VisionTransformer:
    """A CLIP image tower with LoRA (or DoRA) on the named attention projections.

    Args:
        width, layers, heads, mlp_dim: transformer width ``D``, depth, heads, MLP hidden size.
        patch_size, image_size: square patches and input side; ``image_size % patch_size == 0``.
        output_dim: size of the bias-free class-token projection, or None for no projection.
        lora_modules: subset of ``("q_proj", "k_proj", "v_proj", "output_proj")``; empty gives
            the plain tower (all ``nn.Linear``).
        lora_rank, lora_alpha, lora_dropout, use_dora: adapter settings (scale = alpha / rank).
        activation: ``"gelu"`` (exact) or ``"quick_gelu"``.

    Returns:
        torchtune ``VisionTransformer``: ``images [B, 1, 1, 3, S, S] -> ([B, 1, 1, 1, output_dim], [])``
        with a projection, or ``[B, 1, 1, N+1, width]`` tokens without one.
    """
    unknown = sorted(set(lora_modules) - set(ATTN_PROJECTIONS))
    if unknown:
        raise ValueError(f"lora_modules: unknown {unknown}; choose from {ATTN_PROJECTIONS}")
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")

    proj = {
        n: _projection(n, width, lora_modules, lora_rank, lora_alpha, lora_dropout, use_dora)
        for n in ATTN_PROJECTIONS
    }
    attn = MultiHeadAttention(
        embed_dim=width, num_heads=heads, num_kv_heads=heads, head_dim=width // heads,
        q_proj=proj["q_proj"], k_proj=proj["k_proj"], v_proj=proj["v_proj"],
        output_proj=proj["output_proj"], pos_embeddings=None, attn_dropout=0.0,
        is_causal=False,
    )
    mlp = FeedForward(
        gate_proj=nn.Linear(width, mlp_dim), down_proj=nn.Linear(mlp_dim, width),
        up_proj=None, activation=_activation(activation),
    )
    block = TransformerSelfAttentionLayer(
        attn=attn, mlp=mlp,
        sa_norm=Fp32LayerNorm(width, eps=norm_eps), mlp_norm=Fp32LayerNorm(width, eps=norm_eps),
    )
    tower = VisionTransformer(
        patch_size=patch_size, tile_size=image_size, num_layers=layers, embed_dim=width,
        layer=block,
        token_pos_embedding=TokenPositionalEmbedding(width, image_size, patch_size),
        cls_projection=CLSProjection(width, output_dim) if output_dim else None,
    )
    if norm_eps != 1e-5:  # VisionTransformer builds ln_pre/ln_post with torch's default eps
        tower.ln_pre.eps = tower.ln_post.eps = norm_eps
    if use_dora and not any(p.is_meta for p in tower.parameters()):
        # Magnitudes must match the (random) base now; the loader re-initialises them after
        # real weights arrive (see lorasc_tune.adapters.init_dora_magnitudes).
        init_dora_magnitudes(tower)
    return tower


def clip_vit_bigg14(
    lora_modules: Sequence[str] = ("q_proj", "v_proj"),
    lora_rank: int = 16,
    lora_alpha: float = 32.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
) -> VisionTransformer:
    """OpenCLIP ViT-bigG/14 image tower (laion2B-39B-b160k shape), 1,844,907,264 base parameters."""
    return clip_vision_lora(
        **BIGG14_ARCH, lora_modules=lora_modules, lora_rank=lora_rank,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_dora=use_dora,
    )


class CLIPImageClassifier(nn.Module):
    """CLIP image tower + linear head: ``images [B, 3, S, S] -> logits [B, num_classes]``.

    The head is an ordinary trainable ``nn.Linear`` outside the adapters: the cascade engine
    never merges or resets it, it is trained continuously across experts.

    ``normalize=True`` L2-normalises the embedding before the head, as CLIP does for zero-shot
    classification; it keeps the head's input scale independent of the tower.
    """

    def __init__(self, encoder: VisionTransformer, embed_dim: int, num_classes: int,
                 normalize: bool = True, arch: Optional[VisionArch] = None) -> None:
        super().__init__()
        self.arch = arch  # kept so the exported checkpoint can describe the tower
        self.encoder = encoder
        self.head = nn.Linear(embed_dim, num_classes)
        self.normalize = normalize

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S] -> [B, embed_dim]`` (projected class token, or ``ln_post`` class token)."""
        images = images.to(self.encoder.conv.weight.dtype)  # e.g. bf16 weights, fp32 loader
        out, _ = self.encoder(images[:, None, None])  # one image of one tile per sample
        # with projection: [B, 1, 1, 1, E]; without: [B, 1, 1, N+1, D] -> take the class token
        return out[:, 0, 0, 0, :]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = self.embed(images)
        if self.normalize:
            z = F.normalize(z, dim=-1)
        return self.head(z.to(self.head.weight.dtype))


@torch.no_grad()
def init_head(head: nn.Linear, how: str = "zeros", path: Optional[str] = None) -> None:
    """Initialise the classifier head.

    * ``"zeros"`` (default): ``W = 0, b = 0``. Every class starts at logit 0 (loss = log C), the
      start does not depend on the seed, and the first expert's LoRA factors get gradient from
      the second step on (the head's first update makes ``dL/dz`` non-zero).
    * ``"file"``: load ``{"weight": [C, E], "bias": [C] (optional)}`` from ``path`` (``.pt`` or
      ``.safetensors``), e.g. zero-shot text embeddings of the class prompts times CLIP's logit
      scale, computed once with the text tower.
    * ``"default"``: keep ``nn.Linear``'s Kaiming-uniform init.
    """
    if how == "zeros":
        head.weight.zero_()
        head.bias.zero_()
    elif how == "file":
        if not path:
            raise ValueError("init_head: how='file' needs a path")
        sd = _load_tensors(Path(path))
        w = sd.get("weight")
        if w is None or tuple(w.shape) != tuple(head.weight.shape):
            got = None if w is None else tuple(w.shape)
            raise ValueError(
                f"head init file {path}: needs 'weight' of shape {tuple(head.weight.shape)}, got {got}"
            )
        head.weight.copy_(w)
        if "bias" in sd:
            head.bias.copy_(sd["bias"])
        else:
            head.bias.zero_()
    elif how != "default":
        raise ValueError(f"head init must be 'zeros', 'file' or 'default', got {how!r}")


def _load_tensors(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def build_classifier(
    arch: VisionArch,
    num_classes: int,
    lora_modules: Sequence[str] = ("q_proj", "v_proj"),
    lora_rank: int = 16,
    lora_alpha: float = 32.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    normalize: bool = True,
) -> CLIPImageClassifier:
    """Tower from ``arch`` with adapters, plus a ``num_classes`` head (call :func:`init_head`)."""
    tower = clip_vision_lora(
        **arch.to_dict(), lora_modules=lora_modules, lora_rank=lora_rank,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_dora=use_dora,
    )
    return CLIPImageClassifier(tower, arch.embed_dim, num_classes, normalize=normalize, arch=arch)


def clip_classifier(
    width: int, layers: int, heads: int, mlp_dim: int, patch_size: int, image_size: int,
    output_dim: Optional[int], num_classes: int, activation: str = "gelu", **kwargs,
) -> CLIPImageClassifier:
    """Config-friendly :func:`build_classifier` for any tower shape (``**kwargs``: adapter
    settings and ``normalize``)."""
    arch = VisionArch(width=width, layers=layers, heads=heads, mlp_dim=mlp_dim,
                      patch_size=patch_size, image_size=image_size, output_dim=output_dim,
                      activation=activation)
    return build_classifier(arch, num_classes, **kwargs)


def clip_vit_bigg14_classifier(num_classes: int = 1000, **kwargs) -> CLIPImageClassifier:
    """ViT-bigG/14 tower (:data:`BIGG14_ARCH`) with a ``num_classes`` head; ``**kwargs`` as above."""
    return build_classifier(VisionArch(**BIGG14_ARCH), num_classes, **kwargs)


def is_adapter_param(name: str) -> bool:
    """True for LoRA/DoRA factor names (``...lora_a.weight``, ``...lora_b.weight``, ``...magnitude``)."""
    return ".lora_a." in name or ".lora_b." in name or name.endswith("magnitude")


def count_params(model: nn.Module) -> Tuple[int, int]:
    """``(base, adapter)`` parameter counts; works on the meta device."""
    base = adapter = 0
    for name, p in model.named_parameters():
        if is_adapter_param(name):
            adapter += p.numel()
        else:
            base += p.numel()
    return base, adapter
