"""Optimizer and learning-rate schedule of a recipe, built with timm's factories.

The recipes fix the learning rate at a reference global batch (ODConv README: 0.1 at 256; KernelWarehouse
``main.py``: 4e-3 "with total batch size 4096", no scaling code). A run with another global batch scales it
linearly (the linear scaling rule, Goyal et al. 2017); at the reference batch nothing changes.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn


def scaled_lr(optimizer_cfg: Any, global_batch: int) -> float:
    """The recipe's learning rate for a run whose global batch is ``global_batch``."""
    return optimizer_cfg.lr * global_batch / optimizer_cfg.lr_batch


def weight_decay_groups(model: nn.Module, weight_decay: float, decay_1d: bool,
                        no_decay_keys: Sequence[str] = (), decay_keys: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """Two parameter groups, with and without weight decay, chosen by shape and by name.

    ``decay_1d=False`` leaves biases and 1-D parameters undecayed (timm's and the KernelWarehouse
    ``optim_factory.py`` rule). A name containing one of ``no_decay_keys`` is never decayed: mmcv's
    ``paramwise_cfg=dict(custom_keys={key: dict(decay_mult=0.)})`` matches keys as substrings of the
    parameter name (mmcv ``DefaultOptimizerConstructor.add_params``), so the KernelWarehouse COCO configs'
    ``'norm'`` key spares the KW attention's ``norm1`` but no ResNet / MobileNetV2 BatchNorm (``bn1``...).
    A name containing one of ``decay_keys`` is always decayed, for parameters the official model keeps with
    more dimensions than timm's (KW ConvNeXt's layer scale is ``[1, C, 1, 1]``: ``models/kw_convnext.py``).
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = decay_1d or (param.ndim > 1 and not name.endswith(".bias"))
        if any(key in name for key in no_decay_keys):
            decayed = False
        elif any(key in name for key in decay_keys):
            decayed = True
        (decay if decayed else no_decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model: nn.Module, optimizer_cfg: Any, global_batch: int) -> torch.optim.Optimizer:
    """A timm optimizer with the recipe's weight-decay exclusions (:func:`weight_decay_groups`)."""
    kwargs = {}
    name = optimizer_cfg.name.lower()
    if "adam" in name or "lamb" in name:
        kwargs.update(betas=tuple(optimizer_cfg.betas), eps=optimizer_cfg.eps)
    no_decay_keys = list(getattr(optimizer_cfg, "no_decay_keys", ()) or ())
    decay_keys = list(getattr(optimizer_cfg, "decay_keys", ()) or ())
    if no_decay_keys or decay_keys:
        groups = weight_decay_groups(model, optimizer_cfg.weight_decay, optimizer_cfg.decay_1d,
                                     no_decay_keys, decay_keys)
        return create_optimizer_v2(groups, opt=name, lr=scaled_lr(optimizer_cfg, global_batch),
                                   weight_decay=optimizer_cfg.weight_decay, momentum=optimizer_cfg.momentum, **kwargs)
    return create_optimizer_v2(
        model,
        opt=name,
        lr=scaled_lr(optimizer_cfg, global_batch),
        weight_decay=optimizer_cfg.weight_decay,
        momentum=optimizer_cfg.momentum,
        filter_bias_and_bn=not optimizer_cfg.decay_1d,
        **kwargs,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, scheduler_cfg: Any, epochs: int,
                    updates_per_epoch: int) -> Scheduler:
    """A timm scheduler stepped by :func:`apply_schedule`, in epochs or in updates as the recipe says.

    A cosine schedule decays after its warm-up (``warmup_prefix``), so a run with 20 warm-up epochs
    of 300 decays over the last 280, reaching ``min_lr`` at the end, as the ConvNeXt code does; step
    milestones stay where the recipe puts them, warm-up or not, as in mmdet's 1x schedule (500
    warm-up iterations, decays at epochs 8 and 11).
    """
    per_iter = scheduler_cfg.per_iteration
    unit = updates_per_epoch if per_iter else 1
    warmup_t = scheduler_cfg.warmup_steps or round(scheduler_cfg.warmup_epochs * unit)
    warmup = dict(warmup_t=warmup_t, warmup_lr_init=scheduler_cfg.warmup_lr,
                  warmup_prefix=scheduler_cfg.name == "cosine", t_in_epochs=not per_iter)
    name = scheduler_cfg.name
    if name == "cosine":
        decay_t = round((epochs - scheduler_cfg.warmup_epochs) * unit)
        return CosineLRScheduler(optimizer, t_initial=max(decay_t, 1), lr_min=scheduler_cfg.min_lr, **warmup)
    if name == "step":
        # timm's MultiStep decays once t + 1 reaches a milestone, one epoch (or update) before the
        # official code (``lr * 0.1 ** (epoch // 30)``, 0-based epochs); shift to match it.
        milestones = [round(m * unit) + 1 for m in scheduler_cfg.milestones]
        return MultiStepLRScheduler(optimizer, decay_t=milestones, decay_rate=scheduler_cfg.decay_rate, **warmup)
    if name == "constant":
        return MultiStepLRScheduler(optimizer, decay_t=[], decay_rate=1.0, **warmup)
    raise ValueError(f"recipe.scheduler.name={name!r}; choose one of: step, cosine, constant")


def apply_schedule(scheduler: Scheduler, epoch: int, global_step: int) -> None:
    """Set the learning rate for the update about to happen (a pure function of the position)."""
    if scheduler.t_in_epochs:
        scheduler.step(epoch)
    else:
        scheduler.step_update(global_step)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return optimizer.param_groups[0]["lr"]
