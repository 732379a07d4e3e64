"""A sampler that can start an epoch part-way through, for exact mid-epoch resume."""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import Dataset, DistributedSampler, Sampler


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
