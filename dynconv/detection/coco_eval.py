"""COCO box and mask AP with pycocotools' ``COCOeval``, the scorer behind every published COCO number.

Predictions are turned into COCO result entries (``bbox`` as ``[x, y, w, h]``, masks as RLE of the
mask probabilities thresholded at 0.5, labels mapped back to COCO category ids) and scored against
the annotation file's ground truth; only the images that were predicted are scored, so a partial
evaluation (``limit_eval_batches``) is honest about what it covers.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Dict, Iterable, List, Mapping, Sequence

import numpy as np
import torch

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")


def to_coco_results(image_id: int, prediction: Mapping[str, torch.Tensor],
                    category_ids: Sequence[int]) -> List[Dict[str, Any]]:
    """One image's detections as COCO result entries.

    Args:
        image_id: the COCO image id.
        prediction: torchvision detector output: ``boxes`` (xyxy), ``scores``, ``labels`` (1..K) and
            optionally ``masks`` (``[N, 1, H, W]`` probabilities).
        category_ids: the COCO id of label ``k`` is ``category_ids[k - 1]``.
    """
    from pycocotools import mask as mask_utils

    boxes = prediction["boxes"].detach().float().cpu()
    if len(boxes) == 0:
        return []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = prediction["scores"].detach().float().cpu().tolist()
    labels = prediction["labels"].detach().cpu().tolist()
    rles: List[Any] = [None] * len(boxes)
    if "masks" in prediction:
        binary = (prediction["masks"].detach()[:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")  # JSON-serialisable
    results = []
    for box, score, label, rle in zip(xywh, scores, labels, rles):
        entry = {"image_id": int(image_id), "category_id": int(category_ids[label - 1]),
                 "bbox": [round(v, 3) for v in box], "score": round(float(score), 5)}
        if rle is not None:
            entry["segmentation"] = rle
        results.append(entry)
    return results


def coco_metrics(coco_gt: Any, results: List[Dict[str, Any]], image_ids: Iterable[int],
                 iou_types: Sequence[str] = ("bbox",)) -> Dict[str, Any]:
    """``{"bbox_AP": ..., "bbox_AP50": ..., "segm_AP": ...}`` in percent (None for an area range without
    ground truth), plus ``"summary"`` (the lines COCOeval prints), for ``results`` on ``image_ids`` of
    ``coco_gt`` (a pycocotools COCO)."""
    from pycocotools.cocoeval import COCOeval

    ids = sorted(set(int(i) for i in image_ids))
    metrics: Dict[str, Any] = {}
    summaries = []
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou type {iou_type!r}; choose from {IOU_TYPES}")
        entries = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if not entries:  # COCOeval cannot load an empty result list: nothing detected scores 0
            metrics.update({f"{iou_type}_{m}": 0.0 for m in METRICS})
            continue
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            coco_dt = coco_gt.loadRes([{k: v for k, v in r.items() if iou_type == "segm" or k != "segmentation"}
                                       for r in entries])
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.params.imgIds = ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        # COCOeval gives -1 where an area range has no ground truth: None, not a negative AP
        stats = [float(s) * 100 if s >= 0 else None for s in evaluator.stats[:6]]
        metrics.update({f"{iou_type}_{m}": v for m, v in zip(METRICS, stats)})
        summaries.append(f"{iou_type}:\n" + "\n".join(l for l in text.getvalue().splitlines() if "Average" in l))
    metrics["summary"] = "\n".join(summaries)
    return metrics


__all__ = ["IOU_TYPES", "METRICS", "coco_metrics", "to_coco_results"]
