"""Image classification: generated or ImageNet-style data, a timm classifier with the conv variant applied,
cross-entropy with the recipe's mixup / CutMix and label smoothing, and top-1 / top-5.

``eval.py`` scores a checkpoint with the evaluation transform its run validated with (or the recipe's, for
official files), refuses data whose class names differ from the run's, and can score the deployed model.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ...accounting import count_macs, count_params
from ...checkpoint import CheckpointError, first_non_finite
from ...data.loader import build_loader
from ...deploy import deploy
from ..builders import build_data, build_mixup_and_loss, build_model, loader_workers
from ..config import EvalConfig, TrainConfig
from ..distributed import DistInfo
from ..errors import NonFiniteLossError
from ..eval_checkpoint import load_for_eval
from ..evaluate import evaluate, images_per_second
from ..runtime import to_channels_last, to_device
from .protocol import EvalSubject, TaskData


def check_class_names(state: Optional[Mapping[str, Any]], classes: Sequence[str], checkpoint: Any,
                      ignore: bool = False) -> Optional[str]:
    """Refuse to score a checkpoint on data whose class names differ from those it was trained on.

    A dynconv checkpoint stores its run's class names (``meta["classes"]``, in label order). With other
    names, or the same in another order, label ``i`` of the data is not the class output ``i`` was trained
    for, and top-1 is measured against the wrong labels without any error. Official files store no names
    and are not checked; a dynconv checkpoint without them (written before they were stored) cannot be.

    Returns:
        a warning to print (names that could not be checked, or differences ignored), or None.

    Raises:
        CheckpointError: the names differ and ``ignore`` is False (``ignore_class_names=true`` scores anyway).
    """
    meta = state.get("meta") if isinstance(state, Mapping) else None
    if not isinstance(meta, Mapping):
        return None  # an official file or a bare state dict: no names to check against
    stored = meta.get("classes")
    if stored is None:
        return (f"warning: {checkpoint} stores no class names (written by an older dynconv), so they cannot be "
                f"checked against the data's {len(classes)} classes")
    stored, classes = [str(c) for c in stored], [str(c) for c in classes]
    if stored == classes:
        return None
    first = next(i for i in range(max(len(stored), len(classes)))
                 if i >= len(stored) or i >= len(classes) or stored[i] != classes[i])
    at = lambda names: repr(names[first]) if first < len(names) else "nothing"  # noqa: E731
    problem = (f"{checkpoint} was trained on {len(stored)} classes, the data has {len(classes)}, and they differ "
               f"first at label {first}: {at(stored)} in the checkpoint, {at(classes)} in the data "
               f"(only in the checkpoint: {sorted(set(stored) - set(classes))[:5]}, only in the data: "
               f"{sorted(set(classes) - set(stored))[:5]})")
    if not ignore:
        raise CheckpointError(f"{problem}: the scores would count the wrong labels. Evaluate on the run's "
                              f"classes (data.root, data.classes / data.num_classes), or set "
                              f"ignore_class_names=true to score anyway")
    return f"warning: {problem}; scoring anyway (ignore_class_names=true)"


def eval_transform(cfg: EvalConfig, state: Optional[Mapping[str, Any]]) -> Tuple[str, float, str]:
    """Resize interpolation and crop fraction to evaluate with, and where they came from.

    A checkpoint is scored the way its run was validated: ``interpolation=`` / ``crop_pct=`` on the command
    line win; else a dynconv checkpoint's stored config (``recipe.aug.eval_interpolation``,
    ``data.crop_pct``); else, for official files, which carry no config, the recipe named for evaluation
    (``recipe=convnext_300ep`` gives the bicubic resize the KernelWarehouse 300-epoch models were validated
    with: its ``datasets.py``) and ``data.crop_pct``.
    """
    stored = state.get("config") if isinstance(state, Mapping) else None
    stored = stored if isinstance(stored, Mapping) else {}
    trained_aug = (stored.get("recipe") or {}).get("aug") or {}
    trained_crop = (stored.get("data") or {}).get("crop_pct")
    if cfg.interpolation is not None:
        interpolation, source = cfg.interpolation, "interpolation="
    elif trained_aug.get("eval_interpolation"):
        interpolation, source = trained_aug["eval_interpolation"], f"the checkpoint's recipe ({stored['recipe'].get('name')})"
    else:
        interpolation, source = cfg.recipe.aug.eval_interpolation, f"recipe={cfg.recipe.name}"
    if cfg.crop_pct is not None:
        crop_pct = cfg.crop_pct
    else:
        crop_pct = trained_crop if trained_crop is not None else cfg.data.crop_pct
    return interpolation, crop_pct, source


class ClassificationTask:
    """``task=classification``: the :class:`~dynconv.engine.tasks.Task` of ImageNet-style classifiers."""

    name = "classification"
    score_key = "eval_top1"
    deployable = True

    def __init__(self, cfg: Union[TrainConfig, EvalConfig]) -> None:
        self.cfg = cfg
        self.mixup: Optional[Any] = None  # timm Mixup / CutMix, when the recipe uses them
        self.criterion: Optional[nn.Module] = None

    # ------------------------------------------------------------------------- what the run is
    def identity(self) -> Dict[str, str]:
        return {"arch": self.cfg.model.name, "conv": self.cfg.conv.name}

    def meta(self, data: TaskData) -> Dict[str, Any]:
        return {"num_classes": data.num_classes, "classes": list(data.classes), "image_size": self.cfg.data.image_size}

    def title(self) -> str:
        return f"{self.cfg.model.name} conv={self.cfg.conv.name}"

    def name_parts(self) -> List[str]:
        return [self.cfg.model.name, self.cfg.conv.name, self.cfg.recipe.name]

    # -------------------------------------------------------------------------------- training
    def build_data(self) -> TaskData:
        return build_data(self.cfg.data, self.cfg.recipe.aug)

    def build_loaders(self, data: TaskData, batch_size: int, workers: int, info: DistInfo) -> Tuple[Any, Any]:
        train = build_loader(data.train, batch_size=batch_size, train=True, workers=workers, seed=self.cfg.seed,
                             world_size=info.world_size, rank=info.rank)
        val = build_loader(data.val, batch_size=self.cfg.trainer.eval_batch_size or batch_size, train=False,
                           workers=workers, world_size=info.world_size, rank=info.rank)
        return train, val

    def build_model(self, data: TaskData, info: DistInfo) -> nn.Module:
        return build_model(self.cfg.model, self.cfg.conv, data.num_classes)

    def count(self, model: nn.Module) -> Tuple[int, Optional[int]]:
        size = self.cfg.data.image_size
        return count_params(model), count_macs(model, (1, 3, size, size))

    def ddp_options(self) -> Dict[str, Any]:
        return {}

    def build_loss(self, data: TaskData) -> None:
        self.mixup, self.criterion = build_mixup_and_loss(self.cfg.recipe.aug, data.num_classes)

    def loss(self, model: nn.Module, inputs: Any, targets: Any, device: torch.device) -> torch.Tensor:
        images, targets = to_device(inputs, device, self.cfg.trainer.channels_last), targets.to(device)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return self.criterion(model(images), targets)

    def layer_progress(self, progress: float) -> float:
        return progress

    # --------------------------------------------------------------------------------- scoring
    def evaluate(self, model: nn.Module, loader: Any, data: TaskData, device: torch.device) -> Dict[str, Any]:
        t = self.cfg.trainer
        return evaluate(model, loader, device=device, amp=t.amp, channels_last=t.channels_last,
                        limit=t.limit_eval_batches)

    def validated(self, row: Dict[str, Any]) -> None:
        pass  # the summary reports the best top-1 only

    def scores(self, row: Mapping[str, Any]) -> str:
        ema = f" ema top-1 {row['eval_ema_top1']:.2f}" if "eval_ema_top1" in row else ""
        return f"eval loss {row['eval_loss']:.4f} top-1 {row['eval_top1']:.2f} top-5 {row['eval_top5']:.2f}{ema}"

    def summary(self, best_score: float) -> Dict[str, Any]:
        return {"best_top1": best_score}

    def state(self) -> Dict[str, Any]:
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Classification writes no task state into a checkpoint (:meth:`state`), so there is nothing to take back."""

    # --------------------------------------------------------------------------------- eval.py
    def prepare_eval(self, state: Optional[Mapping[str, Any]], device: torch.device) -> EvalSubject:
        """The checkpoint's classifier (its BatchNorms folded under ``deploy=true``) and the validation
        images under the transform the run validated with."""
        cfg, t = self.cfg, self.cfg.trainer
        interpolation, crop_pct, transform_source = eval_transform(cfg, state)
        data = build_data(dataclasses.replace(cfg.data, crop_pct=crop_pct), None, eval_interpolation=interpolation)
        warning = check_class_names(state, data.classes, cfg.checkpoint, ignore=cfg.ignore_class_names)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        model = build_model(cfg.model, cfg.conv, data.num_classes)
        loaded = load_for_eval(model, cfg, state, self.identity()) if state is not None \
            else "no checkpoint: a freshly initialised model"
        params, macs = self.count(model)
        folded = None
        if cfg.deploy:  # the inference copy: same outputs, BatchNorms folded (params / MACs above: the paper's count)
            folds: list = []
            size = cfg.data.image_size
            example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
            model = deploy(model.eval(), example, report=folds)
            folded = len(folds)
        model.to(device)
        if t.channels_last:
            to_channels_last(model)
        loader = build_loader(data.val, batch_size=cfg.batch_size or 100, train=False,
                              workers=loader_workers(t.workers))
        facts = {"params": params, "macs": macs, "crop_pct": crop_pct, "interpolation": interpolation,
                 "transform_from": transform_source, "folded": folded}
        return EvalSubject(model, data, loader, loaded, facts)

    def eval_result(self, subject: EvalSubject, metrics: Dict[str, Any], seconds: float,
                    device: torch.device) -> Dict[str, Any]:
        """timm ``validate.py``-style results; with ``bench_batches``, the eval-mode images/s of one batch."""
        cfg, t, facts = self.cfg, self.cfg.trainer, subject.facts
        if not math.isfinite(metrics["loss"]):
            bad = first_non_finite(subject.model)
            where = f" ({bad} holds a NaN or infinity)" if bad else ""
            raise NonFiniteLossError(f"non-finite evaluation loss ({metrics['loss']}) with "
                                     f"{cfg.checkpoint or 'a fresh model'}{where}: these weights cannot be scored")
        result = {
            "model": cfg.model.name, "conv": cfg.conv.name, "checkpoint": cfg.checkpoint, "loaded": subject.loaded,
            "top1": round(metrics["top1"], 3), "top1_err": round(100 - metrics["top1"], 3),
            "top5": round(metrics["top5"], 3), "top5_err": round(100 - metrics["top5"], 3),
            "loss": metrics["loss"], "num_images": metrics["count"],
            "param_count": round(facts["params"] / 1e6, 3), "macs_g": round(facts["macs"] / 1e9, 4),
            "img_size": cfg.data.image_size, "crop_pct": facts["crop_pct"], "interpolation": facts["interpolation"],
            "transform_from": facts["transform_from"], "eval_samples_per_sec": round(metrics["count"] / seconds, 2),
            "device": str(device), "data": cfg.data.name,
        }
        if facts["folded"] is not None:
            result["deployed_norms_folded"] = facts["folded"]
        if cfg.bench_batches:
            images = next(iter(subject.loader))[0]
            result["infer_samples_per_sec"] = round(images_per_second(
                subject.model, images, device=device, amp=t.amp, channels_last=t.channels_last,
                repeats=cfg.bench_batches), 2)
            result["infer_batch_size"] = len(images)
        return result


__all__ = ["ClassificationTask", "check_class_names", "eval_transform"]
