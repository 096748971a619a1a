"""The generated shapes-and-textures set: deterministic, ImageFolder layout, cached, learnable."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dynconv.data import SYNTHETIC_CLASSES, make_synthetic_dataset, synthetic_datasets
from dynconv.data.synthetic import MARKER

SMALL = dict(num_classes=5, train_per_class=4, val_per_class=2, image_size=20)


def files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


def test_layout_counts_and_images(tmp_path):
    root = make_synthetic_dataset(tmp_path / "set", **SMALL)
    assert root == tmp_path / "set"
    for split, count in (("train", 4), ("val", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(SYNTHETIC_CLASSES[:5])
        for name in SYNTHETIC_CLASSES[:5]:
            images = sorted((root / split / name).glob("*.png"))
            assert len(images) == count
            with Image.open(images[0]) as im:
                assert im.mode == "RGB" and im.size == (20, 20)
    assert json.loads((root / MARKER).read_text())["classes"] == list(SYNTHETIC_CLASSES[:5])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp directory left


def test_deterministic_from_the_seed(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", **SMALL)
    b = make_synthetic_dataset(tmp_path / "b", **SMALL)
    c = make_synthetic_dataset(tmp_path / "c", **{**SMALL, "seed": 1})
    assert files(a) == files(b) == files(c)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files(a))
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files(a))


def test_second_call_reuses_the_set_and_refuses_other_settings(tmp_path):
    root = make_synthetic_dataset(tmp_path / "set", **SMALL)
    probe = root / "train" / SYNTHETIC_CLASSES[0] / "00000.png"
    probe.write_bytes(probe.read_bytes())
    stamp = probe.stat().st_mtime_ns  # a regeneration would rewrite the file
    assert make_synthetic_dataset(root, **SMALL) == root
    assert probe.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"other settings .*image_size"):
        make_synthetic_dataset(root, **{**SMALL, "image_size": 24})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a dynconv synthetic dataset"):
        make_synthetic_dataset(tmp_path / "junk", **SMALL)
    assert (tmp_path / "junk" / "x.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_dataset(tmp_path / "other", num_classes=11)


def test_datasets_and_tensors(tmp_path):
    train, val = synthetic_datasets(tmp_path / "set", **SMALL)
    assert (len(train), len(val)) == (20, 10) and train.classes == sorted(SYNTHETIC_CLASSES[:5])
    x, y = val[0]
    assert x.shape == (3, 20, 20) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert isinstance(y, int)


def test_a_tiny_cnn_learns_it_quickly(tmp_path):
    """8 classes (chance 12.5%): a 3-layer CNN trained for a few seconds is far above chance."""
    train, val = synthetic_datasets(tmp_path / "set", num_classes=8, train_per_class=48, val_per_class=16,
                                    image_size=32)
    xs = torch.stack([train[i][0] for i in range(len(train))])
    ys = torch.tensor(train.targets)
    xv = torch.stack([val[i][0] for i in range(len(val))])
    yv = torch.tensor(val.targets)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        for idx in torch.randperm(len(xs), generator=generator).split(32):
            loss = nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(xv).argmax(1) == yv).float().mean().item()
    assert accuracy > 0.5, accuracy  # chance is 0.125; about 0.8 with these settings
    assert np.isfinite(loss.item())
