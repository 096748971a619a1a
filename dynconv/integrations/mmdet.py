"""dynconv backbones in mmdetection 3.x: ``type='DynconvBackbone'`` in an mmdet config.

mmdet, mmcv and mmengine are not dynconv dependencies: this is the only dynconv module that imports
them, and ``import dynconv`` never imports it. Run mmdet in its own environment
(``requirements/mmdet.txt``: torch 2.1, mmcv 2.1.0 with compiled ops, mmengine 0.10.x, mmdet 3.3.0),
install dynconv there, and let the config import this module::

    custom_imports = dict(imports=['dynconv.integrations.mmdet'], allow_failed_imports=False)
    model = dict(
        backbone=dict(
            _delete_=True,
            type='DynconvBackbone',
            arch='resnet50',                  # dynconv.list_archs()
            conv='odconv_4x',                 # dynconv.list_convs()
            conv_options=None,                # e.g. dict(reduction=0.0625) or dict(drop_path_rate=0.4)
            out_indices=(0, 1, 2, 3),
            frozen_stages=1,
            norm_eval=True,
            init_cfg=dict(type='Pretrained', checkpoint='checkpoints/odconv4x_resnet50.pth')),
        neck=dict(in_channels=[256, 512, 1024, 2048]))  # DynconvBackbone(...).out_channels
    find_unused_parameters = True

``find_unused_parameters = True`` is needed under DDP (both official repos set it): the frozen
stages' dynamic attention layers, and the levels left out by ``out_indices``, hold parameters that
receive no gradient. ``configs/mmdet/`` holds the official papers' COCO configs written this way.

The checkpoint is an ImageNet classifier: a dynconv training checkpoint or a file of the official
ODConv / KernelWarehouse / DCD / DGC / IC-Conv code. It is loaded by
:meth:`dynconv.detection.DynamicBackbone.load_pretrained` (strictly, classifier dropped) when mmengine
calls ``init_weights()``, and what was loaded is logged. A whole-detector checkpoint is loaded with
mmengine's ``load_from=`` instead.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from mmdet.registry import MODELS
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.model.weight_init import PretrainedInit, initialize, update_init_info

from ..detection.backbone import DynamicBackbone
from ..schedules import set_progress

InitCfg = Union[Mapping[str, Any], Sequence[Mapping[str, Any]], None]

# keys of mmengine's Pretrained init_cfg this backbone understands (use_ema is dynconv's own)
_PRETRAINED_KEYS = {"type", "checkpoint", "map_location", "use_ema", "static"}


@MODELS.register_module()
class DynconvBackbone(BaseModule):
    """``dynconv.create_model(arch, conv)`` as an mmdet backbone (a tuple of feature maps).

    Args:
        arch: a dynconv arch (``resnet18/34/50/101``, ``mobilenetv2_050/075/100``, ``convnext_tiny``).
        conv: a dynconv conv variant (``static``, ``odconv_4x``, ``kw_1x``, ...).
        conv_options: layer options of the variant (``reduction``, ``kernel_num``, ``cell_num_ratio``,
            ...) and timm model options (``drop_path_rate``), as for :func:`dynconv.create_model`.
        out_indices: which of the four levels (strides 4, 8, 16, 32) ``forward`` returns.
        frozen_stages: the stem and this many levels get no gradient and stay in eval mode (-1: none).
        frozen_trainable: substrings of parameter names that keep training inside the frozen levels
            (FDConv's official ``need_grad_list``; see :class:`dynconv.detection.DynamicBackbone`).
        norm_eval: keep every BatchNorm, the attention branches' included, in eval mode in training.
        schedule_progress: the epoch to set schedule-driven layers to (attention temperature, KW
            mixing, DGC pruning); ``None`` leaves them at their end values, which is what fine-tuning
            from ImageNet weights uses. :meth:`set_progress` changes it later.
        pretrained: shortcut for ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)``.
        init_cfg: mmengine init config. ``dict(type='Pretrained', checkpoint=PATH)`` (optionally
            ``use_ema=True``) loads an ImageNet checkpoint in :meth:`init_weights`; with ``static=True``
            the checkpoint is the static arch's (timm or torchvision file, e.g. torchvision's
            ``resnet50-0676ba61.pth``), converted into the dynamic layers by
            :func:`dynconv.pretrained.init_from_static`, as FDConv's official configs start. Other
            types go to mmengine's initialisers.
    """

    def __init__(self, arch: str, conv: str = "static", conv_options: Optional[Mapping[str, Any]] = None,
                 out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = 1,
                 frozen_trainable: Sequence[str] = (), norm_eval: bool = True,
                 schedule_progress: Optional[float] = None, pretrained: Optional[str] = None,
                 init_cfg: InitCfg = None) -> None:
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError("DynconvBackbone: give either pretrained= or init_cfg=, not both")
            init_cfg = dict(type="Pretrained", checkpoint=pretrained)
        super().__init__(init_cfg=copy.deepcopy(init_cfg))
        self.dynconv = DynamicBackbone(arch, conv, frozen_stages=frozen_stages, norm_eval=norm_eval,
                                       frozen_trainable=tuple(frozen_trainable), **dict(conv_options or {}))
        levels = len(self.dynconv.out_channels)
        self.out_indices = tuple(int(i) for i in out_indices)
        if not self.out_indices or any(not 0 <= i < levels for i in self.out_indices):
            raise ValueError(f"DynconvBackbone: out_indices must be a non-empty subset of 0..{levels - 1}, "
                             f"got {tuple(out_indices)}")
        self.schedule_progress = schedule_progress
        # None holds the end values on purpose: the layers then train without warning that nothing drives them
        self.set_progress(float("inf") if schedule_progress is None else schedule_progress)

    @property
    def out_channels(self) -> List[int]:
        """Channels of the returned levels, in order (what the FPN's ``in_channels`` must be)."""
        return [self.dynconv.out_channels[i] for i in self.out_indices]

    def set_progress(self, epoch: float) -> None:
        """Set the schedule-driven layers to their values at ``epoch`` (see :func:`dynconv.set_progress`)."""
        set_progress(self.dynconv.body, float(epoch))

    def init_weights(self) -> None:
        """Run the init_cfg: mmengine initialisers first, then the ImageNet checkpoint (which wins)."""
        if self.is_init:
            print_log(f"init_weights of {type(self).__name__} has been called more than once.",
                      logger="current", level=logging.WARNING)
            return
        cfgs = [self.init_cfg] if isinstance(self.init_cfg, Mapping) else list(self.init_cfg or [])
        pretrained = [c for c in cfgs if c.get("type") in ("Pretrained", PretrainedInit)]
        others = [c for c in cfgs if c not in pretrained]
        if others:
            initialize(self, others)
        for cfg in pretrained:
            self._load_pretrained(cfg)
        if pretrained and self.schedule_progress is not None:
            # a dynconv checkpoint carries its schedule state (the temperature where its run stopped):
            # the configured progress wins over it
            self.set_progress(self.schedule_progress)
        self.is_init = True

    def _load_pretrained(self, cfg: Mapping[str, Any]) -> None:
        unknown = sorted(set(cfg) - _PRETRAINED_KEYS)
        if unknown:
            raise ValueError(f"DynconvBackbone init_cfg {dict(cfg)}: unsupported keys {unknown} (an ImageNet "
                             f"classifier checkpoint is expected; load a detector checkpoint with load_from=)")
        checkpoint = cfg.get("checkpoint")
        if not checkpoint:
            raise ValueError("DynconvBackbone init_cfg of type 'Pretrained' needs checkpoint=PATH")
        if "://" in str(checkpoint):
            raise ValueError(f"DynconvBackbone reads local checkpoint files only; download {checkpoint} first")
        report = self.dynconv.load_pretrained(str(checkpoint), use_ema=bool(cfg.get("use_ema", False)),
                                              static=bool(cfg.get("static", False)))
        print_log(f"DynconvBackbone({self.dynconv.arch}, {self.dynconv.conv}): {report}", logger="current",
                  level=logging.INFO)
        if hasattr(self, "_params_init_info"):  # called from a detector's init_weights: record it
            update_init_info(self, init_info=f"loaded from {checkpoint} by DynamicBackbone.load_pretrained")

    def train(self, mode: bool = True) -> "DynconvBackbone":
        """Train mode that keeps the frozen stages and (with ``norm_eval``) every BatchNorm in eval mode."""
        super().train(mode)
        self.dynconv.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        levels = list(self.dynconv(x).values())
        return tuple(levels[i] for i in self.out_indices)


__all__ = ["DynconvBackbone"]
