"""Weight conversion between the published CLIP image-tower layouts and our torchtune tower.

Two layouts of the same weights are in circulation:

* **OpenCLIP** (``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors``): keys under
  ``visual.`` in a whole-CLIP state dict (or unprefixed for a bare tower). Attention keeps q, k
  and v fused in ``in_proj_weight [3D, D]`` / ``in_proj_bias [3D]``; ``proj`` is ``[D, E]``.
* **Hugging Face** ``CLIPModel`` / ``CLIPVisionModel(WithProjection)`` (safetensors, maybe
  sharded): keys under ``vision_model.`` (none for a transformers-5 ``CLIPVisionModel``),
  separate q/k/v, and ``visual_projection.weight [E, D]``
  (an ``nn.Linear``, so transposed with respect to OpenCLIP's ``proj``).

Ours is the state dict of :func:`lorasc_tune.vision.model.clip_vision_lora` (no adapter keys).
:func:`import_vision` picks the tower out of a full checkpoint and remembers where it came from
(:class:`SourceLayout`); :func:`export_vision` puts (merged) tower weights back under the
original names and dtypes while every other entry of the source (the text tower, logit scale,
buffers) is copied through unchanged, so the result is a drop-in replacement for the source.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from lorasc_tune.vision.model import is_adapter_param

StateDict = Dict[str, torch.Tensor]

# Per-block renames, ours <-> theirs, for everything except OpenCLIP's fused q/k/v.
_OC_BLOCK = {
    "sa_norm": "ln_1", "mlp_norm": "ln_2", "attn.output_proj": "attn.out_proj",
    "mlp.w1": "mlp.c_fc", "mlp.w2": "mlp.c_proj",
}
_OC_TOP = {
    "conv.weight": "conv1.weight", "cls_token_embedding.weight": "class_embedding",
    "token_pos_embedding.positional_embedding": "positional_embedding",
    "ln_pre.weight": "ln_pre.weight", "ln_pre.bias": "ln_pre.bias",
    "ln_post.weight": "ln_post.weight", "ln_post.bias": "ln_post.bias",
    "cls_projection.weight": "proj",
}
_HF_BLOCK = {
    "sa_norm": "layer_norm1", "mlp_norm": "layer_norm2", "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
    "attn.output_proj": "self_attn.out_proj", "mlp.w1": "mlp.fc1", "mlp.w2": "mlp.fc2",
}
# Relative to the tower's prefix: "vision_model." in CLIPModel and CLIPVisionModelWithProjection
# files (and CLIPVisionModel files from transformers 4.x); none in transformers 5's
# CLIPVisionModel files.
_HF_TOP = {
    "conv.weight": "embeddings.patch_embedding.weight",
    "cls_token_embedding.weight": "embeddings.class_embedding",
    "token_pos_embedding.positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
_HF_PROJ = "visual_projection.weight"  # always top level
# Non-weight HF entries of the tower that we neither need nor produce.
_HF_IGNORED = ("embeddings.position_ids",)
_BLOCK_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass
class SourceLayout:
    """Where a tower came from: ``kind`` is ``"open_clip"`` or ``"hf"``; ``prefix`` is the key
    prefix of the tower (``"visual."`` or ``""`` for OpenCLIP, ``"vision_model."`` or ``""``
    for HF)."""

    kind: str
    prefix: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "prefix": self.prefix}


# ----------------------------------------------------------------------------- key mapping


def _num_layers(keys, pattern: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else 0


def open_clip_to_ours(sd: StateDict) -> StateDict:
    """Bare OpenCLIP ``VisionTransformer`` state dict (no ``visual.``) -> ours.

    ``in_proj_weight [3D, D]`` is split in q, k, v order (``nn.MultiheadAttention``'s packing).
    Raises ``KeyError`` naming any entry we do not know how to place (e.g. layer scale,
    attentional pooling), rather than silently dropping weights.
    """
    inv_top = {v: k for k, v in _OC_TOP.items()}
    inv_block = {v: k for k, v in _OC_BLOCK.items()}
    out: StateDict = {}
    unknown = []
    for key, t in sd.items():
        if key in inv_top:
            out[inv_top[key]] = t
            continue
        m = re.match(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        fused = re.match(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key)
        if fused:
            i, kind = fused.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                out[f"layers.{i}.attn.{name}.{kind}"] = part.clone()
        elif m and m.group(2) in inv_block:
            out[f"layers.{m.group(1)}.{inv_block[m.group(2)]}.{m.group(3)}"] = t
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"OpenCLIP tower has entries this converter does not support: {unknown[:8]}")
    return out


def ours_to_open_clip(sd: StateDict) -> StateDict:
    """Ours -> bare OpenCLIP ``VisionTransformer`` names; q, k, v are fused back in that order."""
    out: StateDict = {}
    for key, t in sd.items():
        if key in _OC_TOP:
            out[_OC_TOP[key]] = t
            continue
        m = _BLOCK_RE.match(key)
        if not m:
            raise KeyError(f"not a key of our CLIP tower: {key!r}")
        i, mod, kind = m.groups()
        if mod in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
            if mod == "attn.q_proj":  # emit the fused tensor once, when we meet q
                parts = [sd[f"layers.{i}.attn.{n}.{kind}"] for n in ("q_proj", "k_proj", "v_proj")]
                out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
        elif mod in _OC_BLOCK:
            out[f"transformer.resblocks.{i}.{_OC_BLOCK[mod]}.{kind}"] = t
        else:
            raise KeyError(f"not a key of our CLIP tower: {key!r}")
    return out


def hf_to_ours(sd: StateDict, prefix: str = "vision_model.") -> StateDict:
    """HF tower entries under ``prefix`` (+ optional ``visual_projection.weight``) -> ours.

    Other entries (a CLIPModel's text tower, ``logit_scale``) are ignored, so the whole
    CLIPModel dict can be passed.
    """
    inv_top = {v: k for k, v in _HF_TOP.items()}
    inv_block = {v: k for k, v in _HF_BLOCK.items()}
    out: StateDict = {}
    unknown = []
    for key, t in sd.items():
        if key == _HF_PROJ:
            out["cls_projection.weight"] = t.t().contiguous()  # Linear [E, D] -> [D, E]
            continue
        if not key.startswith(prefix) or key[len(prefix):] in _HF_IGNORED:
            continue
        rel = key[len(prefix):]
        m = re.match(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", rel)
        if rel in inv_top:
            out[inv_top[rel]] = t
        elif m and m.group(2) in inv_block:
            out[f"layers.{m.group(1)}.{inv_block[m.group(2)]}.{m.group(3)}"] = t
        elif prefix or rel.split(".")[0] in ("embeddings", "encoder", "pre_layrnorm",
                                              "post_layernorm"):
            unknown.append(key)
    if unknown:
        raise KeyError(f"HF vision tower has entries this converter does not support: {unknown[:8]}")
    return out


def ours_to_hf(sd: StateDict, prefix: str = "vision_model.") -> StateDict:
    """Ours -> HF names under ``prefix`` (+ ``visual_projection.weight`` if we have a projection)."""
    out: StateDict = {}
    for key, t in sd.items():
        if key == "cls_projection.weight":
            out[_HF_PROJ] = t.t().contiguous()
        elif key in _HF_TOP:
            out[prefix + _HF_TOP[key]] = t
        else:
            m = _BLOCK_RE.match(key)
            if not m or m.group(2) not in _HF_BLOCK:
                raise KeyError(f"not a key of our CLIP tower: {key!r}")
            i, mod, kind = m.groups()
            out[f"{prefix}encoder.layers.{i}.{_HF_BLOCK[mod]}.{kind}"] = t
    return out


# ----------------------------------------------------------------------------- whole checkpoints


def detect_layout(keys) -> SourceLayout:
    """Tell OpenCLIP from HF by their key names; raises ``ValueError`` if neither fits."""
    keys = list(keys)
    patch = "embeddings.patch_embedding.weight"
    hf = [k[: -len(patch)] for k in keys if k.endswith(patch)]
    if hf:
        return SourceLayout("hf", hf[0])
    if "visual.conv1.weight" in keys:
        return SourceLayout("open_clip", "visual.")
    if "conv1.weight" in keys and "class_embedding" in keys:
        return SourceLayout("open_clip", "")
    raise ValueError(
        "checkpoint is neither an OpenCLIP state dict (visual.conv1.weight) nor a Hugging Face "
        f"CLIP one (*embeddings.patch_embedding.weight); first keys: {keys[:5]}"
    )


def _tower_keys(full: StateDict, layout: SourceLayout) -> StateDict:
    if layout.kind == "hf":
        return full  # hf_to_ours picks its entries by prefix
    if layout.prefix:
        n = len(layout.prefix)
        return {k[n:]: v for k, v in full.items() if k.startswith(layout.prefix)}
    return dict(full)


def import_vision(full: StateDict) -> Tuple[StateDict, SourceLayout]:
    """Full checkpoint state dict (any layout) -> (our tower state dict, its source layout)."""
    layout = detect_layout(full.keys())
    tower = _tower_keys(full, layout)
    ours = hf_to_ours(tower, layout.prefix) if layout.kind == "hf" else open_clip_to_ours(tower)
    return ours, layout


def export_vision(ours: StateDict, layout: SourceLayout, source: StateDict) -> StateDict:
    """Our tower weights written back over ``source`` (the dict they were imported from).

    Every key of ``source`` is present in the result, in ``source``'s order and dtypes; the
    tower's entries are replaced, all others are the source's own tensors.

    Raises:
        KeyError: if our weights have an entry the source does not (e.g. a projection that the
            source ``CLIPVisionModel`` lacks).
    """
    if layout.kind == "hf":
        theirs = ours_to_hf(ours, layout.prefix)
    else:
        theirs = {layout.prefix + k: v for k, v in ours_to_open_clip(ours).items()}
    extra = sorted(set(theirs) - set(source))
    if extra:
        raise KeyError(f"weights to export have no place in the source checkpoint: {extra[:8]}")
    out: StateDict = {}
    for key, src in source.items():
        if key in theirs:
            new = theirs[key]
            if tuple(new.shape) != tuple(src.shape):
                raise ValueError(f"{key}: exporting shape {tuple(new.shape)} over {tuple(src.shape)}")
            out[key] = new.detach().to(device="cpu", dtype=src.dtype).contiguous()
        else:
            out[key] = src
    return out


# ----------------------------------------------------------------------------- files


@dataclass
class CheckpointFiles:
    """How a checkpoint is stored, so that an export can mirror it.

    ``shards`` maps each weight file name to the keys it holds (one entry for a single file).
    ``wrapper`` is the key of the dict that held the state dict in a training checkpoint
    (OpenCLIP's ``{"state_dict": ...}``); ``strip`` the prefix removed from its keys
    (``"module."`` from DDP), both None for a plain state dict.
    """

    root: Path  # the file, or the folder holding the shards
    shards: Dict[str, List[str]] = field(default_factory=dict)
    index_file: Optional[str] = None
    wrapper: Optional[str] = None
    strip: Optional[str] = None
    metadata: Dict[str, Dict[str, str]] = field(default_factory=dict)


_WEIGHT_NAMES = (
    "model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
    "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
)


def _read_one(path: Path) -> Tuple[StateDict, Dict[str, str]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    if path.suffix in (".bin", ".pt", ".pth"):
        return torch.load(path, map_location="cpu", weights_only=True), {}
    raise ValueError(f"{path}: unsupported weight file type (use .safetensors, .bin, .pt or .pth)")


def read_checkpoint(path: str | Path) -> Tuple[StateDict, CheckpointFiles]:
    """Load a checkpoint given as a weight file or a folder (HF layout, possibly sharded).

    A folder is searched for, in order: ``model.safetensors(.index.json)``,
    ``pytorch_model.bin(.index.json)``, ``open_clip_model.safetensors``,
    ``open_clip_pytorch_model.bin``; point at a file to pick another one.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        found = next((path / n for n in _WEIGHT_NAMES if (path / n).exists()), None)
        if found is None:
            raise FileNotFoundError(f"{path}: no weight file among {list(_WEIGHT_NAMES)}")
        if found.name.endswith(".index.json"):
            weight_map = json.loads(found.read_text())["weight_map"]
            info = CheckpointFiles(root=path, index_file=found.name)
            full: StateDict = {}
            for shard in sorted(set(weight_map.values())):
                sd, meta = _read_one(path / shard)
                full.update(sd)
                info.shards[shard] = list(sd)
                info.metadata[shard] = meta
            return full, info
        sd, meta = _read_one(found)
        info = CheckpointFiles(root=path, shards={found.name: []}, metadata={found.name: meta})
    else:
        sd, meta = _read_one(path)
        info = CheckpointFiles(root=path.parent, shards={path.name: []}, metadata={path.name: meta})
    name = next(iter(info.shards))
    # OpenCLIP training checkpoints wrap the weights: {"epoch", "state_dict": {"module.x": ...}}
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        info.wrapper = "state_dict"
        sd = sd["state_dict"]
    if sd and all(k.startswith("module.") for k in sd):
        info.strip = "module."
        sd = {k[len("module."):]: v for k, v in sd.items()}
    info.shards[name] = list(sd)
    return sd, info


def write_checkpoint(full: StateDict, info: CheckpointFiles, out_dir: str | Path) -> List[Path]:
    """Write ``full`` into ``out_dir`` with the source's file names and shard split.

    Small side files of a source folder (``*.json``, ``*.txt``: config, preprocessor, tokenizer)
    are copied so an HF folder stays loadable. A wrapped training checkpoint is written as the
    plain state dict (the optimizer state it carried means nothing after fine-tuning).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if info.index_file:
        for side in info.root.iterdir():
            if side.is_file() and side.suffix in (".json", ".txt"):
                shutil.copy2(side, out_dir / side.name)
    for name, keys in info.shards.items():
        part = {k: full[k] for k in keys}
        target = out_dir / name
        if target.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(part, str(target), metadata=info.metadata.get(name) or None)
        else:
            torch.save(part, target)
        written.append(target)
    return written


def load_pretrained_tower(path: str | Path) -> Tuple[StateDict, SourceLayout, CheckpointFiles]:
    """``read_checkpoint`` + ``import_vision``: our tower weights and how to write them back."""
    full, info = read_checkpoint(path)
    ours, layout = import_vision(full)
    return ours, layout, info


def save_like_source(ours: StateDict, layout: SourceLayout, info: CheckpointFiles,
                     out_dir: str | Path, source: Optional[StateDict] = None) -> List[Path]:
    """Write ``ours`` in the source's layout and files; re-reads the source if not given."""
    if source is None:
        first = info.root / (info.index_file or next(iter(info.shards)))
        source, _ = read_checkpoint(info.root if info.index_file else first)
    return write_checkpoint(export_vision(ours, layout, source), info, out_dir)


def check_tower_shapes(ours: StateDict, expected: StateDict,
                       describe: Callable[[str], str] = lambda k: k) -> None:
    """Raise ``ValueError`` listing every entry whose shape differs from the model's.

    ``expected`` is the model's own state dict (adapter entries are ignored); this turns a wall
    of ``load_state_dict`` size errors into one message that says which config field is off.
    """
    bad = [
        f"{describe(k)}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in ours.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    missing = sorted(k for k in expected if k not in ours and not is_adapter_param(k))
    unexpected = sorted(k for k in ours if k not in expected)
    if bad or missing or unexpected:
        raise ValueError(
            "checkpoint does not fit the configured tower (check width/layers/mlp_dim/patch_size/"
            f"image_size/output_dim): shape mismatches {bad[:6]}, missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}"
        )
