"""Aspect-ratio grouping: single-group batches, equal counts on every rank, exact resume, loaders."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from dynconv.data import (
    GroupedBatchSampler,
    ResumableDistributedSampler,
    aspect_ratio_groups,
    build_detection_transform,
    build_loader,
    coco_datasets,
    detection_collate,
    make_synthetic_coco,
)


def test_aspect_ratio_bins():
    edges = 2.0 ** np.linspace(-1, 1, 7)  # factor 3: 1/2 .. 2 in six log-even steps
    ratios = [0.3, 0.5, 0.55, 0.7, 0.9, 1.0, 1.1, 1.4, 1.9, 2.0, 5.0]
    assert aspect_ratio_groups(ratios, factor=3) == [int((r >= edges).sum()) for r in ratios]
    assert aspect_ratio_groups(ratios, factor=3) == [0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 7]
    off_edge = [0.3, 0.55, 0.7, 0.9, 1.1, 1.4, 1.9, 5.0]  # a ratio and its inverse land in mirrored bins
    assert [a + b for a, b in zip(aspect_ratio_groups(off_edge), aspect_ratio_groups([1 / r for r in off_edge]))] \
        == [7] * len(off_edge)
    assert set(aspect_ratio_groups(ratios, factor=1)) == {0, 1, 2, 3}
    assert aspect_ratio_groups(ratios, factor=0) == [0] * len(ratios)
    with pytest.raises(ValueError, match="factor"):
        aspect_ratio_groups(ratios, factor=-1)
    with pytest.raises(ValueError, match="positive finite"):
        aspect_ratio_groups([1.0, 0.0])


def epoch(batch_sampler: GroupedBatchSampler, e: int, start: int = 0):
    batch_sampler.set_epoch(e)
    batch_sampler.set_start(start)
    return list(batch_sampler)


@pytest.mark.parametrize("n, batch_size", [(23, 3), (40, 4), (9, 5)])
def test_batches_are_single_group_and_equal_in_count_on_every_rank(n, batch_size):
    groups = np.random.default_rng(n).integers(0, 3, n).tolist()
    counts = []
    for rank in (0, 1):
        sampler = ResumableDistributedSampler(list(range(n)), num_replicas=2, rank=rank, seed=4)
        grouped = GroupedBatchSampler(sampler, groups, batch_size)
        for e in (0, 1):
            batches = epoch(grouped, e)
            sampler.set_epoch(e)
            indices = list(sampler)
            counts.append(len(batches))
            assert len(batches) == len(grouped) == len(indices) // batch_size
            assert all(len(b) == batch_size and len({groups[i] for i in b}) == 1 for b in batches)
            seen = {i for b in batches for i in b}
            assert seen <= set(indices)
            # Only leftovers that cannot fill a batch of their group are left for another epoch.
            missed = set(indices) - seen
            assert len(missed) <= 3 * (batch_size - 1)
            for g in {groups[i] for i in missed}:
                assert sum(groups[i] == g for i in missed) < batch_size
            assert epoch(grouped, e) == batches  # a function of the epoch
    assert len(set(counts)) == 1


def test_every_index_once_when_groups_fill_whole_batches():
    # Rank r gets indices r, r + 2, ... (no shuffle); groups of 4 consecutive per-rank positions.
    n, batch_size = 32, 4
    groups = [(i // 2) // 4 % 3 for i in range(n)]
    for rank in (0, 1):
        sampler = ResumableDistributedSampler(list(range(n)), num_replicas=2, rank=rank, shuffle=False)
        batches = epoch(GroupedBatchSampler(sampler, groups, batch_size), 0)
        assert sorted(i for b in batches for i in b) == list(range(rank, n, 2))


def test_fill_batches_repeat_the_groups_own_indices():
    groups = [0] * 5 + [1] * 2 + [2]  # batch 3: group 0 makes one batch, leaves 2; group 1 leaves 2
    sampler = ResumableDistributedSampler(list(range(8)), shuffle=False)
    batches = epoch(GroupedBatchSampler(sampler, groups, 3), 0)
    assert batches == [[0, 1, 2], [3, 4, 0]]  # 8 // 3 = 2 batches; the fullest leftover group is completed


def test_resume_at_batch_k_equals_the_rest_of_the_epoch():
    groups = np.random.default_rng(0).integers(0, 4, 50).tolist()
    sampler = ResumableDistributedSampler(list(range(50)), seed=9)
    grouped = GroupedBatchSampler(sampler, groups, 4)
    full = epoch(grouped, 3)
    assert full != epoch(grouped, 4)
    resumed = GroupedBatchSampler(ResumableDistributedSampler(list(range(50)), seed=9), groups, 4)
    for k in (0, 1, 5, len(full)):
        assert epoch(resumed, 3, k) == full[k:] and len(resumed) == len(full) - k
    with pytest.raises(ValueError, match="start_batch"):
        resumed.set_start(len(full) + 1)
    with pytest.raises(ValueError, match="group_ids has 3 entries"):
        GroupedBatchSampler(sampler, [0, 1, 0], 4)


class Shapes(Dataset):
    """Item ``i``: a random image whose shape depends on its group (so only single-group batches stack)."""

    def __init__(self, groups):
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i):
        height, width = [(6, 10), (8, 8), (10, 6)][self.groups[i]]
        return torch.rand(3, height, width), i


def collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_build_loader_with_groups_resumes_exactly_with_any_workers():
    groups = np.random.default_rng(2).integers(0, 3, 30).tolist()
    data = Shapes(groups)
    full = build_loader(data, batch_size=3, train=True, seed=1, group_ids=groups)
    assert len(full) == 10 and full.batch_size == 3 and full.batch_sampler is not None
    full.set_epoch(2)
    batches = collect(full)  # default collate stacks them: one shape per batch
    assert len(batches) == 10 and all(len({groups[i] for i in y.tolist()}) == 1 for _, y in batches)
    resumed = build_loader(data, batch_size=3, train=True, seed=1, group_ids=groups, workers=2)
    resumed.set_epoch(2, start_batch=4)
    assert len(resumed) == 10
    tail = collect(resumed)
    assert len(tail) == 6
    for (xa, ya), (xb, yb) in zip(tail, batches[4:]):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)  # same indices and the same augmentation
    full.set_epoch(3)
    assert not torch.equal(collect(full)[0][1], batches[0][1])
    with pytest.raises(ValueError, match="start_batch"):
        full.set_epoch(0, start_batch=11)

    ranks = []
    for rank in (0, 1):
        loader = build_loader(data, batch_size=3, train=True, seed=1, world_size=2, rank=rank, group_ids=groups)
        loader.set_epoch(0)
        ranks.append(collect(loader))
    assert len(ranks[0]) == len(ranks[1]) == 5


def test_group_ids_are_for_training_with_drop_last():
    groups = [0] * 6
    with pytest.raises(ValueError, match="training only"):
        build_loader(Shapes(groups), batch_size=2, train=False, group_ids=groups)
    with pytest.raises(ValueError, match="drop_last"):
        build_loader(Shapes(groups), batch_size=2, train=True, drop_last=False, group_ids=groups)


def test_coco_train_and_eval_loaders(tmp_path):
    root = make_synthetic_coco(tmp_path / "coco", train_images=12, val_images=5, image_size=96)
    data = coco_datasets(root, train_transforms=build_detection_transform(True),
                         eval_transforms=build_detection_transform(False))
    groups = aspect_ratio_groups(data.train.aspect_ratios())
    train = build_loader(data.train, batch_size=2, train=True, group_ids=groups, collate_fn=detection_collate)
    train.set_epoch(0, start_batch=1)
    batches = list(train)
    assert len(train) == 5 and len(batches) == 4
    for images, targets in batches:
        assert len(images) == len(targets) == 2 and len({im.shape for im in images}) == 1  # one aspect ratio
    for rank in (0, 1):
        val = build_loader(data.val, batch_size=2, train=False, world_size=2, rank=rank,
                           collate_fn=detection_collate)
        val.set_epoch(0)
        ids = [t["image_id"] for _, targets in val for t in targets]
        assert ids == data.val.ids[rank::2]  # in order, unpadded
