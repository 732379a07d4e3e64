"""The fine-tuned classifier on disk: tower in its source layout, head and metadata beside it.

Folder written by :func:`save_classifier` (and read by :func:`load_classifier`)::

    <dir>/vision_meta.json       arch, class ids, head normalisation, source layout, file names
    <dir>/<weights in the source's names>   e.g. open_clip_pytorch_model.bin, or an HF folder's
                                 model.safetensors (+ shards, config.json); a tower trained from
                                 scratch is written as OpenCLIP's bare layout, vision_tower.safetensors
    <dir>/head.safetensors       {"weight": [C, E], "bias": [C]}

The tower files are a drop-in replacement for the source checkpoint (text tower and all), so
OpenCLIP or ``transformers`` load them as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from lorasc_tune.io import atomic_write_text
from lorasc_tune.vision.convert import (
    CheckpointFiles,
    SourceLayout,
    check_tower_shapes,
    read_checkpoint,
    import_vision,
    ours_to_open_clip,
    save_like_source,
)
from lorasc_tune.vision.model import CLIPImageClassifier, VisionArch, build_classifier

META = "vision_meta.json"
HEAD = "head.safetensors"
SCRATCH_WEIGHTS = "vision_tower.safetensors"


def save_classifier(merged: dict, arch: VisionArch, class_ids, normalize: bool, out_dir: Path,
                    source: Optional[Tuple[SourceLayout, CheckpointFiles]] = None) -> Path:
    """Write a merged classifier state dict (keys ``encoder.*``, ``head.*``; no adapters).

    ``source`` is ``(layout, files)`` from :func:`~lorasc_tune.vision.convert.load_pretrained_tower`,
    or None for a tower that started from random weights.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tower = {k[len("encoder."):]: v for k, v in merged.items() if k.startswith("encoder.")}
    head = {k[len("head."):]: v.detach().cpu().contiguous() for k, v in merged.items()
            if k.startswith("head.")}
    if source is None:
        layout = SourceLayout("open_clip", "")
        sd = {k: v.detach().cpu().contiguous() for k, v in ours_to_open_clip(tower).items()}
        save_file(sd, str(out_dir / SCRATCH_WEIGHTS))
        weights = SCRATCH_WEIGHTS
    else:
        layout, files = source
        written = save_like_source(tower, layout, files, out_dir)
        weights = "." if files.index_file else written[0].name
    save_file(head, str(out_dir / HEAD))
    meta = {
        "arch": arch.to_dict(), "num_classes": len(class_ids), "class_ids": list(class_ids),
        "normalize": normalize, "layout": layout.to_dict(), "weights": weights, "head": HEAD,
    }
    atomic_write_text(out_dir / META, json.dumps(meta, indent=2))
    return out_dir


def load_classifier(ckpt_dir: str | Path, device="cpu",
                    dtype: torch.dtype = torch.float32) -> Tuple[CLIPImageClassifier, dict]:
    """Rebuild a plain (adapter-free) classifier from a :func:`save_classifier` folder."""
    ckpt_dir = Path(ckpt_dir)
    meta_path = ckpt_dir / META
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} not found: --checkpoint must be a folder written by the vision recipe"
        )
    meta = json.loads(meta_path.read_text())
    arch = VisionArch(**meta["arch"])
    model = build_classifier(arch, meta["num_classes"], lora_modules=(),
                             normalize=meta["normalize"])
    full, _ = read_checkpoint(ckpt_dir / meta["weights"])
    tower, _ = import_vision(full)
    check_tower_shapes(tower, model.encoder.state_dict())
    model.encoder.load_state_dict(tower, strict=True)
    model.head.load_state_dict(load_file(str(ckpt_dir / meta["head"])), strict=True)
    return model.to(device=device, dtype=dtype).eval(), meta
