"""COCO detection datasets: label mapping, targets, crowd and empty images, malformed input, errors."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from dynconv.data import (
    CocoDetectionDataset,
    CorruptImageError,
    DatasetError,
    coco_datasets,
    detection_collate,
    make_synthetic_coco,
)

CATEGORIES = [{"id": 5, "name": "dog", "supercategory": "animal"},  # out of order on purpose
              {"id": 2, "name": "cat", "supercategory": "animal"}]


def rect(x1, y1, x2, y2):
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def rle_of(x1, y1, x2, y2, height, width, compressed: bool):
    mask = np.zeros((height, width), np.uint8)
    mask[y1:y2, x1:x2] = 1
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask))
        return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    flat = mask.ravel(order="F")  # uncompressed COCO RLE: run lengths in column-major order, zeros first
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.r_[0, changes, flat.size])
    counts = ([0] if flat[0] else []) + runs.tolist()
    return {"size": [height, width], "counts": counts}


def ann(id_, image_id, category_id, bbox, segmentation, iscrowd=0):
    return dict(id=id_, image_id=image_id, category_id=category_id, bbox=bbox, segmentation=segmentation,
                area=float(bbox[2] * bbox[3]) if len(bbox) == 4 else 0.0, iscrowd=iscrowd)


TRAIN = dict(
    images=[dict(id=10, file_name="10.png", width=40, height=30),
            dict(id=11, file_name="11.png", width=40, height=30),  # only a crowd region
            dict(id=12, file_name="12.png", width=30, height=40),  # nothing
            dict(id=13, file_name="13.jpg", width=30, height=40)],  # malformed ones and one good
    annotations=[
        ann(101, 10, 2, [2, 3, 10, 10], rect(2, 3, 12, 13)),
        ann(102, 10, 5, [20, 5, 18, 20], rect(20, 5, 38, 25)),
        ann(103, 10, 5, [30, -5, 20, 15], rect(30, 0, 40, 10)),  # past the top and right edges
        ann(104, 10, 2, [0, 20, 10, 10], rle_of(0, 20, 10, 30, 30, 40, compressed=False), iscrowd=1),
        ann(105, 11, 2, [0, 0, 10, 10], rle_of(0, 0, 10, 10, 30, 40, compressed=False), iscrowd=1),
        ann(106, 13, 2, [1, 2, 3], rect(1, 2, 3, 4)),
        ann(107, 13, 2, [1, 2, float("nan"), 4], rect(1, 2, 3, 4)),
        ann(108, 13, 5, [5, 5, 0, 10], rect(5, 5, 6, 15)),
        ann(109, 13, 5, [100, 100, 5, 5], rect(100, 100, 105, 105)),
        ann(110, 13, 5, [4, 6, 20, 30], rle_of(4, 6, 24, 36, 40, 30, compressed=True)),
        ann(111, 13, 2, [1, 1, 5, 5], []),  # no segmentation: unusable for Mask R-CNN only
    ],
    categories=CATEGORIES,
)
VAL = dict(
    images=[dict(id=20, file_name="20.png", width=40, height=30),
            dict(id=21, file_name="21.png", width=30, height=40)],
    annotations=[ann(201, 20, 5, [1, 1, 8, 8], rect(1, 1, 9, 9)),
                 ann(202, 20, 2, [20, 10, 10, 10], rle_of(20, 10, 30, 20, 30, 40, compressed=False), iscrowd=1)],
    categories=CATEGORIES,
)


def write_split(root, split, content, fmt=None):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    (root / split).mkdir(exist_ok=True)
    for info in content["images"]:
        value = info["id"]  # every pixel holds the image id, so an image names itself
        pixels = np.full((info["height"], info["width"], 3), value, np.uint8)
        Image.fromarray(pixels).save(root / split / info["file_name"], fmt or None)


@pytest.fixture
def tiny(tmp_path):
    root = tmp_path / "coco"
    write_split(root, "train2017", TRAIN)
    write_split(root, "val2017", VAL)
    return root


def quiet_train(root, **kwargs):
    with pytest.warns(UserWarning, match="malformed"):
        return CocoDetectionDataset(root, "train2017", train=True, **kwargs)


def extents(masks: torch.Tensor) -> torch.Tensor:
    """``x1, y1, x2, y2`` (pixel edges) of every mask's set pixels."""
    rows = []
    for m in masks.bool():
        ys, xs = torch.nonzero(m, as_tuple=True)
        rows.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def test_labels_map_to_category_names_and_boxes_to_masks(tiny):
    train = quiet_train(tiny)
    assert train.classes == ["cat", "dog"] and train.category_ids == [2, 5] and train.num_classes == 3
    image, target = train[0]
    assert target["image_id"] == 10
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert torch.allclose(image, torch.full_like(image, 10 / 255))
    names = {a["id"]: {c["id"]: c["name"] for c in CATEGORIES}[a["category_id"]] for a in TRAIN["annotations"]}
    assert [train.classes[label - 1] for label in target["labels"]] == [names[101], names[102], names[103]]
    assert target["labels"].dtype == torch.int64
    expected = torch.tensor([[2, 3, 12, 13], [20, 5, 38, 25], [30, 0, 40, 10]], dtype=torch.float32)
    assert target["boxes"].dtype == torch.float32 and torch.equal(target["boxes"], expected)  # 103 clipped
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (3, 30, 40)
    assert torch.equal(extents(target["masks"]), expected)
    assert target["area"].dtype == torch.float32 and target["area"].tolist() == [100.0, 360.0, 300.0]
    assert target["iscrowd"].tolist() == [0, 0, 0]


