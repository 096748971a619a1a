"""COCO instance annotations as detection targets for torchvision's Faster/Mask R-CNN.

The expected layout is COCO 2017's: ``<root>/annotations/instances_<split>.json`` with the images of
that split in ``<root>/<split>/`` (https://cocodataset.org/#format-data). Category ids are mapped to
contiguous labels ``1..K`` (0 is the background, as torchvision's detectors want); ``category_ids`` maps
them back for COCO-format results. Training leaves crowd regions out of the targets (mmdetection
ignores them in the loss) and drops images without a usable annotation, as torchvision's detection
reference and mmdetection do; evaluation keeps every image, because COCOeval scores against all of them.
Boxes are clipped to the image, and annotations whose box is malformed or empty are dropped with one
warning naming them. Unreadable images raise or are skipped exactly as
:class:`~dynconv.data.imagenet.ImageFolderDataset` does it.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from .imagenet import CorruptImageError, DatasetError, SkipsUnreadableImages

__all__ = ["LAYOUT", "CocoDetectionDataset", "DetectionData", "coco_datasets", "detection_collate"]

LAYOUT = ("<root>/annotations/instances_<split>.json with the images in <root>/<split>/ "
          "(instances_train2017.json with train2017/, instances_val2017.json with val2017/)")

PathLike = Union[str, os.PathLike]


def _layout_error(message: str, root: PathLike, key: str) -> DatasetError:
    # DatasetError's own path form names the ImageFolder layout; this one names COCO's.
    resolved = Path(root).expanduser().resolve()
    error = DatasetError(f"{key}={resolved}: {message}. Expected the COCO 2017 layout {LAYOUT}.", key=key)
    error.path = root
    return error


def _file_error(message: str, path: Path, key: str) -> DatasetError:
    error = DatasetError(f"{path.resolve()}: {message}", key=key)
    error.path = path
    return error


def _load_coco(path: Path, root: PathLike, key: str) -> COCO:
    """pycocotools' COCO index of ``path``, with its progress prints silenced and bad files named."""
    if not path.is_file():
        raise _layout_error(f"annotation file not found: {path.resolve()}", root, key)
    try:
        with open(path) as f:
            dataset = json.load(f)
    except (OSError, ValueError) as err:
        raise _file_error(f"cannot read the COCO annotation file ({err})", path, key) from err
    for name in ("images", "annotations", "categories"):
        if not isinstance(dataset, dict) or not isinstance(dataset.get(name), list):
            raise _file_error(f"no {name!r} list (not a COCO instances file)", path, key)
    if not dataset["categories"]:
        raise _file_error("the 'categories' list is empty", path, key)
    coco = COCO()
    coco.dataset = dataset
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    except (KeyError, TypeError) as err:
        raise _file_error(f"an image, annotation or category lacks the key {err}", path, key) from err
    return coco


def _clipped_box(bbox: Any, width: float, height: float) -> Optional[Tuple[float, float, float, float]]:
    """The COCO ``[x, y, w, h]`` box as ``(x1, y1, x2, y2)`` clipped to the image, or None if malformed or empty."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    x1, x2 = min(max(x, 0.0), width), min(max(x + w, 0.0), width)
    y1, y2 = min(max(y, 0.0), height), min(max(y + h, 0.0), height)
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def _segmentation_ok(segmentation: Any, width: int, height: int) -> bool:
    """Polygons (each at least 3 points) or an RLE of the image's size, as ``COCO.annToRLE`` reads them."""
    if isinstance(segmentation, dict):
        return "counts" in segmentation and list(segmentation.get("size", ())) == [height, width]
    return (isinstance(segmentation, list) and len(segmentation) > 0
            and all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segmentation))


