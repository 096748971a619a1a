"""ImageFolder datasets: layout errors name data.root and the path; corrupt images raise or are skipped."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import PILToTensor

from dynconv.data import CorruptImageError, DatasetError, ImageFolderDataset, imagenet_datasets

CLASSES = ("ant", "bee", "cat")


def write_image(path, value: int, size: int = 8, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path, fmt)


def write_truncated_jpeg(path) -> None:
    """A noisy JPEG cut in half: PIL opens it (the header is intact) but fails to decode it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path, "JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_tree(root, classes=CLASSES, per_class=2, splits=("train", "val")):
    """Image ``j`` of class ``c`` has the constant pixel value ``10 * c + j``, so a sample names itself."""
    for split in splits:
        for c, name in enumerate(classes):
            for j in range(per_class):
                write_image(root / split / name / f"{j}.png", 10 * c + j)
    return root


def pixel(image) -> int:
    return int(np.asarray(image)[0, 0, 0])


@pytest.mark.parametrize("missing", ["", "train", "val"])
def test_missing_directories_name_the_key_path_and_layout(tmp_path, missing):
    root = tmp_path / "imagenet"
    if missing:
        make_tree(root, splits=[s for s in ("train", "val") if s != missing])
    with pytest.raises(DatasetError) as info:
        imagenet_datasets(root)
    message = str(info.value)
    assert "data.root" in message and str(root.resolve()) in message
    assert str((root / missing).resolve()) in message
    assert "<root>/train/<class>/*.JPEG" in message


def test_custom_key_and_no_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetError, match="data.imagenet_root=.*no class folders"):
        imagenet_datasets(tmp_path, key="data.imagenet_root")


def test_empty_class_folder_is_named(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "train" / "dog").mkdir()
    (tmp_path / "val" / "dog").mkdir()
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=r"train/dog has no images"):
        imagenet_datasets(tmp_path)


def test_samples_match_torchvision_image_folder(tmp_path):
    from torchvision.datasets import ImageFolder

    make_tree(tmp_path)
    write_image(tmp_path / "train" / "bee" / "x.JPEG", 99, fmt="JPEG")  # upper-case extension counts
    ours = ImageFolderDataset(tmp_path / "train")
    theirs = ImageFolder(str(tmp_path / "train"))
    assert ours.classes == theirs.classes and ours.class_to_idx == theirs.class_to_idx
    assert ours.samples == theirs.samples and ours.targets == theirs.targets
    image, label = ours[0]
    assert image.mode == "RGB" and (pixel(image), label) == (0, 0)


def test_class_subsets_renumber_labels(tmp_path):
    make_tree(tmp_path)
    train, val = imagenet_datasets(tmp_path, classes=2)
    assert train.classes == val.classes == ["ant", "bee"]
    assert sorted(set(train.targets)) == [0, 1] and len(train) == 4

    train, val = imagenet_datasets(tmp_path, classes=["cat", "ant"])
    assert train.classes == ["ant", "cat"] and train.class_to_idx == {"ant": 0, "cat": 1}
    # Every cat image (pixel values 20, 21) carries the new label 1.
    assert sorted((pixel(img), y) for img, y in (train[i] for i in range(len(train)))) == \
        [(0, 0), (1, 0), (20, 1), (21, 1)]


@pytest.mark.parametrize("classes, pattern", [(4, "first 4 classes, found 3"), (0, "first 0"),
                                              (["cat", "cow"], r"unknown classes \['cow'\].*'ant'")])
def test_bad_class_selection(tmp_path, classes, pattern):
    make_tree(tmp_path)
    with pytest.raises(DatasetError, match=pattern):
        imagenet_datasets(tmp_path, classes=classes)


def test_train_and_val_with_different_classes(tmp_path):
    make_tree(tmp_path)
    write_image(tmp_path / "val" / "dog" / "0.png", 1)
    with pytest.raises(DatasetError, match=r"only in train \[\], only in val \['dog'\]"):
        imagenet_datasets(tmp_path)


