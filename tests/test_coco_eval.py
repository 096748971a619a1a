"""COCO AP through pycocotools' COCOeval, checked with predictions whose AP is known exactly."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402

from dynconv.detection.coco_eval import coco_metrics, to_coco_results  # noqa: E402

CATEGORY_IDS = [3, 7]  # label 1 -> id 3, label 2 -> id 7 (COCO ids are not contiguous)


def _square(x, y, s):
    return [[x, y, x + s, y, x + s, y + s, x, y + s]]


@pytest.fixture()
def coco_gt(tmp_path):
    """Two 64x80 images; objects of every COCO area range are not needed for AP/AP50/AP75."""
    objects = {1: [(3, 4, 4, 20), (7, 40, 30, 24)], 2: [(7, 10, 40, 16), (3, 50, 2, 12), (3, 30, 10, 18)]}
    annotations, next_id = [], 1
    for image_id, items in objects.items():
        for cat, x, y, s in items:
            annotations.append({"id": next_id, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                                "bbox": [x, y, s, s], "area": float(s * s), "segmentation": _square(x, y, s)})
            next_id += 1
    data = {"images": [{"id": i, "width": 80, "height": 64, "file_name": f"{i}.jpg"} for i in objects],
            "annotations": annotations,
            "categories": [{"id": 3, "name": "square"}, {"id": 7, "name": "box"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return COCO(str(path))


def _ground_truth_as_predictions(coco, keep=lambda ann: True):
    predictions = {}
    for image_id in coco.getImgIds():
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if keep(a)]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns]) if anns else np.zeros((0, 64, 80)))
        predictions[image_id] = {
            "boxes": boxes, "scores": torch.ones(len(anns)),
            "labels": torch.tensor([CATEGORY_IDS.index(a["category_id"]) + 1 for a in anns], dtype=torch.int64),
            "masks": masks[:, None].float()}
    return predictions


def _results(predictions):
    return [r for image_id, p in predictions.items() for r in to_coco_results(image_id, p, CATEGORY_IDS)]


def test_ground_truth_fed_back_scores_ap_100(coco_gt):
    metrics = coco_metrics(coco_gt, _results(_ground_truth_as_predictions(coco_gt)), coco_gt.getImgIds(),
                           ("bbox", "segm"))
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75"):
            assert metrics[f"{iou_type}_{name}"] == pytest.approx(100.0), (iou_type, name)
    assert metrics["bbox_APl"] is None  # no ground truth in that area range: not a negative AP
    assert "Average Precision" in metrics["summary"]


def test_results_map_labels_back_to_category_ids(coco_gt):
    results = _results(_ground_truth_as_predictions(coco_gt))
    gt = {(a["image_id"], a["category_id"], tuple(a["bbox"])) for a in coco_gt.dataset["annotations"]}
    assert {(r["image_id"], r["category_id"], tuple(r["bbox"])) for r in results} == gt
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    json.dumps(results)  # what eval writes


def test_half_the_objects_of_one_class_gives_the_known_ap(coco_gt):
    """Category 3 has 3 objects; predicting the 2 of image 2 reaches recall 2/3 at precision 1, so its
    AP is 67/101 (COCO's 101 recall points 0, 0.01, ..., 0.66); category 7 stays at 1."""
    predictions = _ground_truth_as_predictions(coco_gt, keep=lambda a: not (a["category_id"] == 3 and a["image_id"] == 1))
    metrics = coco_metrics(coco_gt, _results(predictions), coco_gt.getImgIds(), ("bbox",))
    assert metrics["bbox_AP"] == pytest.approx(100 * (67 / 101 + 1) / 2, abs=1e-6)


def test_only_the_evaluated_images_count(coco_gt):
    predictions = _ground_truth_as_predictions(coco_gt)
    del predictions[1]
    metrics = coco_metrics(coco_gt, _results(predictions), [2], ("bbox",))
    assert metrics["bbox_AP"] == pytest.approx(100.0)


def test_no_detections_scores_zero(coco_gt):
    metrics = coco_metrics(coco_gt, [], coco_gt.getImgIds(), ("bbox", "segm"))
    assert metrics["bbox_AP"] == 0.0 and metrics["segm_AP"] == 0.0
