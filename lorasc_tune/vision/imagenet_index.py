"""ImageNet-1k class index and the 200-class subsets of ImageNet-R and ImageNet-A.

The lists live in the shared data folder (``imagenet_index/``): ``imagenet_class_index.json``
(``{"0": ["n01440764", "tench"], ...}``), and for ``r``/``a`` a wnid list with a parallel list of
their 1k indices. Loading cross-checks the three files, so a wrong or reordered list fails loudly
instead of silently scoring against the wrong logits.

Masking: IN-R/IN-A models are scored by taking the arg-max over only the 200 logits of the
subset's classes (Hendrycks et al.'s protocol); the prediction is reported as a 1k index, so it
compares directly with a label read from a wnid folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from lorasc_tune._paths import shared_data_dir

SUBSETS = {"imagenet_r": "imagenet_r", "imagenet_a": "imagenet_a"}


def default_index_dir() -> Path:
    return shared_data_dir() / "imagenet_index"


@dataclass
class ImageNetIndex:
    """``wnids[i]`` / ``names[i]`` for 1k index ``i``; ``subsets[name]`` = 1k indices kept."""

    wnids: List[str]
    names: List[str]
    subsets: Dict[str, List[int]]

    @classmethod
    def load(cls, folder: Optional[str | Path] = None) -> "ImageNetIndex":
        folder = Path(folder) if folder else default_index_dir()
        path = folder / "imagenet_class_index.json"
        if not path.exists():
            raise FileNotFoundError(f"ImageNet class index not found: {path}")
        raw = json.loads(path.read_text())
        wnids = [raw[str(i)][0] for i in range(len(raw))]
        names = [raw[str(i)][1] for i in range(len(raw))]
        subsets = {}
        for name, stem in SUBSETS.items():
            wfile, ifile = folder / f"{stem}_wnids.txt", folder / f"{stem}_indices_in_1k.txt"
            if not (wfile.exists() and ifile.exists()):
                continue
            sub_wnids = wfile.read_text().split()
            sub_idx = [int(x) for x in ifile.read_text().split()]
            if len(sub_wnids) != len(sub_idx):
                raise ValueError(f"{wfile} and {ifile} have different lengths")
            wrong = [(w, i) for w, i in zip(sub_wnids, sub_idx) if wnids[i] != w]
            if wrong:
                raise ValueError(f"{ifile}: index does not match the class index for {wrong[:5]}")
            subsets[name] = sub_idx
        return cls(wnids, names, subsets)


def keep_indices(index: ImageNetIndex, subset: str, class_ids: Sequence[str]) -> List[int]:
    """Head indices of the subset's wnids, for a head whose classes are ``class_ids``.

    For the standard 1k head this is the subset's 1k index list; a head in another order (or a
    superset) is handled by looking each wnid up. Raises if the head lacks a subset class.
    """
    if subset not in index.subsets:
        raise FileNotFoundError(f"no class list for {subset} in the ImageNet index folder")
    pos = {w: i for i, w in enumerate(class_ids)}
    wn = [index.wnids[i] for i in index.subsets[subset]]
    missing = [w for w in wn if w not in pos]
    if missing:
        raise ValueError(
            f"{subset}: the classifier head has no logit for {len(missing)} of its classes "
            f"(e.g. {missing[:3]}); it needs an ImageNet-1k head"
        )
    return [pos[w] for w in wn]


def masked_argmax(logits: torch.Tensor, keep: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``logits [B, C] -> predicted class [B]``; with ``keep``, only those columns compete.

    Equivalent to setting every other logit to -inf, and the result is an index into the full
    ``C`` classes (not into ``keep``).
    """
    if keep is None:
        return logits.argmax(dim=-1)
    keep_t = torch.as_tensor(list(keep), device=logits.device, dtype=torch.long)
    return keep_t[logits.index_select(-1, keep_t).argmax(dim=-1)]
