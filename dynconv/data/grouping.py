"""Aspect-ratio grouping: batches of images with similar shapes, so a batch pads less.

Detection images keep their aspect ratio, and a batch is padded to its widest and tallest image;
mixing portrait and landscape images nearly doubles the padded area. torchvision's detection reference
(``--aspect-ratio-group-factor 3``) and mmdetection's ``GroupSampler`` therefore batch images by
aspect-ratio bin. :func:`aspect_ratio_groups` assigns the bins and :class:`GroupedBatchSampler` forms
the batches on top of a per-rank sampler, with the same number of batches on every DDP rank and
exact mid-epoch resume.
"""
from __future__ import annotations

import bisect
import math
from collections import defaultdict
from typing import Dict, Iterator, List, Sequence

from torch.utils.data import Sampler

__all__ = ["aspect_ratio_groups", "GroupedBatchSampler"]


def aspect_ratio_groups(aspect_ratios: Sequence[float], factor: int = 3) -> List[int]:
    """Group id of each aspect ratio (width / height).

    The rule (torchvision's detection reference uses the same edges): ``2 * factor + 1`` edges spaced
    evenly in log2 between 1/2 and 2, i.e. ``2 ** linspace(-1, 1, 2 * factor + 1)``, so a ratio and its
    inverse fall in mirrored bins. A ratio's group is the number of edges at or below it, from 0
    (narrower than 1:2) to ``2 * factor + 1`` (2:1 or wider). ``factor=0`` puts every image in group 0
    (no grouping; torchvision's reference instead splits at 1 there).

    Raises:
        ValueError: a negative factor or a ratio that is not a positive finite number.
    """
    if factor < 0:
        raise ValueError(f"factor must be >= 0, got {factor}")
    bad = [r for r in aspect_ratios if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0)]
    if bad:
        raise ValueError(f"aspect ratios must be positive finite numbers, got e.g. {bad[:3]}")
    if factor == 0:
        return [0] * len(aspect_ratios)
    edges = [2.0 ** (-1.0 + k / factor) for k in range(2 * factor + 1)]
    return [bisect.bisect_right(edges, r) for r in aspect_ratios]


class GroupedBatchSampler(Sampler[List[int]]):
    """Batches of ``batch_size`` indices from one group each, in the order ``sampler`` yields them.

    One epoch walks this rank's indices from ``sampler`` and emits a batch whenever a group has
    ``batch_size`` of them. It always has exactly ``num_batches = samples per rank // batch_size``
    batches, the count an ungrouped loader with ``drop_last`` has, so DDP ranks stay in step. The
    batches still missing after the walk are filled deterministically: the groups with the most
    leftover indices (ties: lower group id) each make one more batch, completed with the earliest
    indices of the same group in this epoch (cycled if the group is that small). Every batch is thus
    single-group; leftovers of the other groups wait for another epoch's permutation, like
    ``drop_last``'s remainder. The batches are a function of the sampler's epoch only, so
    :meth:`set_start` resumes an epoch exactly.

    Args:
        sampler: this rank's index sampler with ``set_epoch`` (e.g.
            :class:`~dynconv.data.loader.ResumableDistributedSampler`), iterated from its start.
        group_ids: group of every dataset index (e.g. from :func:`aspect_ratio_groups`).
        batch_size: indices per batch.
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        dataset = getattr(sampler, "dataset", None)
        if dataset is not None and len(group_ids) != len(dataset):
            raise ValueError(f"group_ids has {len(group_ids)} entries for a dataset of {len(dataset)}")
        self.sampler = sampler
        self.group_ids = [int(g) for g in group_ids]
        self.batch_size = batch_size
        # Per-rank samples in a full epoch: DistributedSampler's num_samples, equal on every rank.
        self.num_batches = int(getattr(sampler, "num_samples", len(sampler))) // batch_size
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the sampler's epoch and start it from its first batch."""
        self.sampler.set_epoch(epoch)
        self.start = 0

    def set_start(self, start_batch: int) -> None:
        """Skip the first ``start_batch`` batches of the current epoch."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch must be in 0..{self.num_batches} (batches per epoch), got {start_batch}")
        self.start = start_batch

    def epoch_batches(self) -> List[List[int]]:
        """Every batch of the current epoch, from the first."""
        indices = list(self.sampler)
        if len(indices) < self.num_batches * self.batch_size:
            raise ValueError(f"the sampler yielded {len(indices)} indices, fewer than a full epoch's "
                             f"{self.num_batches * self.batch_size}; it must be iterated from its start")
        batches: List[List[int]] = []
        pending: Dict[int, List[int]] = defaultdict(list)
        members: Dict[int, List[int]] = defaultdict(list)
        for index in indices:
            group = self.group_ids[index]
            members[group].append(index)
            pending[group].append(index)
            if len(pending[group]) == self.batch_size:
                batches.append(pending.pop(group))
        missing = self.num_batches - len(batches)
        fullest = sorted((g for g in pending if pending[g]), key=lambda g: (-len(pending[g]), g))[:missing]
        for group in fullest:
            need = self.batch_size - len(pending[group])
            pool = members[group]
            batches.append(pending[group] + [pool[k % len(pool)] for k in range(need)])
        return batches[:self.num_batches]

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self.epoch_batches()[self.start:])

    def __len__(self) -> int:
        """Batches left in this epoch, after the skipped ones."""
        return self.num_batches - self.start
