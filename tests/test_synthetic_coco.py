"""The generated COCO-layout shapes set: valid COCO, masks match an independent rasteriser and the pixels."""
from __future__ import annotations

import json
import multiprocessing

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from dynconv.data import SYNTHETIC_COCO_CATEGORIES, make_synthetic_coco
from dynconv.data.synthetic_coco import MARKER

SMALL = dict(train_images=12, val_images=6, image_size=96)
SPLITS = ("train2017", "val2017")


def load(root, split) -> COCO:
    return COCO(str(root / "annotations" / f"instances_{split}.json"))


def pixel_centre_raster(polygon, height, width) -> np.ndarray:
    """Pixels whose centre is inside the polygon (even-odd rule), independent of pycocotools."""
    xs, ys = np.asarray(polygon[0::2]), np.asarray(polygon[1::2])
    py, px = np.mgrid[0:height, 0:width] + 0.5
    inside = np.zeros((height, width), bool)
    for (x1, y1), (x2, y2) in zip(zip(xs, ys), zip(np.roll(xs, -1), np.roll(ys, -1))):
        crosses = (y1 > py) != (y2 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < x_at)
    return inside


def boundary_distance(polygon, height, width) -> np.ndarray:
    """Distance of every pixel centre to the polygon's edges."""
    points = np.asarray(polygon).reshape(-1, 2)
    py, px = np.mgrid[0:height, 0:width] + 0.5
    distance = np.full((height, width), np.inf)
    for a, b in zip(points, np.roll(points, -1, axis=0)):
        v = b - a
        t = np.clip(((px - a[0]) * v[0] + (py - a[1]) * v[1]) / (v @ v), 0, 1)
        distance = np.minimum(distance, np.hypot(px - a[0] - t * v[0], py - a[1] - t * v[1]))
    return distance


def extent(mask: np.ndarray):
    """``[x, y, w, h]`` of the pixels set in ``mask``, in COCO's pixel-edge convention."""
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]


def eroded(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("coco") / "set", **SMALL)


def test_layout_and_coco_fields(small_set):
    root = small_set
    ratios = set()
    for split, count in zip(SPLITS, (12, 6)):
        coco = load(root, split)
        data = coco.dataset
        assert {"info", "licenses", "images", "annotations", "categories"} <= set(data)
        assert len(data["images"]) == count == len(list((root / split).glob("*.jpg")))
        for info in data["images"]:
            with Image.open(root / split / info["file_name"]) as image:
                assert image.size == (info["width"], info["height"]) and image.mode == "RGB"
            ratios.add(info["width"] / info["height"])
        ids = [c["id"] for c in data["categories"]]
        assert ids == sorted(ids) and ids != list(range(1, len(ids) + 1))  # COCO-like gaps
        assert 4 <= len(ids) <= 6 and all(c["supercategory"] for c in data["categories"])
        assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
        assert all(a["iscrowd"] == 0 and a["category_id"] in ids for a in data["annotations"])
        per_image = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
        assert max(per_image) <= 5
        empty = sum(n == 0 for n in per_image)
        assert empty >= 2 if split == "train2017" else empty == 0
    assert min(ratios) < 1 < max(ratios)  # portrait and landscape images
    assert [c["id"] for c in SYNTHETIC_COCO_CATEGORIES] == ids
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temp directory left


def test_masks_boxes_areas_and_pixels_agree(small_set):
    sizes = set()
    for split in SPLITS:
        coco = load(small_set, split)
        for image_id in coco.getImgIds():
            info = coco.imgs[image_id]
            height, width = info["height"], info["width"]
            pixels = np.asarray(Image.open(small_set / split / info["file_name"]), dtype=np.float64)
            covered = np.zeros((height, width), int)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            for ann in anns:
                (polygon,) = ann["segmentation"]
                mask = coco.annToMask(ann).astype(bool)
                covered += mask
                # pycocotools and pixel-centre sampling may differ only on pixels the boundary crosses.
                differ = mask != pixel_centre_raster(polygon, height, width)
                assert (boundary_distance(polygon, height, width)[differ] < 0.5).all()
                assert differ.sum() <= 0.1 * mask.sum()
                assert ann["area"] == mask.sum() == mask_utils.area(coco.annToRLE(ann))
                assert np.allclose(ann["bbox"], extent(mask))
                points = np.asarray(polygon).reshape(-1, 2)
                x, y, w, h = ann["bbox"]
                assert np.abs(np.r_[points.min(0), points.max(0)] - [x, y, x + w, y + h]).max() <= 1.5
                # The painted colour, up to noise and JPEG error, away from the edge.
                inner = eroded(mask) if eroded(mask).any() else mask
                assert np.abs(pixels[inner] - ann["color"]).mean() < 10
                sizes.add("small" if ann["area"] < 32 ** 2 else "medium" if ann["area"] < 96 ** 2 else "large")
            assert covered.max() <= 1  # instances never overlap, so the masks are exact
            colours = np.array([a["color"] for a in anns])
            if len(anns) > 1:
                gaps = np.linalg.norm(colours[:, None] - colours[None], axis=2) + 1000 * np.eye(len(anns))
                assert gaps.min() > 40
    assert {"small", "medium"} <= sizes


def test_large_objects_where_the_image_allows(tmp_path):
    root = make_synthetic_coco(tmp_path / "big", train_images=60, val_images=1, image_size=128)
    areas = [a["area"] for a in load(root, "train2017").dataset["annotations"]]
    assert max(areas) >= 96 ** 2 and min(areas) < 32 ** 2


def files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_deterministic_from_the_seed(tmp_path, small_set):
    b = make_synthetic_coco(tmp_path / "b", **SMALL)
    c = make_synthetic_coco(tmp_path / "c", **SMALL, seed=1)
    assert files(small_set) == files(b)
    assert all((small_set / f).read_bytes() == (b / f).read_bytes() for f in files(b))
    assert (small_set / "annotations/instances_train2017.json").read_bytes() != \
        (c / "annotations/instances_train2017.json").read_bytes()


def test_second_call_reuses_and_refuses_other_settings(tmp_path):
    root = make_synthetic_coco(tmp_path / "set", **SMALL)
    probe = root / "annotations" / "instances_val2017.json"
    stamp = probe.stat().st_mtime_ns
    assert make_synthetic_coco(root, **SMALL) == root
    assert probe.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"other settings .*image_size"):
        make_synthetic_coco(root, **{**SMALL, "image_size": 64})
    assert json.loads((root / MARKER).read_text())["image_size"] == 96
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a dynconv synthetic COCO set"):
        make_synthetic_coco(tmp_path / "junk", **SMALL)
    assert (tmp_path / "junk" / "x.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="image_size >= 32"):
        make_synthetic_coco(tmp_path / "other", image_size=16)


def _generate(root: str) -> str:
    return str(make_synthetic_coco(root, **SMALL))


def test_concurrent_generation_yields_one_complete_set(tmp_path, small_set):
    root = tmp_path / "shared"
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(_generate, [str(root)] * 2) == [str(root)] * 2
    assert files(root) == files(small_set)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