def test_invalid_on_corrupt(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(ValueError, match="'raise', 'skip'"):
        imagenet_datasets(tmp_path, on_corrupt="ignore")


def test_truncated_jpeg_raises_naming_the_file(tmp_path):
    make_tree(tmp_path)
    bad = tmp_path / "train" / "ant" / "1_bad.jpg"
    write_truncated_jpeg(bad)
    with Image.open(bad) as img:
        assert img.size == (64, 64)  # opens: only the full decode fails
    train, _ = imagenet_datasets(tmp_path)
    index = [p for p, _ in train.samples].index(str(bad))
    with pytest.raises(CorruptImageError) as info:
        train[index]
    assert str(bad) in str(info.value) and "data.on_corrupt=skip" in str(info.value)
    assert isinstance(info.value, DatasetError)


def test_skip_returns_next_sample_logs_and_counts(tmp_path, caplog):
    make_tree(tmp_path, per_class=4)
    bad = tmp_path / "train" / "ant" / "1_bad.jpg"
    write_truncated_jpeg(bad)
    train = ImageFolderDataset(tmp_path / "train", on_corrupt="skip", max_bad_fraction=0.0)
    paths = [p for p, _ in train.samples]
    index = paths.index(str(bad))
    with caplog.at_level(logging.WARNING, logger="dynconv.data"):
        image, label = train[index]
    next_path, next_label = train.samples[index + 1]
    assert (pixel(image), label) == (pixel(Image.open(next_path)), next_label)
    assert str(bad) in caplog.text
    assert train.bad_count == 1 and train.bad_files == [str(bad)]
    # The last sample wraps around to the first.
    write_truncated_jpeg(tmp_path / "train" / "cat" / "9_bad.jpg")
    train = ImageFolderDataset(tmp_path / "train", on_corrupt="skip", max_bad_fraction=0.2)
    assert train.samples[-1][0].endswith("9_bad.jpg")
    assert pixel(train[len(train) - 1][0]) == pixel(train[0][0]) == 0


def test_too_many_skips_raise(tmp_path):
    make_tree(tmp_path, per_class=4)
    for name in ("ant", "bee"):
        write_truncated_jpeg(tmp_path / "train" / name / "1_bad.jpg")
    train = ImageFolderDataset(tmp_path / "train", on_corrupt="skip", max_bad_fraction=0.001)
    assert train.max_bad == 1
    bad = [i for i, (p, _) in enumerate(train.samples) if p.endswith("_bad.jpg")]
    train[bad[0]]
    with pytest.raises(CorruptImageError, match=r"skipped 2 unreadable images.*max_bad_fraction=0.001"):
        train[bad[1]]


def test_skips_in_worker_processes_are_counted(tmp_path):
    make_tree(tmp_path, per_class=4)
    for name in ("ant", "cat"):
        write_truncated_jpeg(tmp_path / "train" / name / "1_bad.jpg")
    train = ImageFolderDataset(tmp_path / "train", PILToTensor(), on_corrupt="skip", max_bad_fraction=0.5)
    loader = torch.utils.data.DataLoader(train, batch_size=2, num_workers=2)
    values = torch.cat([x[:, 0, 0, 0] for x, _ in loader]).tolist()
    assert train.bad_count == 2 and train.bad_files == []  # the skips happened in the workers
    # Each bad file was replaced by the next sample in the list.
    expected = [pixel(Image.open(p if not p.endswith("_bad.jpg") else train.samples[i + 1][0]))
                for i, (p, _) in enumerate(train.samples)]
    assert values == expected
    # A second epoch (fresh workers) meets the same files again: they count once, the output is the same.
    assert torch.cat([x[:, 0, 0, 0] for x, _ in loader]).tolist() == expected and train.bad_count == 2
