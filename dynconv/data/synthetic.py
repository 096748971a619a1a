"""A small generated image-classification set: shapes and textures, learnable in seconds on a CPU.

Each image is a noisy dark background of a random colour with one class-defining pattern in a random
brighter colour: a shape (circle, square, triangle, cross, ring) at a random position, scale and rotation, or a
texture (horizontal, vertical or diagonal stripes, checkerboard, dots) with a random period and phase.
Every image is drawn from its own seed ``(seed, split, class, index)``, so the set is the same whatever
the order or process that generates it. It is written once as an ImageFolder tree
(``root/train/<class>/*.png``, ``root/val/<class>/*.png``), built in a temporary directory that is
renamed into place with a marker file last, so an interrupted or concurrent generation never leaves a
partial set at ``root``.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Tuple, Union

import numpy as np
from PIL import Image

from .generated import generate_once

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

CLASSES: Tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "stripes_horizontal",
    "stripes_vertical",
    "stripes_diagonal",
    "checkerboard",
    "dots",
)
MARKER = ".dynconv_synthetic.json"
_VERSION = 1
_SPLITS = ("train", "val")


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> Tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


def _shape_mask(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    r = rng.uniform(0.18, 0.32) * size
    cx, cy = rng.uniform(r, size - r, 2)
    u, v = _rotate(xx - cx, yy - cy, rng.uniform(0, 2 * np.pi))
    dist = np.hypot(u, v)
    if name == "circle":
        return dist <= r
    if name == "ring":
        return (dist <= r) & (dist >= 0.55 * r)
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if name == "cross":
        w = 0.3 * r
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    if name == "triangle":  # equilateral: inside the three edges at distance r/2 from the centre
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = np.pi / 2 + 2 * np.pi * k / 3
            inside &= u * np.cos(a) + v * np.sin(a) <= 0.5 * r
        return inside
    raise KeyError(name)


def _texture_mask(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    period = rng.uniform(0.1, 0.22) * size
    jitter = np.deg2rad(rng.uniform(-10, 10))
    base = 0.0
    if name == "stripes_vertical":
        base = np.pi / 2
    elif name == "stripes_diagonal":  # both diagonals, so horizontal flips keep the class
        base = np.pi / 4 if rng.random() < 0.5 else 3 * np.pi / 4
    u, v = _rotate(xx, yy, base + jitter)
    u, v = u + rng.uniform(0, period), v + rng.uniform(0, period)
    if name.startswith("stripes"):
        return np.sin(2 * np.pi * v / period) > 0
    if name == "checkerboard":
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    if name == "dots":
        du, dv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
        return np.hypot(du, dv) <= 0.25 * period
    raise KeyError(name)


def render(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``size x size`` RGB image (uint8) of class ``name``."""
    # Random colours, but the pattern always brighter than the background, so a shape's inside and
    # outside are told apart by contrast, not only by geometry.
    background = rng.uniform(0, 110, 3)
    foreground = rng.uniform(145, 255, 3)
    mask = _texture_mask(name, size, rng) if name.startswith(("stripes", "checker", "dots")) \
        else _shape_mask(name, size, rng)
    image = np.where(mask[..., None], foreground, background)
    image = image + rng.normal(0, rng.uniform(4, 20), image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _params(num_classes: int, train_per_class: int, val_per_class: int, image_size: int, seed: int) -> Dict:
    return dict(version=_VERSION, classes=list(CLASSES[:num_classes]), train_per_class=train_per_class,
                val_per_class=val_per_class, image_size=image_size, seed=seed)


def make_synthetic_dataset(
    root: Union[str, Path],
    num_classes: int = 10,
    train_per_class: int = 300,
    val_per_class: int = 50,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Generate the set at ``root`` (ImageFolder layout, PNG) unless it is already there; returns ``root``.

    Args:
        root: dataset directory; reused when its marker file records the same settings.
        num_classes: the first ``num_classes`` of :data:`CLASSES` (at most 10).
        train_per_class, val_per_class: images per class and split.
        image_size: side in pixels.
        seed: base seed; image ``i`` of class ``c`` in split ``s`` uses seed ``(seed, s, c, i)``.

    Raises:
        ValueError: bad settings, or ``root`` holds something else (another synthetic set included).
    """
    if not 2 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be in 2..{len(CLASSES)}, got {num_classes}")
    if min(train_per_class, val_per_class) < 1 or image_size < 8:
        raise ValueError("need at least one image per class and split, and image_size >= 8")
    params = _params(num_classes, train_per_class, val_per_class, image_size, seed)

    def write(directory: Path) -> None:
        for s, (split, count) in enumerate(zip(_SPLITS, (train_per_class, val_per_class))):
            for c, name in enumerate(params["classes"]):
                folder = directory / split / name
                folder.mkdir(parents=True)
                for i in range(count):
                    rng = np.random.default_rng([seed, s, c, i])
                    Image.fromarray(render(name, image_size, rng)).save(folder / f"{i:05d}.png", compress_level=1)

    return generate_once(root, params, MARKER, "synthetic dataset", write)


def synthetic_transform(train: bool = False) -> Callable:
    """Tensor in ``[-1, 1]``; training adds horizontal flips (every class is closed under them)."""
    from torchvision import transforms as T

    steps = [T.RandomHorizontalFlip()] if train else []
    return T.Compose(steps + [T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


def synthetic_datasets(root: Union[str, Path], **settings) -> Tuple["ImageFolder", "ImageFolder"]:
    """``(train, val)`` torchvision ImageFolder datasets of the set at ``root``, generated first if needed.

    ``settings`` are those of :func:`make_synthetic_dataset`.
    """
    from torchvision.datasets import ImageFolder

    root = make_synthetic_dataset(root, **settings)
    return (ImageFolder(str(root / "train"), transform=synthetic_transform(True)),
            ImageFolder(str(root / "val"), transform=synthetic_transform(False)))