def test_training_leaves_out_crowds_and_empty_images_val_keeps_them(tiny, capsys):
    train = quiet_train(tiny)
    out = capsys.readouterr().out
    assert "instances_train2017.json: left out 2 of 4 training images" in out
    assert train.ids == [10, 13] and len(train) == 2
    assert train.aspect_ratios() == [40 / 30, 30 / 40]
    val = CocoDetectionDataset(tiny, "val2017", train=False)
    assert "left out" not in capsys.readouterr().out
    assert val.ids == [20, 21]
    _, target = val[0]
    assert target["iscrowd"].tolist() == [0, 1] and target["labels"].tolist() == [2, 1]
    assert torch.equal(extents(target["masks"][1:]), torch.tensor([[20.0, 10, 30, 20]]))  # uncompressed RLE
    image, empty = val[1]
    assert image.shape == (3, 40, 30) and empty["image_id"] == 21
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["masks"].shape == (0, 40, 30)


def test_malformed_annotations_are_dropped_with_one_warning(tiny):
    with pytest.warns(UserWarning) as record:
        train = CocoDetectionDataset(tiny, "train2017", train=True)
    assert len(record) == 1
    message = str(record[0].message)
    assert "instances_train2017.json" in message and "dropped 5 malformed" in message
    assert "ids [106, 107, 108, 109]" in message and "ids [111]" in message
    _, target = train[1]  # image 13 keeps only annotation 110, a compressed RLE
    assert target["image_id"] == 13 and target["labels"].tolist() == [2]
    assert torch.equal(target["boxes"], torch.tensor([[4.0, 6, 24, 36]]))
    assert torch.equal(extents(target["masks"]), target["boxes"])

    with pytest.warns(UserWarning, match="dropped 4 malformed") as record:
        boxes_only = CocoDetectionDataset(tiny, "train2017", train=True, with_masks=False)
    _, target = boxes_only[1]
    assert "masks" not in target and target["labels"].tolist() == [2, 1]  # 111 needs no segmentation


def test_transforms_get_the_pil_image_and_target(tiny):
    calls = []

    def transforms(image, target):
        calls.append((image.size, image.mode, sorted(target)))
        return "image", target

    train = quiet_train(tiny, transforms=transforms)
    assert train[0][0] == "image"
    assert calls == [((40, 30), "RGB", ["area", "boxes", "image_id", "iscrowd", "labels", "masks"])]