class CocoDetectionDataset(SkipsUnreadableImages, Dataset):
    """COCO images with torchvision detection targets, one item per kept image.

    Items are ``(image, target)``: ``image`` a float tensor ``[3, H, W]`` in ``[0, 1]`` (RGB), ``target`` a
    dict with ``boxes`` (float32 ``[N, 4]``, ``x1, y1, x2, y2`` in pixels), ``labels`` (int64 ``[N]`` in
    ``1..K``), ``masks`` (uint8 ``[N, H, W]``, with ``with_masks``), ``image_id`` (int), ``area`` (float32
    ``[N]``, COCO's) and ``iscrowd`` (int64 ``[N]``). With ``transforms``, the decoded PIL image and that
    target are passed to ``transforms(image, target)``, which returns the pair (see
    :func:`~dynconv.data.detection_transforms.build_detection_transform`).

    Args:
        root: dataset directory (COCO 2017 layout, see :data:`LAYOUT`).
        split: ``"train2017"``, ``"val2017"`` or any other ``<split>`` of that layout.
        transforms: ``(PIL image, target) -> (tensor image, target)``.
        train: leave out crowd annotations and drop images without a usable annotation.
        with_masks: decode instance masks (polygons and RLE, as pycocotools' ``annToMask``); annotations
            without a valid segmentation are then dropped as malformed.
        on_corrupt, max_bad_fraction: unreadable images raise :class:`CorruptImageError` or, with
            ``"skip"``, are replaced by the next readable image, as in
            :class:`~dynconv.data.imagenet.ImageFolderDataset`.
        key: config key named in error messages.

    Attributes:
        coco: the pycocotools ``COCO`` index of the annotation file.
        ids: the kept image ids, sorted; item ``i`` is image ``ids[i]``.
        classes: category names in label order (label ``l`` is ``classes[l - 1]``).
        category_ids: COCO category id of label ``l`` at ``category_ids[l - 1]`` (sorted ids).
        num_classes: ``K + 1``, the background included.
    """

    def __init__(
        self,
        root: PathLike,
        split: str,
        transforms: Optional[Callable] = None,
        *,
        train: bool,
        with_masks: bool = True,
        on_corrupt: str = "raise",
        max_bad_fraction: float = 0.001,
        key: str = "data.root",
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        self.transforms = transforms
        self.train = train
        self.with_masks = with_masks
        self.ann_file = self.root / "annotations" / f"instances_{split}.json"
        self.image_dir = self.root / split
        if not self.root.is_dir():
            raise _layout_error(f"directory not found: {self.root.resolve()}", self.root, key)
        self.coco = _load_coco(self.ann_file, self.root, key)
        if not self.image_dir.is_dir():
            raise _layout_error(f"image folder not found: {self.image_dir.resolve()}", self.root, key)

        categories = sorted(self.coco.cats.values(), key=lambda c: c["id"])
        self.category_ids: List[int] = [c["id"] for c in categories]
        self.classes: List[str] = [c["name"] for c in categories]
        self.num_classes = len(self.classes) + 1
        self._label = {cat_id: label for label, cat_id in enumerate(self.category_ids, start=1)}
        self.ids, self._objects = self._index(key)
        self._init_policy(on_corrupt, max_bad_fraction, len(self.ids))

    def _index(self, key: str) -> Tuple[List[int], List[List[Tuple[Dict, Tuple[float, float, float, float]]]]]:
        """Kept image ids and, for each, its usable annotations with their clipped boxes."""
        dropped: Dict[str, List[Any]] = defaultdict(list)
        ids, objects = [], []
        for image_id in sorted(self.coco.imgs):
            info = self.coco.imgs[image_id]
            try:
                width, height, _ = int(info["width"]), int(info["height"]), str(info["file_name"])
            except (KeyError, TypeError, ValueError) as err:
                raise _file_error(f"image {image_id} lacks a valid 'width', 'height' or 'file_name' ({err!r})",
                                  self.ann_file, key) from err
            kept = []
            for ann in self.coco.imgToAnns.get(image_id, []):
                if self.train and ann.get("iscrowd", 0):
                    continue
                box = _clipped_box(ann.get("bbox"), width, height)
                if ann.get("category_id") not in self._label:
                    dropped["category_id not in 'categories'"].append(ann["id"])
                elif box is None:
                    dropped["bbox not 4 finite numbers or empty once clipped to the image"].append(ann["id"])
                elif self.with_masks and not _segmentation_ok(ann.get("segmentation"), width, height):
                    dropped["segmentation missing or malformed"].append(ann["id"])
                else:
                    kept.append((ann, box))
            if kept or not self.train:
                ids.append(image_id)
                objects.append(kept)
        if dropped:
            count = sum(len(v) for v in dropped.values())
            details = "; ".join(f"{reason}: ids {v[:20]}{' ...' if len(v) > 20 else ''}"
                                for reason, v in dropped.items())
            warnings.warn(f"{self.ann_file.resolve()}: dropped {count} malformed annotation(s): {details}",
                          stacklevel=3)
        if len(ids) < len(self.coco.imgs):
            print(f"{self.ann_file.resolve()}: left out {len(self.coco.imgs) - len(ids)} of "
                  f"{len(self.coco.imgs)} training images without a usable annotation")
        return ids, objects

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_ratios(self) -> List[float]:
        """Width / height of each kept image, from the annotation file (no image is read)."""
        return [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.ids]

    def _target(self, index: int) -> Dict[str, Any]:
        image_id = self.ids[index]
        objects = self._objects[index]
        anns = [ann for ann, _ in objects]
        boxes = torch.tensor([box for _, box in objects], dtype=torch.float32).reshape(-1, 4)
        target: Dict[str, Any] = {
            "boxes": boxes,
            "labels": torch.tensor([self._label[a["category_id"]] for a in anns], dtype=torch.int64),
        }
        if self.with_masks:
            info = self.coco.imgs[image_id]
            masks = [self.coco.annToMask(a) for a in anns]
            target["masks"] = torch.from_numpy(
                np.stack(masks) if masks else np.zeros((0, info["height"], info["width"]), np.uint8))
        box_areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).tolist()
        target["image_id"] = int(image_id)
        target["area"] = torch.tensor([float(a.get("area", b)) for a, b in zip(anns, box_areas)],
                                      dtype=torch.float32)
        target["iscrowd"] = torch.tensor([int(bool(a.get("iscrowd", 0))) for a in anns], dtype=torch.int64)
        return target

    def _read(self, index: int) -> Image.Image:
        info = self.coco.imgs[self.ids[index]]
        path = str(self.image_dir / info["file_name"])
        image = self.load(path)
        if image.size != (info["width"], info["height"]):
            cause = ValueError(f"the image is {image.width}x{image.height} but {self.ann_file.name} says "
                               f"{info['width']}x{info['height']}")
            raise CorruptImageError(f"{path}: {cause}", path) from cause
        return image

    def __getitem__(self, index: int) -> Tuple[Any, Dict[str, Any]]:
        i, image = self._first_readable(index, self._read, self.image_dir)
        target = self._target(i)
        if self.transforms is not None:
            return self.transforms(image, target)
        return F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True), target


