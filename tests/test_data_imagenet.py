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


# ------------------------------------------------------------------ symlinks that would read images twice


def _link(path, target) -> None:
    path.symlink_to(target, target_is_directory=True)


def test_a_symlink_loop_is_refused_naming_the_link(tmp_path):
    """ant/loop -> .. (the split): os.walk(followlinks=True) reads train/ant/loop/ant/loop/... until the path is
    too long, every image found there labelled ant."""
    make_tree(tmp_path)
    loop = tmp_path / "train" / "ant" / "loop"
    _link(loop, "..")
    with pytest.raises(DatasetError) as info:
        imagenet_datasets(tmp_path)
    message = str(info.value)
    assert f"{loop} leads back to {(tmp_path / 'train').resolve()}" in message and "symlink loop" in message
    assert message.startswith(f"data.root={(tmp_path / 'train').resolve()}:")
    # a link to the class folder itself, and one to a folder above the dataset, loop too
    loop.unlink()
    _link(loop, ".")
    with pytest.raises(DatasetError, match="symlink loop"):
        ImageFolderDataset(tmp_path / "train")
    loop.unlink()
    _link(loop, tmp_path.parent)
    with pytest.raises(DatasetError, match=f"{loop} leads back to .*symlink loop"):
        ImageFolderDataset(tmp_path / "train")


def test_a_link_into_another_class_or_to_a_folder_read_before_is_refused(tmp_path):
    make_tree(tmp_path)
    train = tmp_path / "train"
    _link(train / "ant" / "more", "../bee")  # bee's images labelled ant
    with pytest.raises(DatasetError, match=r"ant/more leads to .*bee, inside the folder of class 'bee'"):
        ImageFolderDataset(train)
    # ... also when bee itself is not selected
    with pytest.raises(DatasetError, match="inside the folder of class 'bee'"):
        ImageFolderDataset(train, classes=["ant", "cat"])
    (train / "ant" / "more").unlink()
    write_image(tmp_path / "extra" / "0.png", 50)
    _link(train / "ant" / "extra", tmp_path / "extra")
    _link(train / "cat" / "extra", tmp_path / "extra")  # the same images under two labels
    with pytest.raises(DatasetError, match=f"cat/extra leads to {tmp_path.resolve() / 'extra'}, already read as "
                                           f"{train / 'ant' / 'extra'}"):
        ImageFolderDataset(train)
    (train / "cat" / "extra").unlink()
    _link(train / "ant" / "again", "extra")  # twice within one class
    with pytest.raises(DatasetError, match=r"ant/extra leads to .*extra, already read as .*ant/again: "):
        ImageFolderDataset(train)


def test_two_class_folders_linked_to_one_folder_are_refused(tmp_path):
    make_tree(tmp_path, splits=["train"])
    _link(tmp_path / "train" / "dog", "cat")
    with pytest.raises(DatasetError, match=r"class folder .*train/dog leads to .*train/cat, already read as"):
        ImageFolderDataset(tmp_path / "train")


def test_links_to_folders_elsewhere_are_followed_as_torchvision_does(tmp_path):
    """Symlinked class folders and subfolders that point outside the split are ordinary data."""
    from torchvision.datasets import ImageFolder

    make_tree(tmp_path, splits=["train"])
    write_image(tmp_path / "store" / "ants" / "7.png", 77)
    write_image(tmp_path / "store" / "dogs" / "0.png", 88)
    _link(tmp_path / "train" / "ant" / "more", tmp_path / "store" / "ants")
    _link(tmp_path / "train" / "dog", tmp_path / "store" / "dogs")
    ours, theirs = ImageFolderDataset(tmp_path / "train"), ImageFolder(str(tmp_path / "train"))
    assert ours.samples == theirs.samples and len(ours) == 3 * 2 + 2
    assert (str(tmp_path / "train" / "ant" / "more" / "7.png"), 0) in ours.samples


# ------------------------------------------------------------------ high-bit-depth images


