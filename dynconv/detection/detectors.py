"""Faster R-CNN and Mask R-CNN with FPN (torchvision's implementations) on a dynconv backbone, set up as
the mmdetection 2.x R-CNN 1x configs the papers ran.

The ODConv configs (OSVAI/ODConv ``object_detection/configs/odconv/*.py``) and the KernelWarehouse ones
(OSVAI/KernelWarehouse ``detection/configs/_base_/models/mask_rcnn_r50_fpn.py``) carry mmdet 2.x's
``configs/_base_/models/{faster,mask}_rcnn_r50_fpn.py`` settings unchanged. Where torchvision's defaults
differ, :func:`create_detector` sets mmdet's value:

- RPN training proposals per image after NMS: 1000 (``train_cfg.rpn_proposal.max_per_img``; torchvision 2000);
- RPN and R-CNN box regression losses: L1 (``loss_bbox=dict(type='L1Loss', loss_weight=1.0)``; torchvision
  uses smooth L1 with beta 1/9), with the same normalisation (summed over the positives, divided by the
  number of sampled anchors or RoIs);
- RoIAlign ``sampling_ratio=0``: adaptive, ``ceil(RoI size / output size)`` points per bin (torchvision: 2);
- Mask R-CNN's R-CNN assigner ``match_low_quality=True`` (Faster R-CNN's is False, like torchvision's).

All other head settings of those configs are torchvision's defaults already; :data:`MMDET_RCNN_1X` passes
them explicitly anyway, so the values are in one place. The differences that remain (RoIAlign alignment,
anchor rounding, head initialisation, ...) are listed in the README's detection section.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..registry import family_of
from .backbone import DynamicBackbone, PathLike

DETECTORS = ("faster_rcnn", "mask_rcnn")

# torchvision ``FasterRCNN`` / ``MaskRCNN`` arguments with the values of mmdet 2.x
# ``configs/_base_/models/{faster,mask}_rcnn_r50_fpn.py`` (identical in the ODConv and KernelWarehouse configs).
MMDET_RCNN_1X: Dict[str, Any] = dict(
    # train_cfg.rpn_proposal: nms_pre=2000 (per level, as torchvision's), max_per_img=1000 (per image), nms 0.7
    rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000,
    # test_cfg.rpn: nms_pre=1000, max_per_img=1000
    rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000,
    rpn_nms_thresh=0.7,
    # train_cfg.rpn: MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, match_low_quality=True),
    # RandomSampler(num=256, pos_fraction=0.5)
    rpn_fg_iou_thresh=0.7, rpn_bg_iou_thresh=0.3, rpn_batch_size_per_image=256, rpn_positive_fraction=0.5,
    # train_cfg.rcnn: MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.5), RandomSampler(num=512, pos_fraction=0.25,
    # add_gt_as_proposals=True; torchvision always adds the ground truth)
    box_fg_iou_thresh=0.5, box_bg_iou_thresh=0.5, box_batch_size_per_image=512, box_positive_fraction=0.25,
    # test_cfg.rcnn: score_thr=0.05, nms iou_threshold=0.5, max_per_img=100
    box_score_thresh=0.05, box_nms_thresh=0.5, box_detections_per_img=100,
    # bbox_head.bbox_coder target_stds (0.1, 0.1, 0.2, 0.2): torchvision's weights are their inverses
    bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
)
# roi_layer=dict(type='RoIAlign', output_size=7 / 14, sampling_ratio=0) of the box / mask RoI extractors
ROI_ALIGN_SAMPLING_RATIO = 0
# train_cfg.rcnn.assigner.match_low_quality: True in mask_rcnn_r50_fpn.py, False in faster_rcnn_r50_fpn.py
ROI_LOW_QUALITY_MATCHES = {"faster_rcnn": False, "mask_rcnn": True}


class FeaturePyramidBackbone(nn.Module):
    """A :class:`DynamicBackbone` followed by an FPN; what torchvision's R-CNNs take as ``backbone``.

    ``out_channels`` (the FPN width) is the attribute torchvision's detectors read. The extra level is a
    stride-2 max pool of the last one, as mmdet's ``FPN(num_outs=5)`` without extra convs.
    """

    def __init__(self, body: DynamicBackbone, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.out_channels), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(self.body(x))


class L1RegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with mmdet's L1 box loss (``rpn_head.loss_bbox=dict(type='L1Loss')``).

    Normalised as mmdet's ``AnchorHead.loss`` (``avg_factor`` = sampled anchors) and torchvision's: the
    L1 distance summed over the positive anchors' deltas, divided by the number of sampled anchors.
    """

    @classmethod
    def like(cls, rpn: RegionProposalNetwork) -> "L1RegionProposalNetwork":
        """The same RPN (same modules, thresholds and proposal counts) with the L1 box loss."""
        return cls(rpn.anchor_generator, rpn.head, rpn.proposal_matcher.high_threshold,
                   rpn.proposal_matcher.low_threshold, rpn.fg_bg_sampler.batch_size_per_image,
                   rpn.fg_bg_sampler.positive_fraction, dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n),
                   rpn.nms_thresh, rpn.score_thresh)

    def compute_loss(self, objectness: torch.Tensor, pred_bbox_deltas: torch.Tensor, labels: List[torch.Tensor],
                     regression_targets: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        positive, negative = self.fg_bg_sampler(labels)
        positive = torch.cat(positive).nonzero().squeeze(1)
        sampled = torch.cat([positive, torch.cat(negative).nonzero().squeeze(1)])
        targets = torch.cat(regression_targets)
        box_loss = F.l1_loss(pred_bbox_deltas[positive], targets[positive], reduction="sum") / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], torch.cat(labels)[sampled])
        return objectness_loss, box_loss


