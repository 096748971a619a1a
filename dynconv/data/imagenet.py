"""ImageNet-style ImageFolder datasets with up-front layout checks and explicit corrupt-image handling.

The expected layout is ``<root>/train/<class>/*.JPEG`` and ``<root>/val/<class>/*.JPEG`` (any of
torchvision's image extensions). Layout problems raise :class:`DatasetError` naming the config key, the
resolved path and that layout. Every image is fully decoded inside the error handler: PIL decodes
lazily, so a truncated JPEG opens fine and only fails at ``load()``. Unreadable images either raise
(default) or, with ``on_corrupt="skip"``, are replaced by the next readable sample, logged and counted
across DataLoader workers, up to ``max_bad_fraction`` of the dataset.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

__all__ = ["DatasetError", "CorruptImageError", "ImageFolderDataset", "imagenet_datasets", "find_classes"]

_logger = logging.getLogger("dynconv.data")

LAYOUT = "<root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG"
ON_CORRUPT = ("raise", "skip")
# What PIL raises for unreadable files: OSError (truncated, unidentified, missing), SyntaxError and
# ValueError from some format parsers, EOFError from short reads.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)

PathLike = Union[str, os.PathLike]


class DatasetError(ValueError):
    """Bad dataset layout or settings.

    Args:
        message: what is wrong.
        path: the offending path; when given, the message is prefixed with ``key=<resolved path>`` and
            followed by the expected layout.
        key: the config key that set the path.
    """

    def __init__(self, message: str, path: Optional[PathLike] = None, key: str = "data.root") -> None:
        if path is not None:
            resolved = Path(path).expanduser().resolve()
            message = f"{key}={resolved}: {message}. Expected the ImageFolder layout {LAYOUT}."
        super().__init__(message)
        self.path = path
        self.key = key


class CorruptImageError(DatasetError):
    """An image that cannot be fully decoded (the message names the file)."""

    def __init__(self, message: str, path: Optional[PathLike] = None) -> None:
        ValueError.__init__(self, message)
        self.path = path
        self.key = "data.on_corrupt"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def find_classes(directory: PathLike, key: str = "data.root") -> Tuple[List[str], Dict[str, int]]:
    """Sorted class folder names under ``directory`` and their indices (torchvision semantics)."""
    try:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    except OSError as err:
        raise DatasetError(f"cannot list class folders ({err.strerror})", directory, key) from err
    if not classes:
        raise DatasetError(f"no class folders in {directory}", directory, key)
    return classes, {name: i for i, name in enumerate(classes)}


def _make_samples(directory: Path, class_to_idx: Dict[str, int], key: str) -> List[Tuple[str, int]]:
    samples = []
    for name in sorted(class_to_idx):
        folder = directory / name
        found = [
            os.path.join(dirpath, f)
            for dirpath, _, files in sorted(os.walk(folder, followlinks=True))
            for f in sorted(files)
            if _is_image(f)
        ]
        if not found:
            raise DatasetError(f"class folder {folder} has no images (extensions: {', '.join(IMG_EXTENSIONS)})",
                               directory, key)
        samples += [(path, class_to_idx[name]) for path in found]
    return samples


def _select(available: Sequence[str], wanted: Union[int, Sequence[str], None], directory: PathLike,
            key: str) -> List[str]:
    if wanted is None:
        return list(available)
    if isinstance(wanted, int):
        if not 1 <= wanted <= len(available):
            raise DatasetError(f"asked for the first {wanted} classes, found {len(available)}", directory, key)
        return list(available[:wanted])
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise DatasetError(f"unknown classes {unknown[:5]}; valid ones include {list(available[:5])}",
                           directory, key)
    if len(set(wanted)) != len(wanted):
        raise DatasetError("the class list has duplicates", directory, key)
    return sorted(wanted)


class SkipsUnreadableImages:
    """The corrupt-image policy the image datasets share: decode every image fully, and on an unreadable
    one raise (``on_corrupt="raise"``) or skip to the next readable sample, log and count it
    (``"skip"``), raising once more than ``max(1, max_bad_fraction * len(self))`` were skipped.

    Skips are counted in shared memory, inherited by (or pickled into) DataLoader worker processes, so
    skips in any worker count; a flag per sample means a file met again in the next epoch is neither
    decoded nor counted twice. A spawn-context lock can also be shared with forked workers.
    """

    on_corrupt: str
    max_bad_fraction: float

    def _init_policy(self, on_corrupt: str, max_bad_fraction: float, size: int) -> None:
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.on_corrupt, self.max_bad_fraction = on_corrupt, max_bad_fraction
        context = multiprocessing.get_context("spawn")
        self._bad_flags = context.Array("b", size)
        self._bad_count = context.Value("i", 0, lock=False)  # guarded by the flags' lock
        self.bad_files: List[str] = []  # only those skipped in this process

    def __len__(self) -> int:
        return len(self._bad_flags)

    @property
    def bad_count(self) -> int:
        """Distinct images skipped so far, over this process and its DataLoader workers."""
        return self._bad_count.value

    @property
    def max_bad(self) -> int:
        """The most skipped images tolerated before raising."""
        return max(1, int(self.max_bad_fraction * len(self)))

    def load(self, path: str) -> Image.Image:
        """Open and fully decode ``path`` to RGB; raises :class:`CorruptImageError` if it cannot."""
        try:
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB")
        except _DECODE_ERRORS as err:
            raise CorruptImageError(
                f"cannot decode image {path}: {err}. Set data.on_corrupt=skip to skip unreadable images "
                f"(up to data.max_bad_fraction={self.max_bad_fraction} of the set).", path) from err

    def _record_bad(self, index: int, path: str, err: CorruptImageError) -> None:
        with self._bad_flags.get_lock():
            if self._bad_flags[index]:
                return
            self._bad_flags[index] = 1
            self._bad_count.value += 1
            count = self._bad_count.value
        self.bad_files.append(path)
        _logger.warning("Skipped unreadable image %s (%d skipped so far): %s", path, count, err.__cause__)
        if count > self.max_bad:
            raise CorruptImageError(
                f"skipped {count} unreadable images (the last: {path}), more than the allowed "
                f"data.max_bad_fraction={self.max_bad_fraction} of {len(self)} (at most {self.max_bad}); "
                f"check the dataset, e.g. by decoding every image once.", path) from err

    def _first_readable(self, index: int, read: Callable[[int], Any], where: PathLike) -> Tuple[int, Any]:
        """``(i, read(i))`` for the first sample from ``index`` on that ``read`` can decode."""
        for step in range(len(self)):
            i = (index + step) % len(self)
            if self._bad_flags[i]:
                continue
            try:
                return i, read(i)
            except CorruptImageError as err:
                if self.on_corrupt == "raise":
                    raise
                self._record_bad(i, str(err.path), err)
        raise CorruptImageError(f"no readable image in {where}", where)


class ImageFolderDataset(SkipsUnreadableImages, Dataset):
    """``directory/<class>/<image>`` samples as ``(image, label)``, every image fully decoded to RGB.

    Args:
        root: the split directory holding one folder per class.
        transform: applied to the decoded PIL image.
        classes: keep only these class names (labels renumbered 0..n-1 in sorted name order).
        on_corrupt: ``"raise"`` (default) or ``"skip"``: replace an unreadable image by the next
            readable sample, log its path and count it.
        max_bad_fraction: with ``"skip"``, raise once more than ``max(1, max_bad_fraction * len(self))``
            images were skipped (counted over all DataLoader workers).
        key: config key named in error messages.
    """

    def __init__(
        self,
        root: PathLike,
        transform: Optional[Callable] = None,
        classes: Optional[Sequence[str]] = None,
        on_corrupt: str = "raise",
        max_bad_fraction: float = 0.001,
        key: str = "data.root",
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        found, _ = find_classes(self.root, key)
        self.classes = _select(found, classes, self.root, key)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = _make_samples(self.root, self.class_to_idx, key)
        self.targets = [label for _, label in self.samples]
        self._init_policy(on_corrupt, max_bad_fraction, len(self.samples))

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        i, image = self._first_readable(index, lambda i: self.load(self.samples[i][0]), self.root)
        return (self.transform(image) if self.transform is not None else image), self.samples[i][1]


def imagenet_datasets(
    root: PathLike,
    *,
    train_transform: Optional[Callable] = None,
    eval_transform: Optional[Callable] = None,
    classes: Union[int, Sequence[str], None] = None,
    on_corrupt: str = "raise",
    max_bad_fraction: float = 0.001,
    key: str = "data.root",
) -> Tuple[ImageFolderDataset, ImageFolderDataset]:
    """``(train, val)`` datasets of the ImageFolder tree at ``root``, checked before any image is read.

    Args:
        root: directory holding ``train/`` and ``val/``.
        train_transform, eval_transform: applied to the decoded images of each split.
        classes: ``N`` keeps the first N classes (sorted), a list keeps those names; ``None`` keeps all.
        on_corrupt, max_bad_fraction: see :class:`ImageFolderDataset`.
        key: config key named in error messages.

    Raises:
        DatasetError: missing directories, empty class folders, unknown classes, or train and val
            with different classes.
    """
    root = Path(root).expanduser()
    missing = [p for p in (root, root / "train", root / "val") if not p.is_dir()]
    if missing:
        raise DatasetError(f"directory not found: {missing[0].resolve()}", root, key)
    train_classes, _ = find_classes(root / "train", key)
    val_classes, _ = find_classes(root / "val", key)
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DatasetError(f"train and val have different classes: only in train {only_train[:10]}, "
                           f"only in val {only_val[:10]}", root, key)
    chosen = _select(train_classes, classes, root, key)
    settings = dict(classes=chosen, on_corrupt=on_corrupt, max_bad_fraction=max_bad_fraction, key=key)
    return (ImageFolderDataset(root / "train", train_transform, **settings),
            ImageFolderDataset(root / "val", eval_transform, **settings))
