"""Seeded, reproducible data loading: per-worker seeds, a seeded sample order and per-item seeds, and
``make_loader``."""
from __future__ import annotations

import contextlib
import random
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from leanclip.data.fewshot import check_seed


def _seed_worker(worker_id: int) -> None:  # runs inside each worker process only
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


@contextlib.contextmanager
def _seeded_rngs(seed: int):
    """Seed torch's CPU RNG, numpy's and ``random``'s from ``seed`` for the body, then put the caller's states back
    (so loading an item in the main process leaves the trainer's RNG streams as they were)."""
    saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])


class _SeededOrder(torch.utils.data.Sampler):
    """Yields ``(index, item_seed)``: the order of pass ``e`` is a permutation drawn from ``derive_seed(seed, e)``
    (or ``range(n)`` without shuffling) and ``item_seed = derive_seed(seed, e, index)``. With ``epoch`` fixed every
    ``iter()`` gives the same pass, however often it is called; with ``epoch=None`` pass ``e`` is the e-th iteration
    that was actually started (a generator: an iterator made and dropped unused does not count)."""

    def __init__(self, n: int, seed: int, shuffle: bool, epoch: int | None = None):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, epoch
        self._passes = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        from leanclip.utils import derive_seed

        epoch = self.epoch
        if epoch is None:
            epoch, self._passes = self._passes, self._passes + 1
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch)))
            order = order.tolist()
        else:
            order = range(self.n)
        for i in order:
            yield i, derive_seed(self.seed, epoch, i)


class _SeededItems(Dataset):
    """``dataset[index]`` computed under RNGs seeded from the item's own seed (``_SeededOrder``): a random
    augmentation of item i in pass e is the same whichever process loads it, so the run does not depend on the
    worker count, on which worker gets which batch, or on what else drew from the RNGs."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with _seeded_rngs(seed):
            return self.dataset[index]


class ItemSeeds(torch.utils.data.Sampler):
    """Gives the indices of another sampler (e.g. a ``DistributedSampler`` at its epoch) their item seeds,
    ``(index, derive_seed(seed, epoch, index))``, for a dataset wrapped with :func:`seeded_dataset`: then a random
    augmentation depends on the item and the pass only, not on the worker count or the global RNG."""

    def __init__(self, sampler, seed: int, epoch: int):
        self.sampler, self.seed, self.epoch = sampler, check_seed(seed), check_seed(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        from leanclip.utils import derive_seed

        for i in self.sampler:
            yield i, derive_seed(self.seed, self.epoch, i)


def seeded_dataset(dataset: Dataset) -> Dataset:
    """``dataset`` read by ``(index, item_seed)`` keys (:class:`ItemSeeds`), each item under RNGs seeded from its
    seed (the caller's RNG states restored afterwards)."""
    return _SeededItems(dataset)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
    *,
    epoch: int | None = None,
    pin_memory: bool = False,
    collate_fn: Callable | None = None,
    persistent_workers: bool | None = None,
) -> DataLoader:
    """A DataLoader whose batches, and every random augmentation inside them, are a function of ``(seed, epoch,
    index)`` only: not of the worker count, of how often ``iter()`` is called, or of the global RNG.

    The batch order of a pass is a permutation drawn from ``(seed, epoch)``; each item is loaded under torch / numpy
    / ``random`` RNGs seeded from ``(seed, epoch, index)`` (the caller's RNG states are restored afterwards, the
    workers' base seeds come from the loader's own generator, so the global RNG is never drawn from). ``epoch``:
    the pass to produce on every ``iter()`` (what a trainer passes); None: iteration e of this loader is pass e."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    seed = check_seed(seed)
    if epoch is not None:
        epoch = check_seed(epoch)
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    return DataLoader(
        _SeededItems(dataset),
        batch_size=batch_size,
        sampler=_SeededOrder(len(dataset), seed, shuffle, epoch),
        num_workers=num_workers,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        persistent_workers=persistent_workers,
    )
