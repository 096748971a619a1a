"""Object detection and instance segmentation on dynconv backbones (torchvision R-CNNs, COCO metrics).

:func:`create_detector` builds Faster / Mask R-CNN with FPN on any arch and conv variant;
:class:`DynamicBackbone` is the backbone alone (levels, frozen stages, ImageNet checkpoints);
:mod:`.coco_eval` scores predictions with pycocotools. mmdet users: :mod:`dynconv.integrations.mmdet`.
"""
from .backbone import DynamicBackbone, level_channels
from .detectors import DETECTORS, FeaturePyramidBackbone, create_detector

__all__ = ["DETECTORS", "DynamicBackbone", "FeaturePyramidBackbone", "create_detector", "level_channels"]
