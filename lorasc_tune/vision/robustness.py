"""Top-1 on ImageNet and its distribution shifts, given a classifier and folders of images.

Set kinds and the folder layout each expects (``<c>`` is a class folder):

============================  ===============================================================
``imagenet_val``              ``root/<wnid>/*`` (or ``root/val/<wnid>/*``, torchvision layout)
``imagenet_v2``               ``root/<0..999>/*`` (class folders named by 1k index)
``imagenet_c``                ``root/<corruption>/<severity>/<wnid>/*``; mean over every
                              (corruption, severity) present, plus per-corruption means
``imagenet_r``, ``imagenet_a``  ``root/<wnid>/*`` over 200 classes; the arg-max runs over the
                              200 logits of those classes only
``imagenet_sketch``           ``root/<wnid>/*`` (or ``root/sketch/<wnid>/*``)
``stylized_imagenet``         ``root/<wnid>/*`` (or ``root/val/<wnid>/*``)
``folder``                    any ``root/<c>/*`` whose class names are the head's classes
============================  ===============================================================

A class folder's label is the head's index of its name (so a head trained on ants/bees reads
``ants``/``bees`` folders), or, for an ImageNet-1k head, the integer name of an IN-V2 folder.
A folder name that maps to no logit is an error naming the folder, not a silent zero.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset
from torchvision import datasets

from lorasc_tune.vision.data import RobustImages, build_loader, is_image_file, load_rgb
from lorasc_tune.vision.imagenet_index import ImageNetIndex, keep_indices, masked_argmax

log = logging.getLogger(__name__)

PLAIN_KINDS = ("imagenet_val", "imagenet_v2", "imagenet_sketch", "stylized_imagenet", "folder")
SUBSET_KINDS = ("imagenet_r", "imagenet_a")
GRID_KINDS = ("imagenet_c",)
SET_KINDS = PLAIN_KINDS + SUBSET_KINDS + GRID_KINDS
# Subfolder a set's archive unpacks to, tried when the given root holds no class folders.
_INNER = ("val", "sketch", "imagenet-r", "imagenet-a")


def _labeler(class_ids: Sequence[str]) -> Callable[[str], Optional[int]]:
    pos = {c: i for i, c in enumerate(class_ids)}
    allow_int = len(class_ids) == 1000  # IN-V2 folders are 1k indices

    def label(name: str) -> Optional[int]:
        if name in pos:
            return pos[name]
        if allow_int and name.isdigit() and int(name) < 1000:
            return int(name)
        return None

    return label


class _LabelledFolder(datasets.ImageFolder):
    """``ImageFolder`` whose labels come from the head's class list instead of sorted order."""

    def __init__(self, root: str, label: Callable[[str], Optional[int]], **kw):
        self._label = label
        super().__init__(root, **kw)

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        names = sorted(e.name for e in Path(directory).iterdir() if e.is_dir())
        unknown = [n for n in names if self._label(n) is None]
        if unknown:
            raise ValueError(
                f"{directory}: class folder(s) {unknown[:5]} match no class of the classifier "
                f"head (expected its class names, ImageNet wnids, or 0-999 for ImageNet-V2)"
            )
        if not names:
            raise FileNotFoundError(f"{directory}: no class folders")
        return names, {n: self._label(n) for n in names}


