"""Detection and instance segmentation training on COCO-layout data: the classification engine
(:class:`~dynconv.engine.trainer.Trainer`: DDP, AMP, checkpoints with exact resume, W&B, progress) with
a torchvision R-CNN, detection data and COCO AP in place of the classifier, its data and top-1.

The recipes (``configs/recipe/det_1x_sgd.yaml``, ``det_1x_adamw.yaml``) are the papers' mmdet 1x
settings (OSVAI/ODConv ``object_detection/configs/odconv/*.py``, OSVAI/KernelWarehouse
``detection/configs/kernelwarehouse/**``); the dynamic layers keep their schedules' end values
(T = 1, tau = 0), as when the official detection code loads an ImageNet checkpoint, unless
``detector.layer_schedule=train``.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .. import auxiliary_loss, count_params
from ..checkpoint import atomic_write
from ..data import build_loader
from ..data.coco import coco_datasets, detection_collate
from ..data.detection_transforms import build_detection_transform
from ..data.grouping import aspect_ratio_groups
from ..data.synthetic_coco import make_synthetic_coco
from ..detection import create_detector
from ..detection.coco_eval import coco_metrics, to_coco_results
from ..malloc import reuse_freed_memory
from ..schedules import set_progress
from .builders import loader_workers, pretrained_source
from .config import validate
from .distributed import DistInfo, broadcast_object, resolve_device
from .eval_checkpoint import load_for_eval
from .evaluate import autocast
from .trainer import Trainer

SCALE_STEP = 32  # multi-scale training sizes are multiples of this (mmdet's 480, 512, ..., 800)


def train_sizes(data_cfg: Any, aug_cfg: Any) -> List[int]:
    """The training shorter sides: ``recipe.det_aug.scales`` times ``data.min_size``, rounded to 32."""
    sizes = {max(SCALE_STEP, round(s * data_cfg.min_size / SCALE_STEP) * SCALE_STEP) for s in aug_cfg.scales}
    return sorted(sizes)


def build_detection_data(data_cfg: Any, aug_cfg: Optional[Any], *, with_masks: bool) -> Any:
    """Train and val COCO datasets (``synthetic_coco`` is generated at ``data.root`` first)."""
    if data_cfg.name == "synthetic_coco":
        make_synthetic_coco(data_cfg.root, train_images=data_cfg.train_images, val_images=data_cfg.val_images,
                            image_size=data_cfg.image_size, seed=0)
    train_tf = None
    if aug_cfg is not None:
        side = data_cfg.min_size
        train_tf = build_detection_transform(
            True, hflip=aug_cfg.hflip, crop_prob=aug_cfg.crop_prob,
            crop_resize=tuple(round(s * side) for s in aug_cfg.crop_resize),
            crop_size=tuple(round(s * side) for s in aug_cfg.crop_size), max_size=data_cfg.max_size)
    return coco_datasets(data_cfg.root, train_transforms=train_tf, eval_transforms=build_detection_transform(False),
                         with_masks=with_masks, train_split=data_cfg.train_split, val_split=data_cfg.val_split,
                         on_corrupt=data_cfg.on_corrupt, max_bad_fraction=data_cfg.max_bad_fraction)


def build_detector(cfg: Any, num_classes: int, sizes: Optional[Sequence[int]] = None) -> nn.Module:
    """``dynconv.detection.create_detector`` from a config's model, conv and detector sections."""
    det, model = cfg.detector, cfg.model
    options = {**dict(model.kwargs), **dict(cfg.conv.options)}
    if model.drop_path_rate:
        options["drop_path_rate"] = model.drop_path_rate
        options["drop_path_mode"] = model.drop_path_mode
    if pretrained_source(model) is not None:
        options["pretrained"] = pretrained_source(model)
    try:
        return create_detector(det.name, model.name, cfg.conv.name, num_classes=num_classes,
                               min_size=list(sizes or [cfg.data.min_size]), max_size=cfg.data.max_size,
                               frozen_stages=det.frozen_stages, frozen_trainable=list(det.frozen_trainable),
                               norm_eval=det.norm_eval,
                               backbone_checkpoint=det.backbone_checkpoint, backbone_use_ema=det.backbone_use_ema,
                               fpn_channels=det.fpn_channels, detector_options=dict(det.kwargs), **options)
    except TypeError as err:  # an option neither torchvision, the conv family nor timm takes
        raise ValueError(f"detector={det.name} model={model.name} conv={cfg.conv.name}: an option in "
                         f"detector.kwargs / conv.options / model.kwargs is not accepted ({err})") from err