@pytest.mark.parametrize("missing", ["annotations/instances_train2017.json", "train2017", ""])
def test_missing_files_name_the_path_and_layout(tiny, missing):
    import shutil

    root = tiny if missing else tiny.parent / "absent"
    if missing.endswith(".json"):
        (tiny / missing).unlink()
    elif missing:
        shutil.rmtree(tiny / missing)
    with pytest.raises(DatasetError) as info:
        coco_datasets(root)
    message = str(info.value)
    assert str((root / missing).resolve()) in message and "data.root=" in message
    assert "COCO 2017 layout" in message and "instances_train2017.json with train2017/" in message


def test_unreadable_annotation_file_and_category_mismatch(tiny):
    (tiny / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match=r"instances_val2017.json: cannot read"):
        coco_datasets(tiny)
    write_split(tiny, "val2017", {**VAL, "categories": CATEGORIES[:1] + [{"id": 3, "name": "cow"}]})
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match=r"different categories .*only in "
                                                  r"train2017 \[\(2, 'cat'\)\], only in val2017 \[\(3, 'cow'\)\]"):
        coco_datasets(tiny)


def write_truncated_jpeg(path, width, height) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8)
    Image.fromarray(noise).save(path, "JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_image_raises_or_is_skipped(tiny, caplog):
    bad = tiny / "train2017" / "13.jpg"
    write_truncated_jpeg(bad, 30, 40)
    train = quiet_train(tiny)
    with pytest.raises(CorruptImageError) as info:
        train[1]
    assert str(bad) in str(info.value) and "data.on_corrupt=skip" in str(info.value)

    train = quiet_train(tiny, on_corrupt="skip", max_bad_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="dynconv.data"):
        image, target = train[1]
    assert target["image_id"] == 10 and torch.allclose(image, torch.full_like(image, 10 / 255))  # wrapped round
    assert str(bad) in caplog.text and train.bad_count == 1 and train.bad_files == [str(bad)]
    train[1]
    assert train.bad_count == 1  # counted once

    train = quiet_train(tiny, on_corrupt="skip", max_bad_fraction=0.0)  # tolerates one
    assert train[1][1]["image_id"] == 10
    (tiny / "train2017" / "10.png").write_bytes(b"not an image")
    with pytest.raises(CorruptImageError, match=r"skipped 2 unreadable images"):
        train[0]


def test_image_size_must_match_the_annotation_file(tiny):
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tiny / "train2017" / "10.png")
    with pytest.raises(CorruptImageError, match=r"10.png: the image is 30x30 but instances_train2017.json "
                                                r"says 40x30"):
        quiet_train(tiny)[0]


def test_synthetic_set_end_to_end(tmp_path):
    root = make_synthetic_coco(tmp_path / "syn", train_images=12, val_images=6, image_size=96)
    data = coco_datasets(root)
    assert data.category_ids == [1, 3, 7, 10, 13] and data.num_classes == 6
    assert data.classes == ["circle", "square", "triangle", "diamond", "star"]
    assert (len(data.train), len(data.val)) == (10, 6)  # the two object-free training images are left out
    coco = data.val.coco
    for i in range(len(data.val)):
        image, target = data.val[i]
        assert image.shape[1:] == (coco.imgs[target["image_id"]]["height"], coco.imgs[target["image_id"]]["width"])
        assert 0 <= image.min() and image.max() <= 1
        anns = coco.loadAnns(coco.getAnnIds(imgIds=target["image_id"]))
        assert [data.classes[label - 1] for label in target["labels"]] == \
            [coco.cats[a["category_id"]]["name"] for a in anns]
        assert torch.equal(target["boxes"], extents(target["masks"]))
    images, targets = detection_collate([data.val[0], data.val[1]])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 2
    assert [t["image_id"] for t in targets] == data.val.ids[:2]
