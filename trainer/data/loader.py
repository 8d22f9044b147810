"""`build_dataloader`: batches of a DetectionDataset for one rank, reproducible from (seed, epoch, rank).

Every loader shards and orders with `DistributedSampler` (one replica when world_size is 1), so the order of
epoch e is a function of (seed, e) alone and a resumed run sees exactly the batches it would have seen.
`loader.set_epoch(e)` forwards to the sampler (shuffle order) and to the dataset (augmentations).
With shuffle=False and world_size > 1 the sampler pads the last round by repeating images: evaluate on
one rank (world_size=1) when every image must count once.
"""

from __future__ import annotations

import os
import random
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from .dataset import DetectionDataset, collate

__all__ = ["EpochDataLoader", "RectBatchSampler", "build_dataloader"]


class EpochDataLoader(DataLoader):
    """A DataLoader whose `set_epoch(epoch)` reaches its sampler (or batch sampler) and its dataset."""

    def set_epoch(self, epoch: int) -> None:
        """Select epoch `epoch`'s shuffle order and augmentations; call before iterating the epoch."""
        for part in (self.sampler, self.batch_sampler, self.dataset):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)


class RectBatchSampler:
    """Rectangular training batches: each global batch is one aspect-ratio group of a `rect` dataset.

    The dataset sorts its images by aspect ratio and gives every group of `global_batch` consecutive images
    one padded shape. Each epoch shuffles the order of the groups (seeded by seed and epoch), never their
    members, and every rank takes its share of each group, so a step's images share one shape on every
    rank. A short last group is topped up by repeating its own images until it divides evenly over the
    ranks (as DistributedSampler pads), so every rank runs the same number of images per step.
    """

    def __init__(self, size: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} does not split evenly over {world_size} processes")
        self.groups = [list(range(a, min(a + global_batch, size))) for a in range(0, size, global_batch)]
        self.rank, self.world_size, self.seed, self.shuffle, self.epoch = rank, world_size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        order = range(len(self.groups))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.groups)).tolist()
        for g in order:
            members = self.groups[g]
            padded = [members[i % len(members)] for i in range(-(-len(members) // self.world_size) * self.world_size)]
            share = len(padded) // self.world_size
            yield padded[self.rank * share:(self.rank + 1) * share]


def _seed_worker(worker_id: int, seed: int, rank: int) -> None:
    """Seed the global RNGs of a worker from (seed, epoch, rank, worker id); keep OpenCV to one thread per worker."""
    import cv2

    info = torch.utils.data.get_worker_info()
    epoch = getattr(info.dataset, "epoch", 0) if info is not None else 0
    state = np.random.SeedSequence([seed, epoch, rank, worker_id]).generate_state(2)
    np.random.seed(int(state[0]))
    random.seed(int(state[1]))
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))
    cv2.setNumThreads(0)


def build_dataloader(dataset: DetectionDataset, batch_size: int, workers: int, shuffle: bool, rank: int = 0,
                     world_size: int = 1, seed: int = 0, drop_last: bool = False,
                     rect_batches: bool = False) -> EpochDataLoader:
    """A loader of `batch_size` images per step for `rank` of `world_size`, with `workers` persistent processes.

    rect_batches: the dataset was built with rect=True and batch_size = the global batch; steps are its
    aspect-ratio groups (see `RectBatchSampler`). pin_memory is on only when CUDA is available; batches are
    `collate` dicts.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    if workers < 0:
        raise ValueError(f"workers={workers}: must be 0 (load in the main process) or more")
    workers = min(workers, os.cpu_count() or 1)
    common = {"num_workers": workers, "collate_fn": collate, "pin_memory": torch.cuda.is_available(),
              "persistent_workers": workers > 0, "worker_init_fn": partial(_seed_worker, seed=seed, rank=rank),
              "generator": torch.Generator().manual_seed(seed + rank)}
    if rect_batches:
        if not getattr(dataset, "rect", False) or dataset.batch_size != batch_size * world_size:
            raise ValueError("rect_batches needs a dataset built with rect=True and batch_size = the global batch")
        batches = RectBatchSampler(len(dataset), dataset.batch_size, rank, world_size, seed, shuffle)
        return EpochDataLoader(dataset, batch_sampler=batches, **common)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    return EpochDataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **common)
