"""A small generated instance-segmentation set in the COCO 2017 layout, for the detection demo and tests.

Each image is a textured, noisy background with 1 to 5 non-overlapping shapes (circle, square,
triangle, diamond, star), each a flat colour of its own, so the class is told by the shape and not
by the colour. Sizes span COCO's small (area < 32^2), medium and large (>= 96^2, where the image
allows it), and image sides vary in aspect ratio around ``image_size`` so that aspect-ratio grouping
has something to do. A few training images hold no object at all.

Annotations follow the COCO format (Lin et al., 2014, https://cocodataset.org/#format-data):
category ids are non-contiguous (1, 3, 7, 10, 13) as in COCO, so consumers must map them;
segmentations are polygons; ``area`` is the area of the polygon's mask as pycocotools rasterises it
and ``bbox`` is that mask's tight box (``maskUtils.toBbox``). The image is painted through the same
pycocotools mask, so pixels and ground truth agree exactly (PIL's polygon fill differs from
pycocotools' on about 4% of the pixels, all on the boundary). Each annotation also carries the
instance's ``color`` (RGB), an extra key that COCO tools ignore.

Every image is drawn from its own seed ``(seed, split, index)``. The set is built in a temporary
directory renamed into place with a marker file written last, so an interrupted or concurrent
generation never leaves a partial set at ``root``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .generated import generate_once

__all__ = ["CATEGORIES", "MARKER", "SPLITS", "make_synthetic_coco"]

CATEGORIES: Tuple[Dict[str, object], ...] = (
    {"id": 1, "name": "circle", "supercategory": "curved"},
    {"id": 3, "name": "square", "supercategory": "polygon"},
    {"id": 7, "name": "triangle", "supercategory": "polygon"},
    {"id": 10, "name": "diamond", "supercategory": "polygon"},
    {"id": 13, "name": "star", "supercategory": "polygon"},
)
MARKER = ".dynconv_synthetic_coco.json"
SPLITS = ("train2017", "val2017")
_VERSION = 1
# Width / height of the generated images; the square ones keep the ratio exactly 1.
_ASPECTS = (3 / 5, 3 / 4, 1.0, 4 / 3, 5 / 3)
# Mask area over squared circumradius, to size a shape for a wanted area.
_AREA_FACTOR = {"circle": math.pi, "square": 2.0, "triangle": 3 * math.sqrt(3) / 4, "diamond": 1.2,
                "star": 5 * 0.5 * math.sin(math.pi / 5)}
# COCO's size classes (small < 32^2 <= medium < 96^2 <= large) and how often each is wanted. Shapes that
# do not fit shrink, so at image_size=128 about 2/3 end up small, 1/3 medium and 2% large.
_SIZE_CLASSES = ((0.3, 40.0, 32.0 ** 2), (0.4, 32.0 ** 2, 96.0 ** 2), (0.3, 96.0 ** 2, math.inf))
_MIN_RADIUS = 4.0
_GAP = 2.0  # pixels between the circumcircles of two shapes, so their masks never touch
_JPEG = dict(quality=95, subsampling=0)  # 4:4:4: no chroma bleeding into small shapes


def _polygon(name: str, cx: float, cy: float, radius: float, angle: float) -> List[float]:
    """Vertices ``[x1, y1, x2, y2, ...]`` (2 decimals) of shape ``name``, all within ``radius`` of the centre."""
    if name == "circle":
        n = int(np.clip(math.ceil(math.pi * radius), 16, 64))  # edges ~2 px: < 0.1 px from the true circle
        angles = angle + np.arange(n) * 2 * math.pi / n
        radii = np.full(n, radius)
    elif name == "square":
        angles = angle + math.pi / 4 + np.arange(4) * math.pi / 2
        radii = np.full(4, radius)
    elif name == "triangle":
        angles = angle - math.pi / 2 + np.arange(3) * 2 * math.pi / 3
        radii = np.full(3, radius)
    elif name == "diamond":  # a rhombus, half-diagonals 1 and 0.6 (its area factor is 2 * 0.6)
        angles = angle + np.arange(4) * math.pi / 2 - math.pi / 2
        radii = radius * np.array([1.0, 0.6, 1.0, 0.6])
    elif name == "star":  # five points, inner radius 0.5 (area factor 5 sin 36 deg / 2)
        angles = angle - math.pi / 2 + np.arange(10) * math.pi / 5
        radii = radius * np.tile([1.0, 0.5], 5)
    else:
        raise KeyError(name)
    points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    return [round(float(v), 2) for v in points.ravel()]


def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A dark base colour with a few low-frequency waves and per-pixel noise (float, HxWx3)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.broadcast_to(rng.uniform(0, 100, 3), (height, width, 3)).copy()
    for _ in range(3):
        theta, period = rng.uniform(0, math.pi), rng.uniform(0.3, 1.0) * max(height, width)
        wave = np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period + rng.uniform(0, 6.3))
        image += wave[..., None] * rng.uniform(-15, 15, 3)
    return image + rng.normal(0, 8, image.shape)


def _colours(count: int, rng: np.random.Generator) -> List[np.ndarray]:
    """Bright colours, each the farthest (RGB distance) of 16 candidates from those already chosen."""
    chosen: List[np.ndarray] = []
    for _ in range(count):
        candidates = rng.uniform(130, 255, (16, 3))
        candidates[np.arange(16), rng.integers(3, size=16)] = rng.uniform(0, 255, 16)  # widens the hues
        if chosen:
            distance = np.linalg.norm(candidates[:, None] - np.array(chosen)[None], axis=2).min(axis=1)
            candidates = candidates[np.argsort(-distance, kind="stable")]
        chosen.append(candidates[0])
    return chosen


def _place(size: Tuple[int, int], placed: List[Tuple[float, float, float]], radius: float,
           rng: np.random.Generator) -> Optional[Tuple[float, float, float]]:
    """A centre and radius for a new shape that keeps off the border and the shapes already placed."""
    height, width = size
    while radius >= _MIN_RADIUS:
        for _ in range(30):
            cx = rng.uniform(radius + 1, width - radius - 1)
            cy = rng.uniform(radius + 1, height - radius - 1)
            if all(math.hypot(cx - x, cy - y) >= radius + r + _GAP for x, y, r in placed):
                return cx, cy, radius
        radius *= 0.85
    return None


def _image(size: Tuple[int, int], count: int, rng: np.random.Generator) -> Tuple[np.ndarray, List[Dict]]:
    """One image (uint8 HxWx3) with ``count`` shapes (fewer if they do not fit) and their annotations."""
    height, width = size
    image = _background(height, width, rng)
    max_radius = 0.5 * min(height, width) - 1
    wanted = []
    for _ in range(count):
        category = CATEGORIES[rng.integers(len(CATEGORIES))]
        factor = _AREA_FACTOR[str(category["name"])]
        _, low, high = _SIZE_CLASSES[rng.choice(len(_SIZE_CLASSES), p=[w for w, _, _ in _SIZE_CLASSES])]
        high = min(high, factor * max_radius ** 2)
        area = math.exp(rng.uniform(math.log(low), math.log(max(low, high))))
        wanted.append((float(np.clip(math.sqrt(area / factor), _MIN_RADIUS, max_radius)), category))
    # Largest first: small shapes fit between big ones, the reverse order would shrink the big ones.
    wanted.sort(key=lambda item: -item[0])
    placed: List[Tuple[float, float, float]] = []
    objects = []
    for (radius, category), colour in zip(wanted, _colours(count, rng)):
        spot = _place(size, placed, radius, rng)
        if spot is None:
            continue
        placed.append(spot)
        cx, cy, radius = spot
        polygon = _polygon(str(category["name"]), cx, cy, radius, rng.uniform(-math.pi / 9, math.pi / 9))
        rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
        mask = mask_utils.decode(rle).astype(bool)
        image[mask] = colour + rng.normal(0, 3, (int(mask.sum()), 3))
        objects.append(dict(category_id=int(category["id"]), segmentation=[polygon],
                            area=float(mask_utils.area(rle)),
                            bbox=[float(v) for v in mask_utils.toBbox(rle)],
                            iscrowd=0, color=[int(round(c)) for c in colour]))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), objects


def _size(image_size: int, rng: np.random.Generator) -> Tuple[int, int]:
    aspect = _ASPECTS[rng.integers(len(_ASPECTS))]
    return round(image_size / math.sqrt(aspect)), round(image_size * math.sqrt(aspect))


def _empty_indices(train_images: int) -> set:
    """A couple of object-free training images (2, or 2% of a larger set), spread over the split."""
    count = min(max(2, train_images // 50), train_images // 2)
    return {int((k + 0.5) * train_images / count) for k in range(count)}


def _split(folder: Path, split_index: int, count: int, image_size: int, seed: int, next_ann_id: int,
           empty: set) -> Tuple[Dict, int]:
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, split_index, i])
        image_id = split_index * 1_000_000 + i + 1  # disjoint over splits, as in COCO
        height, width = _size(image_size, rng)
        pixels, objects = _image((height, width), 0 if i in empty else int(rng.integers(1, 6)), rng)
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(pixels).save(folder / file_name, "JPEG", **_JPEG)
        images.append(dict(id=image_id, file_name=file_name, width=width, height=height, license=1))
        for obj in objects:
            annotations.append(dict(id=next_ann_id, image_id=image_id, **obj))
            next_ann_id += 1
    return dict(images=images, annotations=annotations), next_ann_id


def _params(train_images: int, val_images: int, image_size: int, seed: int) -> Dict:
    return dict(version=_VERSION, train_images=train_images, val_images=val_images, image_size=image_size,
                seed=seed)


def make_synthetic_coco(
    root: Union[str, Path],
    *,
    train_images: int = 200,
    val_images: int = 50,
    image_size: int = 128,
    seed: int = 0,
) -> Path:
    """Generate the set at ``root`` unless it is already there; returns ``root``.

    Writes ``root/annotations/instances_{train,val}2017.json`` and ``root/{train,val}2017/*.jpg``.

    Args:
        root: dataset directory; reused when its marker file records the same settings.
        train_images, val_images: images per split.
        image_size: the geometric mean of each image's width and height (aspect ratios 3:5 to 5:3).
        seed: base seed; image ``i`` of split ``s`` uses seed ``(seed, s, i)``.

    Raises:
        ValueError: bad settings, or ``root`` holds something else (another synthetic set included).
    """
    if min(train_images, val_images) < 1 or image_size < 32:
        raise ValueError(f"need at least one image per split and image_size >= 32, got train_images="
                         f"{train_images}, val_images={val_images}, image_size={image_size}")
    params = _params(train_images, val_images, image_size, seed)

    def write(directory: Path) -> None:
        (directory / "annotations").mkdir()
        next_ann_id = 1
        for s, (split, count) in enumerate(zip(SPLITS, (train_images, val_images))):
            (directory / split).mkdir()
            empty = _empty_indices(count) if s == 0 else set()
            content, next_ann_id = _split(directory / split, s, count, image_size, seed, next_ann_id, empty)
            dataset = dict(
                info=dict(description=f"dynconv synthetic shapes, COCO 2017 layout (seed {seed})",
                          url="", version=str(_VERSION), year=2017, contributor="dynconv", date_created=""),
                licenses=[dict(id=1, name="CC0 1.0", url="https://creativecommons.org/publicdomain/zero/1.0/")],
                categories=[dict(c) for c in CATEGORIES],
                **content,
            )
            (directory / "annotations" / f"instances_{split}.json").write_text(json.dumps(dataset))

    return generate_once(root, params, MARKER, "synthetic COCO set", write)
