"""Bad images stop a run with one line naming the file, with DataLoader workers as without them; a
decompression bomb is one more unreadable image, skipped under ``data.on_corrupt=skip``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_imagenet import _png, make_tree, write_truncated_jpeg
from torchvision.transforms import PILToTensor

from cli import ok, run
from dynconv.data import CorruptImageError, ImageFolderDataset
from dynconv.engine.cli import user_message


def _first_error(dataset, workers: int) -> BaseException:
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers)
    with pytest.raises(CorruptImageError) as info:
        list(loader)
    return info.value


def test_an_error_from_a_worker_reads_as_with_workers_0(tmp_path):
    make_tree(tmp_path, per_class=2, splits=["train"])
    bad = tmp_path / "train" / "bee" / "1_bad.jpg"
    write_truncated_jpeg(bad)
    train = ImageFolderDataset(tmp_path / "train", PILToTensor())
    direct = _first_error(train, workers=0)
    wrapped = _first_error(train, workers=2)
    # torch re-raises a worker's exception with the worker's whole traceback as its message
    assert str(wrapped).startswith("Caught CorruptImageError in DataLoader worker process")
    assert len(str(wrapped).splitlines()) > 10
    assert user_message(wrapped) == user_message(direct) == str(direct)
    assert str(bad) in user_message(wrapped) and "\n" not in user_message(wrapped)


def test_user_message_of_a_builtin_error_from_a_worker():
    class Fails(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise ValueError(f"sample {i}: bad value\nsecond line")

    with pytest.raises(ValueError) as info:
        list(torch.utils.data.DataLoader(Fails(), num_workers=1))
    assert user_message(info.value) == "sample 0: bad value\nsecond line"
    assert user_message(ValueError("Caught nothing")) == "Caught nothing"


def _imagenet(root) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("n01", "n02")):
            for i in range(4):
                path = root / split / name / f"{i}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = np.full((20, 20, 3), 60 + 120 * c, np.uint8) + rng.integers(0, 20, (20, 20, 3), np.uint8)
                Image.fromarray(pixels).save(path, "JPEG")


ARGS = ["data=imagenet", "data.image_size=16", "recipe.batch_size=4", "recipe.epochs=1",
        "recipe.scheduler.warmup_epochs=0", "trainer.workers=2", "model=resnet18", "conv=static"]


@pytest.mark.slow
def test_train_py_with_workers_stops_with_one_line_naming_the_image(tmp_path):
    root = tmp_path / "imagenet"
    _imagenet(root)
    bad = root / "train" / "n02" / "2.JPEG"
    write_truncated_jpeg(bad)
    result = run("train.py", ARGS + [f"data.root={root}"], tmp_path / "run", tmp_path / "cache")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"error: cannot decode image {bad}: ") and "data.on_corrupt=skip" in lines[0]


@pytest.mark.slow
def test_train_py_skips_a_decompression_bomb(tmp_path):
    root = tmp_path / "imagenet"
    _imagenet(root)
    bomb = root / "train" / "n01" / "9_bomb.png"
    _png(bomb, np.zeros((1, 1)), color_type=0, bit_depth=8, size=(100_000, 100_000))
    args = ARGS + [f"data.root={root}"]
    result = run("train.py", args, tmp_path / "run", tmp_path / "cache")
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert f"cannot decode image {bomb}: Image size (10000000000 pixels) exceeds limit" in result.stderr
    skipped = ok(run("train.py", args + ["data.on_corrupt=skip", "data.max_bad_fraction=0.2"], tmp_path / "run2",
                     tmp_path / "cache"))
    assert f"Skipped unreadable image {bomb}" in skipped.stdout + skipped.stderr
