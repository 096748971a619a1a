"""Detection transforms: boxes and masks move with the image; dropped boxes take their entries along."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from dynconv.data import CocoDetectionDataset, build_detection_transform, make_synthetic_coco


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """``(PIL image, target)`` pairs of a tiny synthetic set, untransformed."""
    root = make_synthetic_coco(tmp_path_factory.mktemp("coco") / "set", train_images=12, val_images=2,
                               image_size=96)
    data = CocoDetectionDataset(root, "train2017", lambda image, target: (image, target), train=True)
    return [data[i] for i in range(len(data))]


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def mask_extents(masks: torch.Tensor) -> torch.Tensor:
    rows = []
    for m in masks.bool():
        ys, xs = torch.nonzero(m, as_tuple=True)
        rows.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [float("nan")] * 4)
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def test_flipping_twice_is_the_identity(samples):
    flip = build_detection_transform(True, hflip=1.0)
    for image, target in samples[:4]:
        once_image, once = flip(image, target)
        width = image.width
        assert torch.allclose(once_image, to_tensor(image).flip(-1), atol=1e-6)
        x1, y1, x2, y2 = target["boxes"].unbind(1)
        expected = torch.stack([width - x2, y1, width - x1, y2], dim=1)
        assert torch.allclose(once["boxes"], expected)
        assert torch.equal(once["masks"], target["masks"].flip(-1))
        twice_image, twice = flip(once_image, once)
        assert torch.allclose(twice_image, to_tensor(image), atol=1e-6)
        assert torch.equal(twice["boxes"], target["boxes"]) and torch.equal(twice["masks"], target["masks"])
        assert torch.equal(twice["labels"], target["labels"]) and twice["image_id"] == target["image_id"]


def test_boxes_and_masks_follow_the_image_through_flip_resize_and_crop(samples):
    augment = build_detection_transform(True, hflip=0.5, crop_prob=1.0, crop_resize=(80, 96, 112),
                                        crop_size=(40, 80), max_size=200)
    dropped = 0
    sizes = set()
    for seed in range(6):
        torch.manual_seed(seed)
        for image, target in samples:
            out_image, out = augment(image, target)
            height, width = out_image.shape[1:]
            sizes.add((height, width))
            assert out_image.dtype == torch.float32 and 0 <= out_image.min() and out_image.max() <= 1
            assert 40 <= height <= 80 and 40 <= width <= 80
            assert out["boxes"].dtype == torch.float32 and type(out["boxes"]) is torch.Tensor
            assert out["masks"].dtype == torch.uint8 and out["masks"].shape[1:] == (height, width)
            n = len(out["boxes"])
            assert len(out["labels"]) == len(out["area"]) == len(out["iscrowd"]) == len(out["masks"]) == n
            dropped += len(target["boxes"]) - n
            # Each kept box is one of the input's, with its own label and area.
            pairs = {(int(label), float(area)) for label, area in zip(target["labels"], target["area"])}
            assert {(int(label), float(area)) for label, area in zip(out["labels"], out["area"])} <= pairs
            boxes, extents = out["boxes"], mask_extents(out["masks"])
            assert ((boxes[:, 2:] - boxes[:, :2]) > 0).all()
            assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= width).all() and (boxes[:, [1, 3]] <= height).all()
            # boxes are clipped, not recomputed (mmdet 2.x RandomCrop): each cropped mask lies inside its box
            seen = ~extents.isnan().any(dim=1)
            assert (extents[seen, :2] >= boxes[seen, :2] - 1.0).all()
            assert (extents[seen, 2:] <= boxes[seen, 2:] + 1.0).all()
    assert dropped > 0 and len(sizes) > 5  # boxes were cropped away; crop sizes vary


def test_same_seed_same_output(samples):
    augment = build_detection_transform(True, hflip=0.5, crop_prob=0.5, crop_resize=(80, 96), crop_size=(40, 80))
    image, target = samples[0]
    torch.manual_seed(3)
    a = augment(image, target)
    torch.manual_seed(3)
    b = augment(image, target)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in ("boxes", "masks", "labels"))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("with_masks", [True, False])
def test_zero_boxes_and_no_masks(train, with_masks):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8))
    target = dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64), image_id=4,
                  area=torch.zeros(0), iscrowd=torch.zeros(0, dtype=torch.int64))
    if with_masks:
        target["masks"] = torch.zeros(0, 50, 70, dtype=torch.uint8)
    transform = build_detection_transform(train, hflip=0.5, crop_prob=1.0, crop_resize=(40,), crop_size=(20, 30))
    out_image, out = transform(image, target)
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,) and out["image_id"] == 4
    assert ("masks" in out) == with_masks
    if with_masks:
        assert out["masks"].shape == (0, *out_image.shape[1:])
    if train:
        assert 20 <= out_image.shape[1] <= 30 and 20 <= out_image.shape[2] <= 30
    else:
        assert torch.allclose(out_image, to_tensor(image), atol=1e-6)


def test_eval_only_converts(samples):
    image, target = samples[0]
    out_image, out = build_detection_transform(False)(image, target)
    assert torch.equal(out_image, F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True))
    assert all(torch.equal(out[k], target[k]) for k in ("boxes", "masks", "labels", "area", "iscrowd"))


def test_bad_settings():
    with pytest.raises(ValueError, match="probabilities"):
        build_detection_transform(True, hflip=1.5)
    with pytest.raises(ValueError, match="min_size <= max_size"):
        build_detection_transform(True, crop_prob=0.5, crop_size=(600, 384))


def test_crop_clips_boxes_and_keeps_those_with_area_as_mmdet():
    """mmdet 2.x ``RandomCrop._crop_data`` (Swin-Transformer-Object-Detection, the codebase of the
    KernelWarehouse configs): boxes shifted by the crop offset, clipped to the window, kept when
    ``x2 > x1 and y2 > y1`` (a sliver under a pixel included), masks of the kept boxes cropped; no
    recomputation from the masks. The image encodes x and y in its channels, so the crop offset is read back.
    """
    size = 120
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    image = torch.stack([xs, ys, torch.zeros_like(xs)]).to(torch.uint8)
    boxes = torch.tensor([[5.0, 5.0, 115.0, 115.0], [0.0, 0.0, 30.0, 30.0], [90.0, 90.0, 119.5, 119.5],
                          [40.0, 40.0, 80.0, 80.0]])
    masks = torch.zeros(4, size, size, dtype=torch.uint8)
    masks[0, 5:20, 5:20] = 1  # a non-rectangular object would have a mask far smaller than its box
    masks[1, 0:30, 0:30] = 1
    masks[2, 90:119, 90:119] = 1
    masks[3, 40:80, 40:80] = 1
    target = dict(boxes=boxes, masks=masks, labels=torch.tensor([1, 2, 3, 4]), area=torch.tensor([1.0, 2, 3, 4]),
                  iscrowd=torch.zeros(4, dtype=torch.int64), image_id=7)
    # crop_resize = the image's own side: the resize before the crop keeps the image as it is
    augment = build_detection_transform(True, hflip=0.0, crop_prob=1.0, crop_resize=(size,), crop_size=(30, 60))
    kept_counts = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out_image, out = augment(image, target)
        pixels = (out_image[:2] * 255).round().long()
        left, top = int(pixels[0, 0, 0]), int(pixels[1, 0, 0])
        height, width = out_image.shape[1:]
        assert torch.equal(pixels[0, 0], torch.arange(left, left + width))  # a plain crop, no resampling
        expected = boxes - torch.tensor([left, top, left, top], dtype=torch.float32)
        expected[:, 0::2] = expected[:, 0::2].clamp(0, width)
        expected[:, 1::2] = expected[:, 1::2].clamp(0, height)
        keep = (expected[:, 2] > expected[:, 0]) & (expected[:, 3] > expected[:, 1])
        assert torch.equal(out["boxes"], expected[keep])
        assert torch.equal(out["labels"], target["labels"][keep]) and torch.equal(out["area"], target["area"][keep])
        assert torch.equal(out["masks"], masks[keep][:, top:top + height, left:left + width])
        kept_counts.add(int(keep.sum()))
    assert len(kept_counts) > 1  # some crops dropped boxes, some kept them


def test_remove_empty_boxes_keeps_slivers_that_sanitize_would_drop():
    from torchvision import tv_tensors

    from dynconv.data.detection_transforms import RemoveEmptyBoxes

    boxes = tv_tensors.BoundingBoxes(torch.tensor([[0.0, 0.0, 0.5, 10.0], [3.0, 3.0, 3.0, 9.0], [1.0, 2.0, 5.0, 2.0]]),
                                     format="XYXY", canvas_size=(20, 20))
    target = dict(boxes=boxes, labels=torch.tensor([1, 2, 3]), masks=tv_tensors.Mask(torch.zeros(3, 20, 20)))
    image = torch.zeros(3, 20, 20)
    _, out = RemoveEmptyBoxes()(image, target)
    assert out["boxes"].tolist() == [[0.0, 0.0, 0.5, 10.0]] and out["labels"].tolist() == [1]
    assert out["masks"].shape == (1, 20, 20)
