"""The torchvision R-CNNs are configured as the mmdet 2.x R-CNN 1x configs the papers ran.

The official values come from mmdet 2.x ``configs/_base_/models/faster_rcnn_r50_fpn.py`` and
``mask_rcnn_r50_fpn.py``, which the official configs copy unchanged: OSVAI/ODConv
``object_detection/configs/odconv/{faster,mask}_rcnn_r50_fpn_1x_coco.py`` (model dict written out in full)
and OSVAI/KernelWarehouse ``detection/configs/_base_/models/mask_rcnn_r50_fpn.py``.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.ops import MultiScaleRoIAlign

from dynconv.detection import create_detector
from dynconv.detection.detectors import L1RegionProposalNetwork, L1RoIHeads

TINY = dict(num_classes=3, min_size=64, max_size=96, frozen_stages=-1, norm_eval=False)


@pytest.fixture(scope="module")
def built():
    return {d: create_detector(d, "resnet18", "static", **TINY) for d in ("faster_rcnn", "mask_rcnn")}


@pytest.mark.parametrize("detector", ["faster_rcnn", "mask_rcnn"])
def test_rpn_proposal_counts_are_mmdets(built, detector):
    """train_cfg.rpn_proposal: nms_pre=2000, max_per_img=1000, nms 0.7; test_cfg.rpn: nms_pre=1000,
    max_per_img=1000 ({faster,mask}_rcnn_r50_fpn_1x_coco.py). torchvision keeps 2000 after NMS in training."""
    rpn = built[detector].rpn
    rpn.train()
    assert (rpn.pre_nms_top_n(), rpn.post_nms_top_n()) == (2000, 1000)
    rpn.eval()
    assert (rpn.pre_nms_top_n(), rpn.post_nms_top_n()) == (1000, 1000)
    assert rpn.nms_thresh == 0.7
    # train_cfg.rpn: MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, match_low_quality=True),
    # RandomSampler(num=256, pos_fraction=0.5)
    matcher, sampler = rpn.proposal_matcher, rpn.fg_bg_sampler
    assert (matcher.high_threshold, matcher.low_threshold, matcher.allow_low_quality_matches) == (0.7, 0.3, True)
    assert (sampler.batch_size_per_image, sampler.positive_fraction) == (256, 0.5)


@pytest.mark.parametrize("detector", ["faster_rcnn", "mask_rcnn"])
def test_rcnn_settings_are_mmdets(built, detector):
    """train_cfg.rcnn and test_cfg.rcnn, bbox_coder target_stds, roi_layer sampling_ratio=0 and
    match_low_quality (True in mask_rcnn_r50_fpn_1x_coco.py, False in faster_rcnn_r50_fpn_1x_coco.py)."""
    heads = built[detector].roi_heads
    matcher, sampler = heads.proposal_matcher, heads.fg_bg_sampler
    assert (matcher.high_threshold, matcher.low_threshold) == (0.5, 0.5)
    assert matcher.allow_low_quality_matches is (detector == "mask_rcnn")
    assert (sampler.batch_size_per_image, sampler.positive_fraction) == (512, 0.25)
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.05, 0.5, 100)
    # target_stds (0.1, 0.1, 0.2, 0.2): torchvision multiplies the deltas by their inverses
    assert tuple(heads.box_coder.weights) == (10.0, 10.0, 5.0, 5.0)
    assert heads.box_roi_pool.sampling_ratio == 0 and heads.box_roi_pool.output_size == (7, 7)
    assert heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    if detector == "mask_rcnn":
        assert heads.mask_roi_pool.sampling_ratio == 0 and heads.mask_roi_pool.output_size == (14, 14)


@pytest.mark.parametrize("detector", ["faster_rcnn", "mask_rcnn"])
def test_same_parameters_as_torchvisions_detector(built, detector):
    """The L1 heads are torchvision's modules: a torchvision checkpoint's keys fit, and nothing is added."""
    model = built[detector]
    cls = MaskRCNN if detector == "mask_rcnn" else FasterRCNN
    reference = cls(model.backbone, num_classes=3)
    assert list(model.state_dict()) == list(reference.state_dict())
    assert [p.shape for p in model.parameters()] == [p.shape for p in reference.parameters()]


def test_detector_options_still_override(built):
    model = create_detector("faster_rcnn", "resnet18", "static", **TINY,
                            detector_options={"rpn_post_nms_top_n_train": 600, "box_batch_size_per_image": 64})
    model.train()
    assert model.rpn.post_nms_top_n() == 600 and model.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    assert isinstance(model.rpn, L1RegionProposalNetwork) and isinstance(model.roi_heads, L1RoIHeads)


def test_rpn_box_loss_is_l1_over_sampled_anchors(built):
    """rpn_head.loss_bbox=dict(type='L1Loss', loss_weight=1.0), averaged over the sampled anchors
    (mmdet AnchorHead.loss avg_factor = num_total_pos + num_total_neg)."""
    rpn = built["faster_rcnn"].rpn
    labels = [torch.tensor([1.0, 0.0, 1.0, -1.0]), torch.tensor([0.0, 1.0])]  # -1: ignored, never sampled
    targets = [torch.tensor([[0.5, -0.5, 0.0, 2.0], [9.0, 9.0, 9.0, 9.0], [0.05, 0.0, 0.0, 0.0],
                             [9.0, 9.0, 9.0, 9.0]]), torch.tensor([[9.0, 9.0, 9.0, 9.0], [0.0, 0.0, -1.0, 0.0]])]
    deltas = torch.zeros(6, 4)
    objectness = torch.zeros(6, 1)
    torch.manual_seed(0)
    objectness_loss, box_loss = rpn.compute_loss(objectness, deltas, labels, targets)
    # positives: anchors 0, 2 and 5; |targets| summed = 3.0 + 0.05 + 1.0; sampled: 5 of 6 (anchor 3 ignored)
    assert box_loss.item() == pytest.approx((3.0 + 0.05 + 1.0) / 5)
    assert objectness_loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())  # logits 0


class _ConstantPredictor(nn.Module):
    """Class logits 0 and the same box deltas for every RoI and class."""

    def __init__(self, num_classes: int, delta: float) -> None:
        super().__init__()
        self.num_classes, self.delta = num_classes, delta

    def forward(self, x: torch.Tensor):
        n = x.shape[0]
        return torch.zeros(n, self.num_classes), torch.full((n, 4 * self.num_classes), self.delta)


def test_rcnn_box_loss_is_l1_over_sampled_rois(built):
    """bbox_head.loss_bbox=dict(type='L1Loss', loss_weight=1.0) on class-specific deltas of the positive
    RoIs, divided by all sampled RoIs (mmdet BBoxHead.loss avg_factor=bbox_targets.size(0)); deltas encoded
    with target_stds (0.1, 0.1, 0.2, 0.2)."""
    reference = built["faster_rcnn"].roi_heads
    heads = L1RoIHeads.like(reference)
    heads.box_roi_pool = MultiScaleRoIAlign(["0"], 7, sampling_ratio=0)
    heads.box_head = nn.Flatten()
    heads.box_predictor = _ConstantPredictor(2, 0.25)
    heads.train()
    features = {"0": torch.zeros(1, 1, 32, 32)}
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    # proposal 1: the ground truth moved 2 px right (IoU 0.905, positive); proposal 2: background.
    # torchvision (and mmdet, add_gt_as_proposals=True) also uses the ground truth itself as a proposal.
    proposals = [torch.tensor([[12.0, 10.0, 52.0, 50.0], [100.0, 100.0, 120.0, 120.0]])]
    targets = [{"boxes": gt, "labels": torch.tensor([1])}]
    _, losses = heads(features, proposals, [(128, 128)], targets)
    # targets: ground truth (0, 0, 0, 0); proposal 1: dx = 10 * (30 - 32) / 40 = -0.5, others 0.
    # L1 of the constant 0.25: 4 * 0.25 + (0.75 + 3 * 0.25) = 2.5, over 3 sampled RoIs.
    assert losses["loss_box_reg"].item() == pytest.approx(2.5 / 3)
    smooth_l1 = (4 * (0.25 - 0.5 / 9) + (0.75 - 0.5 / 9) + 3 * (0.25 - 0.5 / 9)) / 3
    assert losses["loss_box_reg"].item() != pytest.approx(smooth_l1)  # torchvision's default loss differs
    assert not hasattr(heads, "_sampled")  # nothing kept between steps


def test_mask_rcnn_trains_and_predicts_with_the_l1_heads(built):
    model = built["mask_rcnn"]
    model.train()
    torch.manual_seed(0)
    images = [torch.rand(3, 64, 80)]
    masks = torch.zeros(1, 64, 80, dtype=torch.uint8)
    masks[0, 10:40, 20:60] = 1
    targets = [{"boxes": torch.tensor([[20.0, 10.0, 60.0, 40.0]]), "labels": torch.tensor([2]), "masks": masks}]
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert model.roi_heads.box_predictor.bbox_pred.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert set(out[0]) == {"boxes", "labels", "scores", "masks"}