def iou_types(detector: str) -> Tuple[str, ...]:
    return ("bbox", "segm") if detector == "mask_rcnn" else ("bbox",)


@torch.no_grad()
def evaluate_detection(model: nn.Module, loader: Any, dataset: Any, *, device: torch.device,
                       types: Sequence[str] = ("bbox",), amp: str = "none",
                       limit: Optional[int] = None) -> Dict[str, Any]:
    """COCO AP of ``model`` over ``loader`` (each rank its shard), scored on rank 0 with COCOeval.

    Returns ``{"bbox_AP": ..., ..., "count": images, "summary": COCOeval's lines}`` on every rank.
    """
    model.eval()
    results: List[Dict[str, Any]] = []
    image_ids: List[int] = []
    for i, (images, targets) in enumerate(loader):
        if limit is not None and i >= limit:
            break
        with autocast(device, amp):
            outputs = model([image.to(device, non_blocking=True) for image in images])
        for output, target in zip(outputs, targets):
            image_id = int(target["image_id"])
            image_ids.append(image_id)
            results.extend(to_coco_results(image_id, output, dataset.category_ids))
    if dist.is_initialized():
        gathered: List[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (results, image_ids))
        results = [r for part, _ in gathered for r in part]
        image_ids = [i for _, part in gathered for i in part]
    metrics = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        metrics = coco_metrics(dataset.coco, results, image_ids, types)
        metrics["count"] = len(set(image_ids))
    return broadcast_object(metrics) if dist.is_initialized() else metrics