def fastrcnn_l1_loss(box_regression: torch.Tensor, labels: Sequence[torch.Tensor],
                     regression_targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """The R-CNN box loss of mmdet's ``BBoxHead.loss`` with ``L1Loss``: class-specific deltas of the positive
    RoIs against their targets, summed, divided by the number of sampled RoIs (``avg_factor``)."""
    labels_all = torch.cat(list(labels))
    targets = torch.cat(list(regression_targets))
    positive = (labels_all > 0).nonzero().squeeze(1)
    deltas = box_regression.reshape(box_regression.shape[0], -1, 4)[positive, labels_all[positive]]
    return F.l1_loss(deltas, targets[positive], reduction="sum") / labels_all.numel()


class L1RoIHeads(RoIHeads):
    """torchvision's R-CNN heads with mmdet's L1 box loss (``bbox_head.loss_bbox=dict(type='L1Loss')``).

    torchvision computes the box loss in ``forward`` with a module-level function; this subclass keeps
    that ``forward`` and replaces its ``loss_box_reg`` by :func:`fastrcnn_l1_loss` of the same sampled
    RoIs, read from ``select_training_samples`` and the box predictor's output.
    """

    @classmethod
    def like(cls, heads: RoIHeads) -> "L1RoIHeads":
        """The same heads (same modules, matcher, sampler and test settings) with the L1 box loss."""
        new = cls(heads.box_roi_pool, heads.box_head, heads.box_predictor, heads.proposal_matcher.high_threshold,
                  heads.proposal_matcher.low_threshold, heads.fg_bg_sampler.batch_size_per_image,
                  heads.fg_bg_sampler.positive_fraction, heads.box_coder.weights, heads.score_thresh,
                  heads.nms_thresh, heads.detections_per_img, mask_roi_pool=heads.mask_roi_pool,
                  mask_head=heads.mask_head, mask_predictor=heads.mask_predictor,
                  keypoint_roi_pool=heads.keypoint_roi_pool, keypoint_head=heads.keypoint_head,
                  keypoint_predictor=heads.keypoint_predictor)
        new.proposal_matcher.allow_low_quality_matches = heads.proposal_matcher.allow_low_quality_matches
        return new

    def select_training_samples(self, proposals: Any, targets: Any) -> Any:
        sampled = super().select_training_samples(proposals, targets)
        self._sampled = sampled  # (proposals, matched_idxs, labels, regression_targets) of this step
        return sampled

    def forward(self, features: Any, proposals: Any, image_shapes: Any, targets: Any = None) -> Any:
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        outputs: Dict[str, Any] = {}
        hook = self.box_predictor.register_forward_hook(lambda module, args, out: outputs.update(out=out))
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            hook.remove()
        _, _, labels, regression_targets = self._sampled
        del self._sampled
        losses["loss_box_reg"] = fastrcnn_l1_loss(outputs["out"][1], labels, regression_targets)
        return result, losses


def create_detector(detector: str, arch: str, conv: str = "static", *, num_classes: int = 91,
                    min_size: Union[int, Sequence[int]] = 800, max_size: int = 1333, frozen_stages: int = 1,
                    frozen_trainable: Sequence[str] = (), norm_eval: bool = True,
                    backbone_checkpoint: Optional[PathLike] = None,
                    backbone_use_ema: bool = False, fpn_channels: int = 256,
                    detector_options: Optional[Mapping[str, Any]] = None, **options: Any) -> nn.Module:
    """A torchvision Faster / Mask R-CNN with FPN on ``arch`` with ``conv`` layers, configured as mmdet's 1x.

    Args:
        detector: ``"faster_rcnn"`` or ``"mask_rcnn"``.
        arch, conv, options: the backbone, as for :func:`dynconv.create_model` (``drop_path_rate``,
            ``drop_path_mode``, layer options). IC-Conv without ``patterns``: the official ResNet50/101
            patterns of the task (yifan123/IC-Conv README model zoo: the detection files for Faster
            R-CNN, the segmentation files for Mask R-CNN).
        num_classes: object classes plus background.
        min_size, max_size: the resize of torchvision's ``GeneralizedRCNNTransform``; a sequence of
            ``min_size`` values picks one at random per training image (multi-scale training) and
            evaluates at the last.
        frozen_stages, frozen_trainable, norm_eval, backbone_checkpoint, backbone_use_ema: see
            :class:`DynamicBackbone`
            (``checkpoint``, ``use_ema``); what the checkpoint gave is in ``model.backbone.body.load_report``.
        fpn_channels: the FPN width.
        detector_options: torchvision ``FasterRCNN`` / ``MaskRCNN`` arguments over :data:`MMDET_RCNN_1X`
            (e.g. ``box_batch_size_per_image``, ``rpn_post_nms_top_n_train``, ``box_roi_pool``).

    The RPN and R-CNN heads are :class:`L1RegionProposalNetwork` and :class:`L1RoIHeads` (torchvision's,
    with mmdet's L1 box losses; same parameters and state dict keys), the RoIAligns sample adaptively,
    and Mask R-CNN's R-CNN matcher allows low-quality matches, as mmdet's configs.
    """
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose one of: {', '.join(DETECTORS)}")
    options = _task_defaults(detector, arch, conv, options)
    body = DynamicBackbone(arch, conv, frozen_stages=frozen_stages, frozen_trainable=frozen_trainable,
                           norm_eval=norm_eval, checkpoint=backbone_checkpoint, use_ema=backbone_use_ema, **options)
    backbone = FeaturePyramidBackbone(body, fpn_channels)
    sizes = tuple(min_size) if isinstance(min_size, Sequence) else (min_size,)
    levels = [str(i) for i in range(len(body.out_channels))]
    settings: Dict[str, Any] = {
        **MMDET_RCNN_1X,
        "box_roi_pool": MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=ROI_ALIGN_SAMPLING_RATIO)}
    if detector == "mask_rcnn":
        settings["mask_roi_pool"] = MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=ROI_ALIGN_SAMPLING_RATIO)
    settings.update(detector_options or {})
    cls = MaskRCNN if detector == "mask_rcnn" else FasterRCNN
    model = cls(backbone, num_classes=num_classes, min_size=sizes, max_size=max_size, **settings)
    model.rpn = L1RegionProposalNetwork.like(model.rpn)
    model.roi_heads = L1RoIHeads.like(model.roi_heads)
    model.roi_heads.proposal_matcher.allow_low_quality_matches = ROI_LOW_QUALITY_MATCHES[detector]
    return model


def _task_defaults(detector: str, arch: str, conv: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """What the family's official models of the detector's task set (IC-Conv: that task's pattern file), under
    the options given."""
    family = family_of(conv)
    if family.task_defaults is None:
        return options
    return {**family.task_defaults(arch, "segmentation" if detector == "mask_rcnn" else "detection"), **options}


__all__ = ["DETECTORS", "FeaturePyramidBackbone", "L1RegionProposalNetwork", "L1RoIHeads", "MMDET_RCNN_1X",
           "ROI_ALIGN_SAMPLING_RATIO", "ROI_LOW_QUALITY_MATCHES", "create_detector", "fastrcnn_l1_loss"]
