"""From configuration to objects: the classification datasets with the recipe's transforms, the model, the
loss and mixup; and what every task's loaders and models share (worker count, ``model.pretrained``)."""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple, Union

from torch import nn

from ..data.loader import DataBundle, build_datasets
from ..data.transforms import build_transform
from ..models import create_model
from .config import PRETRAINED_TIMM, AugConfig, ConvConfig, DataConfig, ModelConfig


def build_data(data_cfg: DataConfig, aug_cfg: Optional[AugConfig] = None, *,
               eval_interpolation: str = "bilinear") -> DataBundle:
    """Train and val datasets; the train transform follows ``aug_cfg`` (None: the eval transform)."""
    size = data_cfg.image_size
    eval_tf = build_transform(train=False, image_size=size, crop_pct=data_cfg.crop_pct,
                              interpolation=aug_cfg.eval_interpolation if aug_cfg else eval_interpolation)
    train_tf = eval_tf
    if aug_cfg is not None:
        train_tf = build_transform(
            train=True, image_size=size, interpolation=aug_cfg.train_interpolation, scale=tuple(aug_cfg.scale),
            hflip=aug_cfg.hflip, color_jitter=aug_cfg.color_jitter, auto_augment=aug_cfg.auto_augment,
            reprob=aug_cfg.reprob, remode=aug_cfg.remode)
    classes = data_cfg.classes
    if classes is not None and not isinstance(classes, int):
        classes = list(classes)
    return build_datasets(
        data_cfg.name, data_cfg.root, image_size=size, classes=classes,
        train_per_class=data_cfg.train_per_class, val_per_class=data_cfg.val_per_class,
        synthetic_num_classes=data_cfg.num_classes, train_transform=train_tf, eval_transform=eval_tf,
        on_corrupt=data_cfg.on_corrupt, max_bad_fraction=data_cfg.max_bad_fraction)


def loader_workers(requested: int) -> int:
    """``requested`` DataLoader workers, at most one per CPU this process may use (more only add
    start-up time and torch's oversubscription warning; the data are the same either way)."""
    return max(0, min(requested, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def pretrained_source(model_cfg: ModelConfig) -> Optional[Union[bool, str]]:
    """``model.pretrained`` as ``create_model`` takes it: ``True`` for timm's own weights, else a path."""
    pretrained = getattr(model_cfg, "pretrained", None)
    if pretrained is None:
        return None
    return True if str(pretrained) in PRETRAINED_TIMM else os.path.expanduser(str(pretrained))


def build_model(model_cfg: ModelConfig, conv_cfg: ConvConfig, num_classes: int) -> nn.Module:
    """``dynconv.create_model`` with the config's dropout, drop path and options."""
    options = {**dict(model_cfg.kwargs), **dict(conv_cfg.options)}
    if model_cfg.drop_rate:
        options["drop_rate"] = model_cfg.drop_rate
    if model_cfg.drop_path_rate:
        options["drop_path_rate"] = model_cfg.drop_path_rate
        options["drop_path_mode"] = model_cfg.drop_path_mode
    if pretrained_source(model_cfg) is not None:
        options["pretrained"] = pretrained_source(model_cfg)
    try:
        return create_model(model_cfg.name, conv_cfg.name, num_classes=num_classes, **options)
    except TypeError as err:  # an option neither the conv family nor timm takes
        raise ValueError(f"model={model_cfg.name} conv={conv_cfg.name}: an option in conv.options / "
                         f"model.kwargs is not accepted ({err})") from err


def build_mixup_and_loss(aug_cfg: AugConfig, num_classes: int) -> Tuple[Optional[Any], nn.Module]:
    """timm Mixup/CutMix (with label smoothing inside) and the matching loss, as the recipes use them."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if aug_cfg.mixup > 0 or aug_cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=aug_cfg.mixup, cutmix_alpha=aug_cfg.cutmix, prob=aug_cfg.mixup_prob,
                      switch_prob=aug_cfg.mixup_switch_prob, mode=aug_cfg.mixup_mode,
                      label_smoothing=aug_cfg.smoothing, num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if aug_cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=aug_cfg.smoothing)
    return None, nn.CrossEntropyLoss()
