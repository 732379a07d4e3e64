"""The recipes' data order: a sampler that can start an epoch part-way through (exact
mid-epoch resume), and the loader built around it."""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class ResumableSampler(Sampler[int]):
    """torchtune's data order (``DistributedSampler``, seed 0), optionally skipping a prefix.

    ``set_epoch(epoch, skip=n)`` makes the next iteration yield the epoch's order from its
    ``n``-th sample on, which is what a run interrupted after ``n`` samples had left to see.
    """

    def __init__(self, dataset: Dataset, shuffle: bool, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        self._inner = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank,
                                         shuffle=shuffle, seed=seed)
        self._skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self._inner.set_epoch(epoch)
        self._skip = skip

    def __iter__(self) -> Iterator[int]:
        order = list(self._inner)
        return iter(order[self._skip:])

    def __len__(self) -> int:
        return max(0, len(self._inner) - self._skip)


def build_dataloader(dataset: Dataset, cfg: Any, pad_id: int, ignore_idx: int, seed: int,
                     num_replicas: int = 1, rank: int = 0) -> Tuple[ResumableSampler, DataLoader]:
    """The recipes' sampler and loader: ``batch_size``, ``shuffle``, ``collate_fn`` from ``cfg``.

    Each rank takes every ``num_replicas``-th sample of one shared order, so a global batch is
    the same set of samples at any world size. The loader has its own generator: creating an
    iterator then draws nothing from the global RNG, so dropout masks after a mid-epoch resume
    match the uninterrupted run.
    """
    from torchtune.config._utils import _get_component_from_path
    from torchtune.data import padded_collate_packed
    from torchtune.datasets import PackedDataset

    sampler = ResumableSampler(dataset, shuffle=cfg.shuffle, num_replicas=num_replicas, rank=rank)
    # Read from the dataset, not the config: a list of datasets (a ConcatDataset, which has a
    # ``packed`` attribute) has no single ``packed`` key; a PackedDataset is packed by type.
    packed = getattr(dataset, "packed", False) or isinstance(dataset, PackedDataset)
    collate = _get_component_from_path(cfg.get("collate_fn", "torchtune.data.padded_collate_sft"))
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=padded_collate_packed if packed else partial(
            collate, padding_idx=pad_id, ignore_idx=ignore_idx))
    return sampler, loader