class DetectionTrainer(Trainer):
    """:class:`Trainer` for ``task=detection``: R-CNN losses, COCO data, bbox (and segm) AP."""

    score_key = "eval_bbox_AP"

    def __init__(self, cfg: Any, info: DistInfo) -> None:
        self.last_metrics: Dict[str, Any] = {}
        super().__init__(cfg, info)

    def _identity(self) -> Dict[str, str]:
        return {**super()._identity(), "detector": self.cfg.detector.name}

    def _title(self) -> str:
        return f"{self.cfg.detector.name} on {super()._title()}"

    def _name_parts(self) -> List[str]:
        return [self.cfg.detector.name, *super()._name_parts()]

    def _build_data(self) -> Any:
        return build_detection_data(self.cfg.data, self.cfg.recipe.det_aug,
                                    with_masks=self.cfg.detector.name == "mask_rcnn")

    def _build_loaders(self, workers: int) -> Tuple[Any, Any]:
        info, t, det = self.info, self.cfg.trainer, self.cfg.detector
        groups = aspect_ratio_groups(self.data.train.aspect_ratios(), det.aspect_ratio_group_factor)
        train = build_loader(self.data.train, batch_size=self.batch_size, train=True, workers=workers,
                             seed=self.cfg.seed, world_size=info.world_size, rank=info.rank, group_ids=groups,
                             collate_fn=detection_collate)
        # one image per batch, as mmdet tests: batched images are zero-padded to a common size, and the
        # padding would move the dynamic layers' attention (pooled over the whole map) and so the scores
        val = build_loader(self.data.val, batch_size=t.eval_batch_size or 1, train=False,
                           workers=workers, world_size=info.world_size, rank=info.rank,
                           collate_fn=detection_collate)
        return train, val

    def _build_network(self) -> nn.Module:
        det = self.cfg.detector
        model = build_detector(self.cfg, self.data.num_classes, train_sizes(self.cfg.data, self.cfg.recipe.det_aug))
        if self.info.is_primary:
            print(model.backbone.body.load_report, flush=True)
            started = det.backbone_checkpoint or pretrained_source(self.cfg.model) or self.cfg.trainer.init_checkpoint
            if det.norm_eval and not started:
                print("warning: no detector.backbone_checkpoint, yet detector.norm_eval=true keeps the BatchNorm "
                      "statistics of a fresh network (mean 0, variance 1), which does not normalise; to train "
                      "from scratch set detector.norm_eval=false detector.frozen_stages=-1", flush=True)
        return model

    def _build_objectives(self) -> Tuple[None, None]:
        return None, None  # the detector computes its own losses

    def _count(self, model: nn.Module) -> Tuple[int, Optional[int]]:
        return count_params(model), None

    def _ddp_options(self) -> Dict[str, Any]:
        return {"find_unused_parameters": self.cfg.detector.find_unused_parameters}

    def _meta(self) -> Dict[str, Any]:
        return {"num_classes": self.data.num_classes, "classes": list(self.data.classes),
                "category_ids": list(self.data.category_ids), "min_size": self.cfg.data.min_size}

    def schedule_progress(self) -> float:
        if self.cfg.detector.layer_schedule == "end":
            return math.inf
        return super().schedule_progress()

    def _loss(self, images: Any, targets: Any) -> torch.Tensor:
        images = [image.to(self.device, non_blocking=True) for image in images]
        targets = [{k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
                   for t in targets]
        losses = self.model(images, targets)
        return sum(losses.values()) + auxiliary_loss(self.module)

    def validate(self) -> Dict[str, float]:
        t = self.cfg.trainer
        self._sync_buffers()
        kwargs = dict(device=self.device, types=iou_types(self.cfg.detector.name), amp=t.amp,
                      limit=t.limit_eval_batches)
        set_progress(self.module, self.schedule_progress())
        metrics = evaluate_detection(self.module, self.val_loader, self.data.val, **kwargs)
        if self.info.is_primary and t.progress:
            print(metrics["summary"], flush=True)
        row = {f"eval_{k}": v for k, v in metrics.items() if k != "summary"}
        if self.ema is not None:
            set_progress(self.ema.module, self.schedule_progress())
            ema = evaluate_detection(self.ema.module, self.val_loader, self.data.val, **kwargs)
            row.update({f"eval_ema_{k}": v for k, v in ema.items() if k not in ("summary", "count")})
        self.last_metrics = row
        return row

    def state(self) -> Dict[str, Any]:
        return {**super().state(), "last_metrics": self.last_metrics}

    def load_state(self, state: Dict[str, Any], path: Any) -> None:
        super().load_state(state, path)
        self.last_metrics = dict(state.get("last_metrics") or {})

    def _print_epoch(self, row: Dict[str, Any]) -> None:
        if not self.info.is_primary:
            return
        segm = f" segm AP {row['eval_segm_AP']:.2f}" if row.get("eval_segm_AP") is not None else ""
        print(f"epoch {row['epoch']}/{self.cfg.recipe.epochs}: train loss {row['train_loss']:.4f}  "
              f"bbox AP {row['eval_bbox_AP']:.2f} AP50 {row['eval_bbox_AP50']:.2f}{segm}  "
              f"lr {row['lr']:.3g}  {row['epoch_time_s']:.0f}s", flush=True)

    def _summary_extra(self) -> Dict[str, Any]:
        last = {k[len("eval_"):]: v for k, v in self.last_metrics.items() if k.startswith("eval_") and k != "eval_count"}
        return {"task": "detection", "detector": self.cfg.detector.name, "best_bbox_AP": self.best_score, **last}


def run_eval_detection(cfg: Any) -> Dict[str, Any]:
    """``eval.py task=detection``: COCO AP of a detection checkpoint (or a fresh detector) on the val split.

    Writes the result, COCOeval's summary included, as JSON to ``cfg.output`` when set.
    """
    validate(cfg)
    torch.manual_seed(cfg.seed)
    t, det = cfg.trainer, cfg.detector
    device = resolve_device(t.device)
    if t.reuse_freed_memory:
        reuse_freed_memory(device)
    data = build_detection_data(cfg.data, None, with_masks=det.name == "mask_rcnn")
    model = build_detector(cfg, data.num_classes)
    loaded = load_for_eval(model, cfg, detector=det.name) if cfg.checkpoint else model.backbone.body.load_report
    model.to(device)
    loader = build_loader(data.val, batch_size=cfg.batch_size or 1, train=False, workers=loader_workers(t.workers),
                          collate_fn=detection_collate)
    start = time.perf_counter()
    metrics = evaluate_detection(model, loader, data.val, device=device, types=iou_types(det.name), amp=t.amp,
                                 limit=t.limit_eval_batches)
    elapsed = time.perf_counter() - start
    result = {"task": "detection", "detector": det.name, "model": cfg.model.name, "conv": cfg.conv.name,
              "checkpoint": cfg.checkpoint, "loaded": loaded,
              **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in metrics.items() if k != "summary"},
              "param_count": round(count_params(model) / 1e6, 3), "min_size": cfg.data.min_size,
              "max_size": cfg.data.max_size, "eval_images_per_sec": round(metrics["count"] / elapsed, 2),
              "device": str(device), "data": cfg.data.name, "coco_summary": metrics["summary"]}
    if cfg.output:
        atomic_write(cfg.output, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    return result


__all__ = ["DetectionTrainer", "build_detection_data", "build_detector", "evaluate_detection",
           "run_eval_detection", "train_sizes"]
