"""Box- and mask-aware training transforms for detection, on ``torchvision.transforms.v2``.

Boxes travel as ``tv_tensors.BoundingBoxes`` (XYXY) and masks as ``tv_tensors.Mask``, so every geometric
op moves them with the image. The training recipe is the one KernelWarehouse and Swin use on COCO
(mmdetection's ``AutoAugment`` with two policies, after DETR, Carion et al., 2020): a horizontal flip,
then either the plain image or, with probability ``crop_prob``, a resize to a random shorter side in
``crop_resize`` followed by a random crop of a random size in ``crop_size``. As mmdet 2.x's ``RandomCrop``
(Swin-Transformer-Object-Detection ``mmdet/datasets/pipelines/transforms.py``, which the KernelWarehouse
configs run), the crop clips each box to the window, keeps the boxes of positive width and height, and
crops the masks of the kept ones; boxes are not recomputed from the masks (mmdet 2.x has no
``recompute_bbox``). The final multi-scale resize (shorter side 480..800, longer side at most 1333) is not
done here: torchvision's ``GeneralizedRCNNTransform`` inside the detector does it when built with a tuple
``min_size``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["RandomSizeCrop", "BoxesFromMasks", "RemoveEmptyBoxes", "DetectionTransform", "build_detection_transform",
           "PER_BOX_KEYS"]

# Target entries with one row per box: dropped together with their box.
PER_BOX_KEYS = ("labels", "area", "iscrowd")


def _randint(low: int, high: int) -> int:
    return int(torch.randint(low, high + 1, ()))


class RandomSizeCrop(v2.Transform):
    """Crop a random window whose height and width are each uniform in ``[min_size, max_size]``.

    Both are clamped to the image, so smaller images are cropped less or not at all. This is DETR's
    ``RandomSizeCrop`` and mmdetection's ``RandomCrop(crop_type="absolute_range")``; boxes are clipped to
    the window (drop the empty ones with :class:`RemoveEmptyBoxes` after it).
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 1 <= min_size <= max_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list) -> Dict[str, int]:
        height, width = v2.query_size(flat_inputs)
        h = _randint(min(self.min_size, height), min(self.max_size, height))
        w = _randint(min(self.min_size, width), min(self.max_size, width))
        return dict(top=_randint(0, height - h), left=_randint(0, width - w), height=h, width=w)

    def transform(self, inpt: Any, params: Dict[str, int]) -> Any:
        return F.crop(inpt, **params)


class BoxesFromMasks(v2.Transform):
    """Replace each box by the tight box (pixel edges) of its instance mask; an empty mask gives an empty box.

    mmdet 3.x's ``RandomCrop(recompute_bbox=True)``; not part of the papers' recipe (mmdet 2.x clips), so
    :func:`build_detection_transform` does not use it. Passes the boxes through when there are no masks,
    or not one per box. Follow it with :class:`RemoveEmptyBoxes` to drop the empty ones.
    """

    def make_params(self, flat_inputs: list) -> Dict[str, Any]:
        masks = [x for x in flat_inputs if isinstance(x, tv_tensors.Mask)]
        return dict(masks=masks[0] if len(masks) == 1 else None)

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        masks = params["masks"]
        if not isinstance(inpt, tv_tensors.BoundingBoxes) or masks is None or masks.ndim != 3 \
                or len(masks) != len(inpt):
            return inpt
        height, width = masks.shape[-2:]
        cols, rows = masks.bool().any(dim=1), masks.bool().any(dim=2)  # [N, W], [N, H]
        # argmax finds the first True; on the flipped axis, the last. All-False rows give 0, an empty box.
        x1 = cols.int().argmax(dim=1)
        x2 = torch.where(cols.any(dim=1), width - cols.flip(1).int().argmax(dim=1), x1)
        y1 = rows.int().argmax(dim=1)
        y2 = torch.where(rows.any(dim=1), height - rows.flip(1).int().argmax(dim=1), y1)
        boxes = torch.stack([x1, y1, x2, y2], dim=1).to(inpt.dtype)
        boxes = F.convert_bounding_box_format(boxes, old_format="XYXY", new_format=inpt.format)
        return tv_tensors.wrap(boxes, like=inpt)


