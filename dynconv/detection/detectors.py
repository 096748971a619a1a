"""Faster R-CNN and Mask R-CNN with FPN (torchvision's implementations) on a dynconv backbone.

The head settings are torchvision's, which match mmdet's R-CNN 1x configs in what the papers report
(``reference/ecosystem.md`` §4.2, §4.5): 256-channel FPN with a max-pooled extra level, anchors 32-512
at ratios 0.5/1/2, RoIAlign 7 (boxes) and 14 (masks), ImageNet mean/std normalisation.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .backbone import DynamicBackbone, PathLike

DETECTORS = ("faster_rcnn", "mask_rcnn")


class FeaturePyramidBackbone(nn.Module):
    """A :class:`DynamicBackbone` followed by an FPN; what torchvision's R-CNNs take as ``backbone``.

    ``out_channels`` (the FPN width) is the attribute torchvision's detectors read.
    """

    def __init__(self, body: DynamicBackbone, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.out_channels), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(self.body(x))


def create_detector(detector: str, arch: str, conv: str = "static", *, num_classes: int = 91,
                    min_size: Union[int, Sequence[int]] = 800, max_size: int = 1333, frozen_stages: int = 1,
                    norm_eval: bool = True, backbone_checkpoint: Optional[PathLike] = None,
                    backbone_use_ema: bool = False, fpn_channels: int = 256,
                    detector_options: Optional[Dict[str, Any]] = None, **options: Any) -> nn.Module:
    """A torchvision Faster / Mask R-CNN with FPN on ``arch`` with ``conv`` layers.

    Args:
        detector: ``"faster_rcnn"`` or ``"mask_rcnn"``.
        arch, conv, options: the backbone, as for :func:`dynconv.create_model`.
        num_classes: object classes plus background.
        min_size, max_size: the resize of torchvision's ``GeneralizedRCNNTransform``; a sequence of
            ``min_size`` values picks one at random per training batch (multi-scale training) and
            evaluates at the last.
        frozen_stages, norm_eval, backbone_checkpoint, backbone_use_ema: see :class:`DynamicBackbone`
            (``checkpoint``, ``use_ema``); what the checkpoint gave is in ``model.backbone.body.load_report``.
        fpn_channels: the FPN width.
        detector_options: anything else torchvision's ``FasterRCNN`` / ``MaskRCNN`` take (e.g.
            ``box_batch_size_per_image``, ``rpn_post_nms_top_n_train``); their defaults are mmdet's 1x.
    """
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose one of: {', '.join(DETECTORS)}")
    body = DynamicBackbone(arch, conv, frozen_stages=frozen_stages, norm_eval=norm_eval,
                           checkpoint=backbone_checkpoint, use_ema=backbone_use_ema, **options)
    backbone = FeaturePyramidBackbone(body, fpn_channels)
    sizes = tuple(min_size) if isinstance(min_size, Sequence) else (min_size,)
    cls = MaskRCNN if detector == "mask_rcnn" else FasterRCNN
    return cls(backbone, num_classes=num_classes, min_size=sizes, max_size=max_size, **(detector_options or {}))


__all__ = ["DETECTORS", "FeaturePyramidBackbone", "create_detector"]
