"""ImageNet-style ImageFolder datasets with up-front layout checks and explicit corrupt-image handling.

The expected layout is ``<root>/train/<class>/*.JPEG`` and ``<root>/val/<class>/*.JPEG`` (any of
torchvision's image extensions). Layout problems raise :class:`DatasetError` naming the config key, the
resolved path and that layout; so does a symlink that would read a folder twice or under another class's
label (a loop, a second link to one folder, a link into another class). Every image is fully decoded
inside the error handler: PIL decodes lazily, so a truncated JPEG opens fine and only fails at
``load()``. High-bit-depth greyscale images are scaled to 8 bits, not clipped (:func:`to_rgb`).
Unreadable images (a decompression bomb included) either raise (default) or, with
``on_corrupt="skip"``, are replaced by the next readable sample, logged and counted across DataLoader
workers, up to ``max_bad_fraction`` of the dataset.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

__all__ = ["DatasetError", "CorruptImageError", "ImageFolderDataset", "imagenet_datasets", "find_classes", "to_rgb"]

_logger = logging.getLogger("dynconv.data")

LAYOUT = "<root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG"
ON_CORRUPT = ("raise", "skip")
# What PIL raises for unreadable files: OSError (truncated, unidentified, missing), SyntaxError and
# ValueError from some format parsers, EOFError from short reads, and DecompressionBombError (an Exception
# of its own) when a header declares more than 2 * Image.MAX_IMAGE_PIXELS pixels.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
# Integer modes whose ``convert("RGB")`` clips every value above 255 (a 16-bit grey PNG turns ~99% white).
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

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


def _bit_depth(img: Image.Image) -> Optional[int]:
    """Bits per sample of a high-bit-depth greyscale image, or None when the file does not say."""
    if img.mode.startswith("I;16"):
        return 16
    if img.format in ("PNG", "PPM"):  # PIL opens 16-bit PNG / PGM greyscale as "I", scaled to 0..65535
        return 16
    if img.format == "TIFF":
        bits = set(getattr(img, "tag_v2", {}).get(258, ()))  # BitsPerSample
        return bits.pop() if len(bits) == 1 else None
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB, keeping the brightness of high-bit-depth greyscale images.

    PIL's ``convert("RGB")`` clips ``I;16`` / ``I`` pixels at 255 instead of scaling them. They are
    reduced to their top 8 bits, as PIL itself reduces 16-bit RGB PNGs and libpng's ``png_set_strip_16``
    does, so an 8-bit image stored at 16 bits (``v * 257``) comes back exactly. ``F`` (float) images and
    integer images of unknown bit depth raise ValueError rather than be guessed at.
    """
    if img.mode in _HIGH_DEPTH_MODES:
        bits = _bit_depth(img)
        if bits is None or not 8 <= bits <= 32:
            raise ValueError(f"{img.format} image of mode {img.mode} with unknown bit depth; convert it to 8-bit")
        values = np.asarray(img).astype(np.int64).clip(0, 2**bits - 1)
        return Image.fromarray((values >> (bits - 8)).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        raise ValueError("floating-point (mode F) image, whose value range is not known; convert it to 8-bit")
    return img.convert("RGB")


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


def _walk_images(folder: Path, claimed: Dict[str, str], class_folders: Dict[str, str], directory: Path,
                 key: str) -> List[str]:
    """Image paths under ``folder``, following symlinks as torchvision does, in the order of its
    ``make_dataset`` (sorted directories, sorted files).

    A directory reached twice would be read twice, and a link into another class folder relabels that
    class's images: ``os.walk(followlinks=True)`` follows a link back to an ancestor until the path is too
    long (12 images became 492 with one such link). So every directory is resolved before it is entered
    and one that leads to an ancestor, to a directory already read, or into another class's folder
    raises :class:`DatasetError` naming the link.

    Args:
        claimed: real directory -> the path it was first reached by (shared by the split's classes).
        class_folders: real path of every class folder of the split -> its class name.
    """
    top = os.path.realpath(folder)
    listed: List[Tuple[str, List[str]]] = []
    for dirpath, dirnames, files in os.walk(folder, followlinks=True):
        dirnames.sort()  # the same link is named whatever order the file system lists them in
        for name in dirnames:
            path = os.path.join(dirpath, name)
            real = os.path.realpath(path)
            if real == top or top.startswith(real.rstrip(os.sep) + os.sep):
                problem = f"leads back to {real}, which holds the class folder {folder} itself (a symlink loop)"
            elif real in claimed:
                problem = f"leads to {real}, already read as {claimed[real]}"
            else:
                owner = next((c for r, c in class_folders.items()
                              if r != top and (real == r or real.startswith(r + os.sep))), None)
                problem = None if owner is None else f"leads to {real}, inside the folder of class {owner!r}"
            if problem is not None:
                raise DatasetError(f"{path} {problem}: its images would be read again or under another class's "
                                   f"label; remove or fix the link", directory, key)
            claimed[real] = path
        listed.append((dirpath, files))
    return [os.path.join(dirpath, f) for dirpath, files in sorted(listed) for f in sorted(files) if _is_image(f)]


def _make_samples(directory: Path, class_to_idx: Dict[str, int], key: str) -> List[Tuple[str, int]]:
    class_folders = {os.path.realpath(directory / name): name for name in find_classes(directory, key)[0]}
    claimed: Dict[str, str] = {}
    samples = []
    for name in sorted(class_to_idx):
        folder = directory / name
        real = os.path.realpath(folder)
        if real in claimed:
            raise DatasetError(f"class folder {folder} leads to {real}, already read as {claimed[real]}: its "
                               f"images would be read twice, under two labels; remove or fix the link",
                               directory, key)
        claimed[real] = str(folder)
        found = _walk_images(folder, claimed, class_folders, directory, key)
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
        """Open and fully decode ``path`` to 8-bit RGB (:func:`to_rgb`); raises :class:`CorruptImageError`
        naming the file if it cannot, a decompression bomb included."""
        try:
            with Image.open(path) as img:
                img.load()
                return to_rgb(img)
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
