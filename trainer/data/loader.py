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

__all__ = ["EpochDataLoader", "build_dataloader"]


class EpochDataLoader(DataLoader):
    """A DataLoader whose `set_epoch(epoch)` reaches its DistributedSampler and its dataset."""

    def set_epoch(self, epoch: int) -> None:
        """Select epoch `epoch`'s shuffle order and augmentations; call before iterating the epoch."""
        self.sampler.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


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
                     world_size: int = 1, seed: int = 0, drop_last: bool = False) -> EpochDataLoader:
    """A loader of `batch_size` images per step for `rank` of `world_size`, with `workers` persistent processes.

    pin_memory is on only when CUDA is available; batches are `collate` dicts.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    if workers < 0:
        raise ValueError(f"workers={workers}: must be 0 (load in the main process) or more")
    workers = min(workers, os.cpu_count() or 1)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    return EpochDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=workers > 0,
        worker_init_fn=partial(_seed_worker, seed=seed, rank=rank),
        generator=torch.Generator().manual_seed(seed + rank),
    )