def _png(path, samples: np.ndarray, color_type: int, bit_depth: int = 16, size=None) -> None:
    """A PNG written byte by byte (PNG spec, ISO/IEC 15948): PIL cannot write 16-bit RGB. ``size`` overrides
    the width and height the header declares."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = samples.shape[:2] if size is None else size
    dtype = ">u2" if bit_depth == 16 else "u1"
    rows = b"".join(b"\0" + row.astype(dtype).tobytes() for row in samples)  # filter type 0 per row
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def _grey(path) -> np.ndarray:
    train = ImageFolderDataset(path.parent.parent)
    image, _ = train[[p for p, _ in train.samples].index(str(path))]
    assert image.mode == "RGB"
    array = np.asarray(image)
    assert (array == array[..., :1]).all()  # grey stays grey
    return array[..., 0]


def test_a_16_bit_grey_png_keeps_its_brightness(tmp_path):
    """An 8-bit image stored at 16 bits (v * 257, the PNG spec's exact scaling) must come back as itself;
    PIL's convert("RGB") clips the I;16 values at 255 (all but the darkest pixels white)."""
    make_tree(tmp_path, splits=["train"])
    eight = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = tmp_path / "train" / "ant" / "deep.png"
    Image.fromarray(eight.astype(np.uint16) * 257).save(path)
    with Image.open(path) as img:
        assert img.mode == "I;16"
    np.testing.assert_array_equal(_grey(path), eight)
    # any 16-bit value: its top 8 bits, within one step of the exact v * 255 / 65535
    values = np.random.default_rng(0).integers(0, 65536, (8, 8)).astype(np.uint16)
    Image.fromarray(values).save(path)
    got = _grey(path).astype(float)
    assert np.abs(got - values.astype(float) * 255 / 65535).max() <= 1 and got.mean() < 200


def test_16_bit_rgb_pgm_and_tiff(tmp_path):
    make_tree(tmp_path, splits=["train"])
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 65536, (6, 5, 3))
    path = tmp_path / "train" / "bee" / "rgb16.png"
    _png(path, rgb, color_type=2)
    train = ImageFolderDataset(tmp_path / "train")
    image, _ = train[[p for p, _ in train.samples].index(str(path))]
    assert np.abs(np.asarray(image).astype(float) - rgb * 255 / 65535).max() <= 1
    # a 10-bit PGM (maxval 1023 in its header)
    ten = rng.integers(0, 1024, (4, 4))
    pgm = tmp_path / "train" / "bee" / "ten.pgm"
    pgm.write_bytes(b"P5\n4 4\n1023\n" + ten.astype(">u2").tobytes())
    assert np.abs(_grey(pgm) - ten * 255 / 1023).max() <= 1
    # a 16-bit TIFF
    tif = tmp_path / "train" / "bee" / "deep.tif"
    Image.fromarray((ten * 64).astype(np.uint16)).save(tif)
    assert np.abs(_grey(tif) - ten * 64 * 255 / 65535).max() <= 1


def test_a_float_image_is_unreadable_not_guessed(tmp_path):
    make_tree(tmp_path, splits=["train"])
    tif = tmp_path / "train" / "cat" / "0_float.tif"
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tif)
    train = ImageFolderDataset(tmp_path / "train")
    index = [p for p, _ in train.samples].index(str(tif))
    with pytest.raises(CorruptImageError, match=f"cannot decode image {tif}: floating-point"):
        train[index]
    skipping = ImageFolderDataset(tmp_path / "train", on_corrupt="skip", max_bad_fraction=0.5)
    image, label = skipping[index]
    assert (pixel(image), label) == (21, 2) and skipping.bad_files == [str(tif)]  # cat's 1.png stands in


# ------------------------------------------------------------------ decompression bombs


def test_a_decompression_bomb_is_named_and_skippable(tmp_path):
    """A 60-byte PNG whose header declares 100000 x 100000 pixels: PIL raises DecompressionBombError (not an
    OSError) as it opens it, above 2 * Image.MAX_IMAGE_PIXELS."""
    make_tree(tmp_path, splits=["train"], per_class=3)
    bomb = tmp_path / "train" / "bee" / "1_bomb.png"
    _png(bomb, np.zeros((1, 1)), color_type=0, bit_depth=8, size=(100_000, 100_000))
    assert bomb.stat().st_size < 100
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb)
    train = ImageFolderDataset(tmp_path / "train")
    index = [p for p, _ in train.samples].index(str(bomb))
    with pytest.raises(CorruptImageError) as info:
        train[index]
    assert f"cannot decode image {bomb}" in str(info.value) and "decompression bomb" in str(info.value)
    skipping = ImageFolderDataset(tmp_path / "train", on_corrupt="skip", max_bad_fraction=0.2)
    image, label = skipping[index]
    assert (pixel(image), label) == (12, 1) and skipping.bad_files == [str(bomb)]  # bee's 2.png stands in
