"""Data loaders with exact mid-epoch resume and DDP sharding, independent of the number of workers.

Training: :class:`ResumableDistributedSampler` gives DistributedSampler's permutation (a function of
``seed`` and the epoch) and can skip the part of an epoch already seen; :class:`SeededDataset` seeds the
augmentation of sample ``i`` in epoch ``e`` from ``(seed, e, i)``. Together a resumed epoch yields the
same batches, bit for bit, as the uninterrupted one, with any number of workers. Detection training can
batch by aspect-ratio group with :class:`~dynconv.data.grouping.GroupedBatchSampler` on top of the same
sampler. Evaluation: each rank gets the disjoint, unpadded shard ``rank::world_size``, so the ranks
together see every sample once.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .grouping import GroupedBatchSampler
from .imagenet import imagenet_datasets
from .synthetic import make_synthetic_dataset

__all__ = [
    "ResumableDistributedSampler", "ShardSampler", "SeededDataset", "EpochLoader", "build_loader",
    "DataBundle", "build_datasets", "DATASETS",
]

DATASETS = ("synthetic", "imagenet")


def _check_start(start: int, total: int) -> int:
    if not 0 <= start <= total:
        raise ValueError(f"start must be in 0..{total} (this rank's samples per epoch), got {start}")
    return start


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way through, for resuming mid-epoch.

    Args:
        dataset: the dataset to sample.
        num_replicas, rank: DDP world size and rank; default to 1 and 0 when no process group is
            initialised.
        shuffle, seed, drop_last: as for :class:`~torch.utils.data.DistributedSampler`.
    """

    def __init__(self, dataset: Dataset, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            num_replicas = 1 if num_replicas is None else num_replicas
            rank = 0 if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation and start it from the beginning (call :meth:`set_start` after)."""
        super().set_epoch(epoch)
        self.start = 0

    def set_start(self, index: int) -> None:
        """Skip the first ``index`` of this rank's samples in the current epoch."""
        self.start = _check_start(index, self.num_samples)

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler[int]):
    """The indices ``rank, rank + world_size, ...`` in order: disjoint across ranks, no padding.

    Shards differ in length by at most one, so the caller must reduce sums (e.g. correct counts), not
    per-rank means. ``set_epoch`` is a no-op, present so eval and train samplers are interchangeable.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in 0..{num_replicas - 1}, got {rank}")
        self.indices = list(range(rank, len(dataset), num_replicas))
        self.num_samples = len(self.indices)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.start = 0

    def set_start(self, index: int) -> None:
        self.start = _check_start(index, self.num_samples)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def _seed_words(*values: int) -> np.ndarray:
    # SeedSequence hashes the tuple well, so nearby (seed, epoch, index) give unrelated streams.
    return np.random.SeedSequence([int(v) for v in values]).generate_state(4, dtype=np.uint32)


class SeededDataset(Dataset):
    """Transforms sample ``i`` of epoch ``e`` with python, numpy and torch RNGs seeded from ``(seed, e, i)``.

    Augmentation then depends neither on the worker that loads a sample nor on what was loaded before,
    so a resumed epoch matches the uninterrupted one. The caller's global RNG states are restored after
    each item, so loading in the main process (``workers=0``) leaves them untouched.

    Args:
        dataset: the map-style dataset to wrap (its other attributes, e.g. ``classes``, are forwarded).
        seed: base seed (non-negative).
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose seeds :meth:`__getitem__` uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        words = _seed_words(self.seed, self.epoch, index)
        seed64 = int(words[0]) << 32 | int(words[1])
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed64)
                np.random.seed(words)
                torch.manual_seed(seed64)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def __getattr__(self, name: str) -> Any:
        # Guard: during unpickling in workers ``dataset`` is not set yet, and looking it up here would recurse.
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker with base_seed + worker_id (base_seed from the loader's generator);
    # python and numpy are left alone by torch, so derive them from it.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class EpochLoader:
    """A DataLoader whose epoch and starting batch are set explicitly, for exact resume.

    Call :meth:`set_epoch` before iterating each epoch. Workers are not persistent, so each epoch starts
    fresh workers that receive the dataset with the epoch just set in the main process.

    Attributes:
        loader: the wrapped :class:`~torch.utils.data.DataLoader`.
        sampler: a :class:`ResumableDistributedSampler` (train) or :class:`ShardSampler` (eval).
        batch_sampler: the :class:`~dynconv.data.grouping.GroupedBatchSampler` over ``sampler`` when the
            loader batches by group, else None.
        dataset: the dataset the loader reads (a :class:`SeededDataset` when training).
        batch_size: samples per batch on this rank.
    """

    def __init__(self, loader: DataLoader, seed: int = 0, rank: int = 0) -> None:
        self.loader = loader
        grouped = loader.batch_sampler if isinstance(loader.batch_sampler, GroupedBatchSampler) else None
        self.batch_sampler: Optional[GroupedBatchSampler] = grouped
        self.sampler: Union[ResumableDistributedSampler, ShardSampler] = \
            grouped.sampler if grouped is not None else loader.sampler
        self.dataset = loader.dataset
        self.batch_size: int = grouped.batch_size if grouped is not None else loader.batch_size
        self.drop_last: bool = True if grouped is not None else loader.drop_last
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.start_batch = 0
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select ``epoch`` and skip its first ``start_batch`` batches (those of this rank)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in 0..{len(self)} (batches per epoch), got {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch
        if self.batch_sampler is not None:
            self.batch_sampler.set_epoch(epoch)  # also the sampler's, which the batch sampler walks whole
            self.batch_sampler.set_start(start_batch)
        else:
            self.sampler.set_epoch(epoch)
            self.sampler.set_start(start_batch * self.batch_size)
        if isinstance(self.dataset, SeededDataset):
            self.dataset.set_epoch(epoch)
        # Worker seeds come from this generator: make them a function of (seed, epoch, rank) too.
        self.loader.generator.manual_seed(int(_seed_words(self.seed, epoch, self.rank)[0]))

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)

    def __len__(self) -> int:
        """Batches in a full epoch on this rank, whatever the start batch."""
        if self.batch_sampler is not None:
            return self.batch_sampler.num_batches
        n = self.sampler.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    workers: int = 0,
    seed: int = 0,
    world_size: int = 1,
    rank: int = 0,
    drop_last: Optional[bool] = None,
    collate_fn: Optional[Callable] = None,
    pin_memory: bool = False,
    group_ids: Optional[Sequence[int]] = None,
) -> EpochLoader:
    """An :class:`EpochLoader` for training (shuffled, seeded augmentation) or evaluation (sharded, in order).

    Args:
        dataset: map-style dataset.
        batch_size: per-rank batch size.
        train: shuffle with :class:`ResumableDistributedSampler` and seed each sample with
            :class:`SeededDataset`; otherwise read the shard ``rank::world_size`` in order.
        workers: DataLoader worker processes.
        seed: base seed for the permutation, the augmentation and the workers.
        world_size, rank: DDP settings (no process group needed).
        drop_last: drop the last incomplete batch; defaults to True for training, False for evaluation.
        collate_fn, pin_memory: passed to the DataLoader (e.g.
            :func:`~dynconv.data.coco.detection_collate` for detection, train or eval).
        group_ids: training only: the group of every sample (e.g. aspect-ratio bins from
            :func:`~dynconv.data.grouping.aspect_ratio_groups`); each batch then comes from one group,
            via :class:`~dynconv.data.grouping.GroupedBatchSampler`, which always drops the remainder.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if group_ids is not None and not train:
        raise ValueError("group_ids is for training only; evaluation reads its shard in order")
    if group_ids is not None and drop_last is False:
        raise ValueError("group_ids needs drop_last: grouped batches always drop the epoch's remainder")
    if train:
        dataset = SeededDataset(dataset, seed)
        sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                              seed=seed, drop_last=False)
    else:
        sampler = ShardSampler(dataset, num_replicas=world_size, rank=rank)
    if group_ids is not None:
        # The batch sampler carries the batch size and the dropping; DataLoader refuses both beside it.
        batching = dict(batch_sampler=GroupedBatchSampler(sampler, group_ids, batch_size))
    else:
        batching = dict(batch_size=batch_size, sampler=sampler, drop_last=train if drop_last is None else drop_last)
    loader = DataLoader(
        dataset,
        **batching,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        worker_init_fn=_seed_worker if workers > 0 else None,
        # Also with workers=0: without a generator the loader draws its base seed from the global RNG.
        generator=torch.Generator(),
        persistent_workers=False,
    )
    return EpochLoader(loader, seed=seed, rank=rank)


@dataclass
class DataBundle:
    """Train and val datasets with their class names."""

    train: Dataset
    val: Dataset
    classes: List[str]
    num_classes: int


def build_datasets(
    name: str,
    root: Union[str, Path],
    *,
    image_size: int,
    classes: Union[int, Sequence[str], None] = None,
    train_per_class: int = 300,
    val_per_class: int = 50,
    synthetic_num_classes: int = 10,
    train_transform: Optional[Callable] = None,
    eval_transform: Optional[Callable] = None,
    on_corrupt: str = "raise",
    max_bad_fraction: float = 0.001,
) -> DataBundle:
    """Train and val datasets by name, both read by :class:`ImageFolderDataset`.

    Args:
        name: ``"synthetic"`` (generated at ``root`` if not there yet, see
            :func:`~dynconv.data.synthetic.make_synthetic_dataset`) or ``"imagenet"``.
        root: dataset directory with ``train/`` and ``val/``.
        image_size: synthetic image side (the transforms set the model's input size).
        classes: ``N`` keeps the first N classes, a list keeps those names.
        train_per_class, val_per_class, synthetic_num_classes: synthetic set size.
        train_transform, eval_transform, on_corrupt, max_bad_fraction: see
            :func:`~dynconv.data.imagenet.imagenet_datasets`.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if name == "synthetic":
        make_synthetic_dataset(root, num_classes=synthetic_num_classes, train_per_class=train_per_class,
                               val_per_class=val_per_class, image_size=image_size)
    train, val = imagenet_datasets(root, train_transform=train_transform, eval_transform=eval_transform,
                                   classes=classes, on_corrupt=on_corrupt, max_bad_fraction=max_bad_fraction)
    return DataBundle(train, val, list(train.classes), len(train.classes))
