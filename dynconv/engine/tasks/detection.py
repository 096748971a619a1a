"""Detection and instance segmentation on COCO-layout data: a torchvision R-CNN with FPN on the dynconv
backbone, the R-CNN's own losses, and COCO box (and mask) AP, as the :class:`~dynconv.engine.tasks.Task`
the engine's loop (DDP, AMP, checkpoints with exact resume, W&B, progress) and ``eval.py`` run.

The recipes (``configs/recipe/det_1x_sgd.yaml``, ``det_1x_adamw.yaml``) are the papers' mmdet 1x
settings (OSVAI/ODConv ``object_detection/configs/odconv/*.py``, OSVAI/KernelWarehouse
``detection/configs/kernelwarehouse/**``); the dynamic layers keep their schedules' end values
(T = 1, tau = 0), as when the official detection code loads an ImageNet checkpoint, unless
``detector.layer_schedule=train``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from ...accounting import count_params
from ...data.coco import DetectionData, coco_datasets, detection_collate
from ...data.detection_transforms import build_detection_transform
from ...data.grouping import aspect_ratio_groups
from ...data.loader import build_loader
from ...data.synthetic_coco import make_synthetic_coco
from ...detection.coco_eval import coco_metrics, to_coco_results
from ...detection.detectors import create_detector
from ..builders import loader_workers, pretrained_source
from ..config import DataConfig, DetAugConfig, EvalConfig, TrainConfig
from ..distributed import DistInfo, broadcast_object
from ..eval_checkpoint import load_for_eval
from ..runtime import autocast
from .protocol import EvalSubject, TaskData

SCALE_STEP = 32  # multi-scale training sizes are multiples of this (mmdet's 480, 512, ..., 800)


def train_sizes(data_cfg: DataConfig, aug_cfg: DetAugConfig) -> List[int]:
    """The training shorter sides: ``recipe.det_aug.scales`` times ``data.min_size``, rounded to 32."""
    sizes = {max(SCALE_STEP, round(s * data_cfg.min_size / SCALE_STEP) * SCALE_STEP) for s in aug_cfg.scales}
    return sorted(sizes)


def build_detection_data(data_cfg: DataConfig, aug_cfg: Optional[DetAugConfig], *, with_masks: bool) -> DetectionData:
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


def build_detector(cfg: Union[TrainConfig, EvalConfig], num_classes: int,
                   sizes: Optional[Sequence[int]] = None) -> nn.Module:
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
    """What COCOeval scores: boxes, and masks for Mask R-CNN."""
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


class DetectionTask:
    """``task=detection``: the :class:`~dynconv.engine.tasks.Task` of R-CNN detectors on COCO-layout data."""

    name = "detection"
    score_key = "eval_bbox_AP"
    deployable = False

    def __init__(self, cfg: Union[TrainConfig, EvalConfig]) -> None:
        self.cfg = cfg
        self.last_metrics: Dict[str, Any] = {}  # the last validation row: the summary reports it

    # ------------------------------------------------------------------------- what the run is
    def identity(self) -> Dict[str, str]:
        return {"arch": self.cfg.model.name, "conv": self.cfg.conv.name, "detector": self.cfg.detector.name}

    def meta(self, data: TaskData) -> Dict[str, Any]:
        return {"num_classes": data.num_classes, "classes": list(data.classes),
                "category_ids": list(data.category_ids), "min_size": self.cfg.data.min_size}

    def title(self) -> str:
        return f"{self.cfg.detector.name} on {self.cfg.model.name} conv={self.cfg.conv.name}"

    def name_parts(self) -> List[str]:
        return [self.cfg.detector.name, self.cfg.model.name, self.cfg.conv.name, self.cfg.recipe.name]

    # -------------------------------------------------------------------------------- training
    def build_data(self) -> TaskData:
        return build_detection_data(self.cfg.data, self.cfg.recipe.det_aug,
                                    with_masks=self.cfg.detector.name == "mask_rcnn")

    def build_loaders(self, data: TaskData, batch_size: int, workers: int, info: DistInfo) -> Tuple[Any, Any]:
        t, det = self.cfg.trainer, self.cfg.detector
        groups = aspect_ratio_groups(data.train.aspect_ratios(), det.aspect_ratio_group_factor)
        train = build_loader(data.train, batch_size=batch_size, train=True, workers=workers,
                             seed=self.cfg.seed, world_size=info.world_size, rank=info.rank, group_ids=groups,
                             collate_fn=detection_collate)
        # one image per batch, as mmdet tests: batched images are zero-padded to a common size, and the
        # padding would move the dynamic layers' attention (pooled over the whole map) and so the scores
        val = build_loader(data.val, batch_size=t.eval_batch_size or 1, train=False,
                           workers=workers, world_size=info.world_size, rank=info.rank,
                           collate_fn=detection_collate)
        return train, val

    def build_model(self, data: TaskData, info: DistInfo) -> nn.Module:
        cfg, det = self.cfg, self.cfg.detector
        model = build_detector(cfg, data.num_classes, train_sizes(cfg.data, cfg.recipe.det_aug))
        if info.is_primary:
            print(model.backbone.body.load_report, flush=True)
            started = det.backbone_checkpoint or pretrained_source(cfg.model) or cfg.trainer.init_checkpoint
            if det.norm_eval and not started:
                print("warning: no detector.backbone_checkpoint, yet detector.norm_eval=true keeps the BatchNorm "
                      "statistics of a fresh network (mean 0, variance 1), which does not normalise; to train "
                      "from scratch set detector.norm_eval=false detector.frozen_stages=-1", flush=True)
        return model

    def count(self, model: nn.Module) -> Tuple[int, Optional[int]]:
        return count_params(model), None  # the MAC counter covers classifiers only

    def ddp_options(self) -> Dict[str, Any]:
        return {"find_unused_parameters": self.cfg.detector.find_unused_parameters}

    def build_loss(self, data: TaskData) -> None:
        pass  # the detector computes its own losses

    def loss(self, model: nn.Module, inputs: Any, targets: Any, device: torch.device) -> torch.Tensor:
        images = [image.to(device, non_blocking=True) for image in inputs]
        targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        return sum(losses.values())

    def layer_progress(self, progress: float) -> float:
        # T = 1 / tau = 0 throughout, as the official detection code runs an ImageNet checkpoint
        return math.inf if self.cfg.detector.layer_schedule == "end" else progress

    # --------------------------------------------------------------------------------- scoring
    def evaluate(self, model: nn.Module, loader: Any, data: TaskData, device: torch.device) -> Dict[str, Any]:
        t = self.cfg.trainer
        return evaluate_detection(model, loader, data.val, device=device, types=iou_types(self.cfg.detector.name),
                                  amp=t.amp, limit=t.limit_eval_batches)

    def validated(self, row: Dict[str, Any]) -> None:
        self.last_metrics = row

    def scores(self, row: Mapping[str, Any]) -> str:
        segm = f" segm AP {row['eval_segm_AP']:.2f}" if row.get("eval_segm_AP") is not None else ""
        return f"bbox AP {row['eval_bbox_AP']:.2f} AP50 {row['eval_bbox_AP50']:.2f}{segm}"

    def summary(self, best_score: float) -> Dict[str, Any]:
        last = {k[len("eval_"):]: v for k, v in self.last_metrics.items()
                if k.startswith("eval_") and k != "eval_count"}
        return {"task": "detection", "detector": self.cfg.detector.name, "best_bbox_AP": best_score, **last}

    def state(self) -> Dict[str, Any]:
        return {"last_metrics": self.last_metrics}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.last_metrics = dict(state.get("last_metrics") or {})

    # --------------------------------------------------------------------------------- eval.py
    def prepare_eval(self, state: Optional[Mapping[str, Any]], device: torch.device) -> EvalSubject:
        """The detector at evaluation size, the checkpoint (or its backbone's start) loaded, one image per batch."""
        cfg, t, det = self.cfg, self.cfg.trainer, self.cfg.detector
        data = build_detection_data(cfg.data, None, with_masks=det.name == "mask_rcnn")
        model = build_detector(cfg, data.num_classes)
        loaded = load_for_eval(model, cfg, state, self.identity()) if state is not None \
            else model.backbone.body.load_report
        model.to(device)
        loader = build_loader(data.val, batch_size=cfg.batch_size or 1, train=False, workers=loader_workers(t.workers),
                              collate_fn=detection_collate)
        return EvalSubject(model, data, loader, loaded)

    def eval_result(self, subject: EvalSubject, metrics: Dict[str, Any], seconds: float,
                    device: torch.device) -> Dict[str, Any]:
        """COCO AP of the checkpoint, COCOeval's summary included."""
        cfg = self.cfg
        return {"task": "detection", "detector": cfg.detector.name, "model": cfg.model.name, "conv": cfg.conv.name,
                "checkpoint": cfg.checkpoint, "loaded": subject.loaded,
                **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in metrics.items() if k != "summary"},
                "param_count": round(count_params(subject.model) / 1e6, 3), "min_size": cfg.data.min_size,
                "max_size": cfg.data.max_size, "eval_images_per_sec": round(metrics["count"] / seconds, 2),
                "device": str(device), "data": cfg.data.name, "coco_summary": metrics["summary"]}


__all__ = ["DetectionTask", "build_detection_data", "build_detector", "evaluate_detection", "iou_types",
           "train_sizes"]