def class_folder_set(root: str | Path, class_ids: Sequence[str], transform: Callable,
                     on_bad_file: str = "error") -> RobustImages:
    """Images under ``root/<class>/``, labelled with head indices (see module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"evaluation folder not found: {root}")
    label = _labeler(class_ids)
    subdirs = [e for e in root.iterdir() if e.is_dir()]
    if not any(label(e.name) is not None for e in subdirs):
        inner = next((root / n for n in _INNER if (root / n).is_dir()), None)
        if inner is not None:
            root = inner
    base = _LabelledFolder(str(root), label, transform=transform, loader=load_rgb,
                           is_valid_file=is_image_file)
    return RobustImages(base, list(class_ids), on_bad_file)


def check_eval_sets(sets: Dict[str, str], class_ids: Sequence[str],
                    index_dir: Optional[str] = None,
                    key_prefix: str = "") -> Dict[str, List[int]]:
    """Check every ``{name: root}`` of an evaluation without reading any image; raise on the
    first bad one with its name (``key_prefix + name``, e.g. ``eval.sets.imagenet_r``).

    Checked: the kind is one of :data:`SET_KINDS`, ``root`` is an existing folder, and for
    ImageNet-R/-A the class index in ``index_dir`` loads and covers every class of the subset
    in the head ``class_ids``. Returns ``{name: head indices kept}`` for those subset sets, so
    :func:`evaluate_sets` masks with exactly what was checked.
    """
    index = None
    keeps: Dict[str, List[int]] = {}
    for name, root in sets.items():
        shown = f"{key_prefix}{name}"
        kind = name.split(":", 1)[0]
        if kind not in SET_KINDS:
            raise ValueError(f"unknown evaluation set {shown!r}; kinds are "
                             f"{', '.join(SET_KINDS)}")
        if root is None or str(root) == "":
            raise FileNotFoundError(f"evaluation set {shown!r}: no folder given")
        if not Path(root).is_dir():
            raise FileNotFoundError(f"evaluation set {shown!r}: folder not found: {root}")
        if kind in SUBSET_KINDS:
            try:
                # One index serves both subsets; it is only read if a subset set is asked for.
                index = index or ImageNetIndex.load(index_dir)
                keeps[name] = keep_indices(index, kind, class_ids)
            except (OSError, ValueError, KeyError, IndexError) as e:
                # The index errors name only files; say which set needed them. A missing file
                # stays a FileNotFoundError; a malformed one (bad JSON, an index out of range)
                # becomes a ValueError rather than a bare KeyError/IndexError.
                kind_of = FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError
                raise kind_of(f"evaluation set {shown!r}: {e}") from e
    return keeps


def _subsample(ds, limit: Optional[int]):
    """Evenly spaced ``limit`` items (folders are class-sorted, so a prefix would be one class)."""
    if not limit or limit >= len(ds):
        return ds
    idx = np.unique(np.linspace(0, len(ds) - 1, limit).round().astype(int)).tolist()
    return Subset(ds, idx)


@torch.no_grad()
def top1(model: nn.Module, loader, device: torch.device,
         keep: Optional[Sequence[int]] = None) -> Tuple[int, int]:
    """``(correct, total)`` of arg-max predictions (restricted to ``keep`` if given)."""
    model.eval()
    correct = total = 0
    for images, labels in loader:
        logits = model(images.to(device, non_blocking=True)).float()
        pred = masked_argmax(logits, keep).cpu()
        correct += int((pred == labels).sum())
        total += int(labels.numel())
    return correct, total


def _pct(correct: int, total: int) -> float:
    return 100.0 * correct / total if total else float("nan")


def evaluate_sets(
    model: nn.Module,
    sets: Dict[str, str],
    class_ids: Sequence[str],
    transform: Callable,
    device: torch.device,
    batch_size: int = 64,
    num_workers: int = 4,
    index_dir: Optional[str] = None,
    limit: Optional[int] = None,
    on_bad_file: str = "error",
) -> Dict[str, dict]:
    """Top-1 (%) for each ``{name: root}``; ``name`` is a kind from :data:`SET_KINDS`, optionally
    suffixed ``kind:label`` to evaluate two folders of one kind (e.g. ``folder:val``).

    Returns ``{name: {"top1": float, "n": int, ...}}``; ``imagenet_c`` adds ``per_corruption``
    ``{corruption: top1}`` and ``per_severity`` ``{corruption: {severity: top1}}``.
    """
    # Every set is checked before the first is scored, so a typo in the last set does not
    # surface only after the others have run.
    keeps = check_eval_sets(sets, class_ids, index_dir)
    results: Dict[str, dict] = {}

    def run(ds, keep=None) -> Tuple[int, int]:
        ds = _subsample(ds, limit)
        loader = build_loader(ds, batch_size, shuffle=False, num_workers=num_workers)
        return top1(model, loader, device, keep)

    for name, root in sets.items():
        kind = name.split(":", 1)[0]
        if kind in SUBSET_KINDS:
            keep = keeps[name]
            c, n = run(class_folder_set(root, class_ids, transform, on_bad_file), keep)
            results[name] = {"top1": _pct(c, n), "n": n, "classes": len(keep)}
        elif kind in GRID_KINDS:
            results[name] = _imagenet_c(Path(root), class_ids, transform, on_bad_file, run)
        else:
            c, n = run(class_folder_set(root, class_ids, transform, on_bad_file))
            results[name] = {"top1": _pct(c, n), "n": n}
        log.info("%s: top-1 %.2f%% over %d images", name, results[name]["top1"],
                 results[name]["n"])
    return results


def _imagenet_c(root: Path, class_ids, transform, on_bad_file, run) -> dict:
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet-C folder not found: {root}")
    per_sev: Dict[str, Dict[str, float]] = {}
    n_total = 0
    for corr in sorted(e for e in root.iterdir() if e.is_dir()):
        sevs = sorted((e for e in corr.iterdir() if e.is_dir() and e.name.isdigit()),
                      key=lambda e: int(e.name))
        if not sevs:
            raise FileNotFoundError(f"{corr}: expected severity folders 1..5 inside")
        for sev in sevs:
            c, n = run(class_folder_set(sev, class_ids, transform, on_bad_file))
            per_sev.setdefault(corr.name, {})[sev.name] = _pct(c, n)
            n_total += n
    if not per_sev:
        raise FileNotFoundError(f"{root}: no corruption folders")
    cells = [v for sevs in per_sev.values() for v in sevs.values()]
    per_corr = {k: float(np.mean(list(v.values()))) for k, v in per_sev.items()}
    return {"top1": float(np.mean(cells)), "n": n_total, "per_corruption": per_corr,
            "per_severity": per_sev}


def format_table(results: Dict[str, dict]) -> str:
    """Markdown table: one row per set, and an indented row per ImageNet-C corruption."""
    rows = ["| set | top-1 (%) | images |", "|---|---:|---:|"]
    for name, r in results.items():
        label = f"{name} (mean)" if "per_corruption" in r else name
        rows.append(f"| {label} | {_fmt(r['top1'])} | {r['n']} |")
        for corr, v in r.get("per_corruption", {}).items():
            rows.append(f"| &nbsp;&nbsp;{name}/{corr} | {_fmt(v)} | |")
    return "\n".join(rows)


def _fmt(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.2f}"


def write_json(results: Dict[str, dict], path: str | Path, extra: Optional[dict] = None) -> None:
    from lorasc_tune.io import atomic_write_text

    atomic_write_text(path, json.dumps({**(extra or {}), "results": results}, indent=2))