@dataclass
class DetectionData:
    """Train and val detection datasets with their label names and COCO category ids."""

    train: CocoDetectionDataset
    val: CocoDetectionDataset
    classes: List[str]
    num_classes: int
    category_ids: List[int]


def coco_datasets(
    root: PathLike,
    *,
    train_transforms: Optional[Callable] = None,
    eval_transforms: Optional[Callable] = None,
    with_masks: bool = True,
    train_split: str = "train2017",
    val_split: str = "val2017",
    on_corrupt: str = "raise",
    max_bad_fraction: float = 0.001,
    key: str = "data.root",
) -> DetectionData:
    """Train and val :class:`CocoDetectionDataset` of the COCO tree at ``root``.

    Args:
        root: directory holding ``annotations/`` and the split folders (see :data:`LAYOUT`).
        train_transforms, eval_transforms: ``(PIL image, target) -> (tensor image, target)`` per split.
        with_masks: include instance masks in the targets (Mask R-CNN).
        train_split, val_split: split names, i.e. folder names and annotation file suffixes.
        on_corrupt, max_bad_fraction, key: see :class:`CocoDetectionDataset`.

    Raises:
        DatasetError: missing files or folders, malformed annotation files, or splits with different
            categories.
    """
    settings = dict(with_masks=with_masks, on_corrupt=on_corrupt, max_bad_fraction=max_bad_fraction, key=key)
    train = CocoDetectionDataset(root, train_split, train_transforms, train=True, **settings)
    val = CocoDetectionDataset(root, val_split, eval_transforms, train=False, **settings)
    if (train.category_ids, train.classes) != (val.category_ids, val.classes):
        ours = set(zip(train.category_ids, train.classes))
        theirs = set(zip(val.category_ids, val.classes))
        raise _file_error(
            f"{train.ann_file.name} and {val.ann_file.name} have different categories (id, name): only in "
            f"{train_split} {sorted(ours - theirs)[:10]}, only in {val_split} {sorted(theirs - ours)[:10]}",
            train.ann_file.parent, key)
    return DetectionData(train, val, list(train.classes), train.num_classes, list(train.category_ids))


def detection_collate(batch: Sequence[Tuple[Any, Dict[str, Any]]]) -> Tuple[List[Any], List[Dict[str, Any]]]:
    """``(images, targets)`` lists, the input torchvision's detection models take (sizes may differ)."""
    return [image for image, _ in batch], [target for _, target in batch]
