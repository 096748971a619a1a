"""Loaders: DDP sharding, resume equals uninterrupted, worker-count independence; transforms; datasets."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler
from torchvision import transforms as T

from dynconv.data import (
    SYNTHETIC_CLASSES,
    EpochLoader,
    ResumableDistributedSampler,
    build_datasets,
    build_loader,
    build_transform,
)


class Images(Dataset):
    """``n`` random 20x16 PIL images, label = index, each passed through ``transform``."""

    def __init__(self, n: int = 22, transform=None) -> None:
        rng = np.random.default_rng(1)
        self.images = [Image.fromarray(rng.integers(0, 255, (16, 20, 3), np.uint8)) for _ in range(n)]
        self.transform = transform
        self.classes = ["a", "b"]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        return (self.transform(image) if self.transform else T.functional.pil_to_tensor(image)), i


def augmenting() -> T.Compose:
    """Draws from torch (crop, flip, erasing) and python ``random`` (RandAugment)."""
    return build_transform(train=True, image_size=8, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.5)


def collect(loader: EpochLoader):
    return [(x.clone(), y.clone()) for x, y in loader]


def by_label(batches):
    return {int(y): x for xs, ys in batches for x, y in zip(xs, ys)}


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


@pytest.mark.parametrize("size", [10, 11])
def test_sampler_matches_distributed_sampler_and_resumes(size):
    data = list(range(size))
    for epoch in (0, 3):
        ranks = []
        for rank in (0, 1):
            ours = ResumableDistributedSampler(data, num_replicas=2, rank=rank, seed=7)
            theirs = DistributedSampler(data, num_replicas=2, rank=rank, seed=7)
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            full = list(theirs)
            assert list(ours) == full and len(ours) == len(full)
            ours.set_start(2)
            assert list(ours) == full[2:] and len(ours) == len(full) - 2
            ours.set_epoch(epoch)  # a new epoch starts from its beginning
            assert list(ours) == full
            ranks += full
        assert set(ranks) == set(data)


def test_sampler_without_process_group_and_bad_start():
    sampler = ResumableDistributedSampler(list(range(5)))
    assert (sampler.num_replicas, sampler.rank, len(sampler)) == (1, 0, 5)
    with pytest.raises(ValueError, match="0..5"):
        sampler.set_start(6)


def test_resume_mid_epoch_equals_uninterrupted():
    data = Images(transform=augmenting())
    full = build_loader(data, batch_size=4, train=True, seed=3)
    assert len(full) == 5  # 22 samples, drop_last
    full.set_epoch(0)
    epoch0 = collect(full)
    full.set_epoch(1)
    epoch1 = collect(full)
    assert len(epoch1) == 5
    assert not torch.equal(epoch0[0][1], epoch1[0][1])  # another permutation each epoch

    resumed = build_loader(data, batch_size=4, train=True, seed=3)
    resumed.set_epoch(1, start_batch=2)
    assert len(resumed) == 5  # a full epoch, for progress
    assert_same_batches(collect(resumed), epoch1[2:])

    # The same sample is augmented differently in another epoch.
    a, b = by_label(epoch0), by_label(epoch1)
    assert all(not torch.equal(a[k], b[k]) for k in set(a) & set(b))


def test_workers_do_not_change_batches():
    data = Images(transform=augmenting())
    single = build_loader(data, batch_size=4, train=True, seed=5, workers=0)
    multi = build_loader(data, batch_size=4, train=True, seed=5, workers=2)
    for epoch, start in ((0, 0), (2, 3)):
        single.set_epoch(epoch, start)
        multi.set_epoch(epoch, start)
        assert_same_batches(collect(single), collect(multi))


def test_main_process_rng_is_untouched():
    loader = build_loader(Images(transform=augmenting()), batch_size=4, train=True, workers=0)
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    loader.set_epoch(0)
    collect(loader)
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


def test_ddp_train_shards_are_disjoint_and_seeded_by_global_index():
    data = Images(n=16, transform=augmenting())
    single = build_loader(data, batch_size=1, train=True, seed=2, drop_last=False)
    single.set_epoch(4)
    by_index = by_label(collect(single))
    seen = []
    for rank in (0, 1):
        loader = build_loader(data, batch_size=2, train=True, seed=2, world_size=2, rank=rank)
        loader.set_epoch(4)
        for x, y in collect(loader):
            seen += y.tolist()
            for xi, yi in zip(x, y):  # the augmentation of a sample does not depend on the rank
                assert torch.equal(xi, by_index[int(yi)])
    assert sorted(seen) == list(range(16))


def test_eval_shards_cover_the_dataset_once():
    data = Images(n=11)
    shards = []
    for rank in (0, 1):
        loader = build_loader(data, batch_size=4, train=False, world_size=2, rank=rank)
        loader.set_epoch(0)
        labels = [y for _, ys in loader for y in ys.tolist()]
        assert labels == list(range(rank, 11, 2))  # in order, no padding
        assert len(loader) == len(range(rank, 11, 2)) // 4 + 1  # last partial batch kept
        shards += labels
    assert sorted(shards) == list(range(11))


def test_bad_start_batch_and_attribute_forwarding():
    loader = build_loader(Images(), batch_size=4, train=True)
    assert loader.dataset.classes == ["a", "b"] and loader.batch_size == 4
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(0, start_batch=6)


def test_transform_sizes_and_eval_crop():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), np.uint8))
    for auto_augment in (None, "rand-m9-mstd0.5-inc1"):
        train = build_transform(train=True, image_size=24, auto_augment=auto_augment, reprob=0.25)
        assert train(image).shape == (3, 24, 24)
    eval_ = build_transform(train=False, image_size=24, crop_pct=0.875, mean=(0.5,) * 3, std=(0.5,) * 3)
    reference = T.Compose([T.Resize(27), T.CenterCrop(24), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    assert torch.allclose(eval_(image), reference(image), atol=1e-6)  # 27 = floor(24 / 0.875)


def test_color_jitter_zero_is_left_out():
    def has_jitter(transform) -> bool:
        return any(isinstance(t, T.ColorJitter) for t in transform.transforms)

    assert not has_jitter(build_transform(train=True, image_size=8, color_jitter=0.0))
    assert has_jitter(build_transform(train=True, image_size=8, color_jitter=0.4))


def test_build_datasets_synthetic(tmp_path):
    bundle = build_datasets("synthetic", tmp_path / "syn", image_size=8, train_per_class=3, val_per_class=2,
                            synthetic_num_classes=3, eval_transform=T.PILToTensor())
    assert bundle.classes == sorted(SYNTHETIC_CLASSES[:3]) and bundle.num_classes == 3
    assert (len(bundle.train), len(bundle.val)) == (9, 6)
    image, label = bundle.val[5]
    assert image.shape == (3, 8, 8) and label == 2
    subset = build_datasets("synthetic", tmp_path / "syn", image_size=8, train_per_class=3, val_per_class=2,
                            synthetic_num_classes=3, classes=2)
    assert subset.num_classes == 2 and len(subset.train) == 6


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(ValueError, match="synthetic, imagenet"):
        build_datasets("cifar", tmp_path, image_size=8)