class RemoveEmptyBoxes(v2.Transform):
    """Drop the boxes without area (``x2 <= x1`` or ``y2 <= y1``), with their masks and :data:`PER_BOX_KEYS`.

    mmdet 2.x ``RandomCrop._crop_data`` keeps exactly the boxes with ``x2 > x1`` and ``y2 > y1`` after
    clipping; ``v2.SanitizeBoundingBoxes`` cannot (it needs ``min_size >= 1`` pixel). Takes and returns
    ``(image, target)`` with XYXY ``target["boxes"]``; masks go along when there is one per box.
    """

    def forward(self, *inputs: Any) -> Any:
        image, target = inputs if len(inputs) > 1 else inputs[0]
        boxes = target["boxes"]
        xyxy = F.convert_bounding_box_format(boxes.as_subclass(torch.Tensor), old_format=boxes.format,
                                             new_format=tv_tensors.BoundingBoxFormat.XYXY)
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        target = dict(target)
        target["boxes"] = tv_tensors.wrap(boxes.as_subclass(torch.Tensor)[keep], like=boxes)
        masks = target.get("masks")
        if masks is not None and masks.ndim == 3 and len(masks) == len(keep):
            target["masks"] = tv_tensors.wrap(masks.as_subclass(torch.Tensor)[keep], like=masks)
        for key in PER_BOX_KEYS:
            if key in target and len(target[key]) == len(keep):
                target[key] = target[key][keep]
        return image, target


class DetectionTransform:
    """``(image, target) -> (image, target)`` around a v2 pipeline.

    The image (PIL or uint8/float tensor) leaves as a float tensor in ``[0, 1]``. ``target["boxes"]``
    (XYXY pixels) and, when present, ``target["masks"]`` follow the geometry; boxes dropped by the
    pipeline take their :data:`PER_BOX_KEYS` entries and masks with them. They leave as plain tensors
    (float32 boxes, uint8 masks, int64 labels); other entries, e.g. ``image_id``, pass through.
    ``area`` keeps COCO's value: the detectors ignore it and COCOeval reads the annotation file.

    Args:
        pipeline: v2 transform called as ``pipeline(image, target)``; None for conversion only.
    """

    def __init__(self, pipeline: Optional[Callable] = None) -> None:
        self.pipeline = pipeline

    def __call__(self, image: Any, target: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        target = dict(target)
        height, width = F.get_size(image)
        image = F.to_image(image)
        target["boxes"] = tv_tensors.BoundingBoxes(torch.as_tensor(target["boxes"], dtype=torch.float32)
                                                   .reshape(-1, 4), format="XYXY", canvas_size=(height, width))
        if "masks" in target:
            target["masks"] = tv_tensors.Mask(torch.as_tensor(target["masks"], dtype=torch.uint8))
        if self.pipeline is not None:
            image, target = self.pipeline(image, target)
        target["boxes"] = target["boxes"].as_subclass(torch.Tensor)
        if "masks" in target:
            target["masks"] = target["masks"].as_subclass(torch.Tensor)
        if "labels" in target:
            target["labels"] = torch.as_tensor(target["labels"], dtype=torch.int64)
        return F.to_dtype(image, torch.float32, scale=True).as_subclass(torch.Tensor), target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline!r})"


def build_detection_transform(
    train: bool,
    *,
    hflip: float = 0.5,
    crop_prob: float = 0.0,
    crop_resize: Sequence[int] = (400, 500, 600),
    crop_size: Tuple[int, int] = (384, 600),
    max_size: int = 1333,
) -> DetectionTransform:
    """The detection data augmentation for training, or the tensor conversion for evaluation.

    Args:
        train: augment; otherwise only convert the image to a float tensor.
        hflip: probability of a horizontal flip.
        crop_prob: probability of the resize-and-crop branch (0.5 in KernelWarehouse's and Swin's
            multi-scale crop recipe, whose other branch is the detector's own multi-scale resize).
        crop_resize: shorter sides to choose from before cropping, the longer side capped at ``max_size``.
        crop_size: ``(min, max)`` of the crop height and width, each drawn uniformly.
        max_size: cap on the longer side of that resize.

    The detector's ``GeneralizedRCNNTransform`` (``min_size=(480, 512, ..., 800), max_size=1333``) then
    resizes every image, and normalises it.
    """
    if not train:
        return DetectionTransform()
    if not (0.0 <= hflip <= 1.0 and 0.0 <= crop_prob <= 1.0):
        raise ValueError(f"hflip and crop_prob are probabilities, got {hflip} and {crop_prob}")
    if not crop_resize:
        raise ValueError("crop_resize needs at least one shorter side")
    steps = []
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if crop_prob > 0:
        crop = v2.Compose([
            v2.RandomShortestSize(list(crop_resize), max_size=max_size),
            RandomSizeCrop(*crop_size),
            RemoveEmptyBoxes(),
        ])
        steps.append(v2.RandomApply([crop], p=crop_prob))
    return DetectionTransform(v2.Compose(steps) if steps else None)
