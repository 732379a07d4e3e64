"""Images for CLIP with torchvision: preprocessing, augmentation, datasets and the DataLoader.

Preprocessing follows OpenCLIP's eval transform: bicubic resize of the short side to the
model's input size, center crop, CLIP's mean/std. Training adds a random resized crop
(bicubic) and a horizontal flip.

Odd files. Real folders hold palette GIFs, grayscale/CMYK/RGBA JPEGs and names with spaces.
Every image is opened with PIL and converted to RGB (an animated GIF gives its first frame), and
``.gif`` counts as an image extension (torchvision's list leaves it out, which would silently
drop such files). A file that PIL cannot decode at all is handled by ``on_bad_file``:

* ``"error"`` (default): raise ``BadImageError`` naming the file. A corrupt file is a data
  problem to fix, and silently training on a different set than the one named is worse.
* ``"skip"``: log a warning naming the file (once per worker) and return the next readable
  sample instead, so a run over a large folder survives a few broken files.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms as T

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif",
)
BICUBIC = T.InterpolationMode.BICUBIC


def is_image_file(path: str) -> bool:
    """Extension check used when listing class folders (case-insensitive, GIF included)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


class BadImageError(RuntimeError):
    """An image file that PIL cannot decode."""


def load_rgb(path: str) -> Image.Image:
    """Open any PIL-readable image as 3-channel RGB (first frame of an animation)."""
    try:
        with Image.open(path) as im:
            im.seek(0)
            # Palette images with transparency warn when converted straight to RGB; go via RGBA.
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            return im.convert("RGB")
    except Exception as e:  # PIL raises several unrelated types for undecodable data
        raise BadImageError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from e


def eval_transform(image_size: int) -> Callable:
    """CLIP eval preprocessing: PIL RGB -> float tensor ``[3, image_size, image_size]``."""
    return T.Compose([
        T.Resize(image_size, interpolation=BICUBIC, antialias=True),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def train_transform(image_size: int, scale: Sequence[float] = (0.08, 1.0),
                    hflip: bool = True) -> Callable:
    """Training augmentation: random resized crop (bicubic), optional flip, CLIP normalisation."""
    steps = [T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=BICUBIC,
                                 antialias=True)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return T.Compose(steps)


class RobustImages(Dataset):
    """Wraps any torchvision dataset with ``.samples [(path, label)]`` to apply ``on_bad_file``.

    Items are ``(image [3, S, S], label)``. ``class_ids`` are the class folder names
    (ImageNet wnids for an ImageNet folder), in label order.
    """

    def __init__(self, base: Dataset, class_ids: List[str], on_bad_file: str = "error"):
        if on_bad_file not in ("error", "skip"):
            raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
        self.base = base
        self.class_ids = list(class_ids)
        self.on_bad_file = on_bad_file
        self._warned: set = set()

    @property
    def samples(self) -> List[Tuple[str, int]]:
        return self.base.samples

    def __len__(self) -> int:
        return len(self.base)

    def set_transform(self, transform: Optional[Callable]) -> None:
        """Replace the per-image transform (PIL RGB -> tensor)."""
        self.base.transform = transform

    def __getitem__(self, idx: int):
        n = len(self.base)
        for step in range(n):
            j = (idx + step) % n
            try:
                return self.base[j]
            except BadImageError as e:
                if self.on_bad_file == "error":
                    raise BadImageError(f"{e} (set on_bad_file='skip' to skip such files)") from e
                if j not in self._warned:
                    self._warned.add(j)
                    log.warning("skipping unreadable image %s", self.base.samples[j][0])
        raise BadImageError(f"no readable image in a dataset of {n} files")


def image_folder(root: str | Path, transform: Optional[Callable], on_bad_file: str = "error") -> RobustImages:
    """``root/<class>/<image>`` (torchvision ``ImageFolder``), GIFs included, RGB-converted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    base = datasets.ImageFolder(str(root), transform=transform, loader=load_rgb,
                                is_valid_file=is_image_file)
    return RobustImages(base, base.classes, on_bad_file)


def imagenet(root: str | Path, split: str, transform: Optional[Callable],
             on_bad_file: str = "error") -> RobustImages:
    """``torchvision.datasets.ImageNet`` layout (``root`` with the devkit/``meta.bin`` and
    ``train``/``val``); labels are the standard 1k indices (wnids in sorted order)."""
    base = datasets.ImageNet(str(root), split=split, transform=transform, loader=load_rgb)
    return RobustImages(base, base.wnids, on_bad_file)


def build_dataset(root: str | Path, layout: str, split: str, transform: Optional[Callable],
                  on_bad_file: str = "error") -> RobustImages:
    """Dispatch on ``layout``: ``"imagefolder"`` reads ``root/<split>`` if it exists, else ``root``;
    ``"imagenet"`` uses torchvision's ``ImageNet`` class."""
    if layout == "imagenet":
        return imagenet(root, split, transform, on_bad_file)
    if layout == "imagefolder":
        folder = Path(root) / split if (Path(root) / split).is_dir() else Path(root)
        return image_folder(folder, transform, on_bad_file)
    raise ValueError(f"dataset layout must be 'imagefolder' or 'imagenet', got {layout!r}")


def _seed_worker(worker_id: int) -> None:
    # Each worker gets torch's per-worker seed; make numpy/random (used by some transforms) follow.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int = 4,
                 seed: int = 0, drop_last: bool = False, pin_memory: Optional[bool] = None,
                 sampler: Optional[Sampler] = None,
                 persistent_workers: bool = True) -> DataLoader:
    """A seeded ``DataLoader``: batches ``(images [B, 3, S, S], labels [B])``.

    Pass ``sampler`` (e.g. a resumable one) instead of ``shuffle`` to control the order.
    Workers' random streams derive from ``loader.generator`` when they start; with
    ``persistent_workers=False`` they restart every epoch, so re-seeding the generator per epoch
    makes each epoch's augmentation depend only on (seed, epoch), which a resume needs.
    """
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
        sampler=sampler, num_workers=num_workers,
        drop_last=drop_last, generator=g, worker_init_fn=_seed_worker,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
    )
