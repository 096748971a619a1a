"""Which layers each conv family makes dynamic, per backbone, as the official code does.

- ODConv (OSVAI/ODConv): ResNet block convs only (stem, downsample and fc static); MobileNetV2 every
  conv of the inverted-residual blocks plus the final 1x1 (stem and classifier static).
  ConvNeXt has no official ODConv model; we treat it like ResNet: the block convs (depthwise 7x7
  and both pointwise convs), stem and downsample static.
- DY-Conv (paper: "all convolutional layers except the first"; consistent with the 45.47M of
  DY-Conv (4x) ResNet18): every conv but the stem, downsample included.
- CondConv: the paper (Yang et al., NeurIPS 2019) gives no ResNet rule; it places CondConv layers in the
  later layers of a network, where they help most (its Sections 4-5). The two tables that list CondConv
  (8x) on a ResNet fix the rule by their parameter counts, and no single rule meets both:
  * ResNet18, 81.35M (ODConv paper ImageNet table; KernelWarehouse paper): no whole-stage rule meets it
    (every conv but the stem 89.8M, every block conv 88.6M, the last two stages 83.9M, the last stage
    69.5M). Every block conv except the stage-4 entry conv ``layer4.0.conv1`` gives 80.36M (-1.2%): the
    rule for BasicBlock ResNets (18/34), the closest found.
  * ResNet50, +90.0M over the static Faster R-CNN (ODConv paper COCO table, as the FDConv README
    reprints it): the block convs of the last stage (``layer4``) with 8 experts give +89.98M, exact to
    the table's rounding; the ResNet18 rule would give +141.2M. That is the rule for Bottleneck ResNets
    (50/101), in line with the CondConv paper's placement in the final layers.
  Elsewhere CondConv follows DY-Conv's rule.
- DCD (liyunsheng13/dcd): ResNet block convs (BasicBlock convs with the 2x2-pool attention,
  Bottleneck convs with the 1x1 one), stem and downsample static; MobileNetV2 the expansion and
  projection 1x1 convs of the expansion-6 blocks (first block, depthwise convs, stem and final 1x1
  static); and the classifier becomes DCD's dynamic one. ConvNeXt has no official DCD model; we treat
  it like MobileNetV2: the pointwise MLP convs dynamic, the depthwise 7x7 static.
- DGC (zhuogege1943/dgc ``dyresnet18``): both BasicBlock convs and the downsample 1x1 (stem and fc
  static); every block conv of a Bottleneck likewise. No official model exists for MobileNetV2 or
  ConvNeXt; there DGC takes the dense pointwise convs (as in the official CondenseNet-DGC, whose
  1x1 bottleneck convs are the dynamic ones) and the depthwise convs stay static. Convs whose widths
  do not divide by the number of heads, or grouped convs, stay static on any backbone.
- FDConv (Linwei-Chen/FDConv ``FDConv_detection/mmdet_custom/resnet.py``, ``ResNet_FDConv``): the layer is
  built wherever ``conv_cfg`` reaches, the stem conv and every Bottleneck conv (the downsample conv is built
  with ``cfg=None``: static), and the official ``FDConv`` itself stays a plain conv unless
  ``min(C_in, C_out) > 16`` and the kernel size is 1 or 3 (``use_fdconv_if_c_gt``, ``use_fdconv_if_k_in``; the
  7x7 RGB stem never qualifies; ``use_fdconv_if_stride_in`` is accepted but never read, so the stride-2
  3x3s are converted too). Here the site rule says "block convs" and the converter applies the size test
  (:mod:`dynconv.surgery.convert`), together the official set: all 48 Bottleneck convs of ResNet-50 (+3.65M). No
  official model exists for BasicBlock ResNets, MobileNetV2 or ConvNeXt; the same two tests are applied to
  the analogous convs: every BasicBlock conv; MobileNetV2's expansion, projection and final 1x1 convs (the
  depthwise 3x3s are grouped, which FDW's full kernel matrix cannot hold); ConvNeXt's pointwise MLP convs
  (the depthwise 7x7s fail both tests).
- KernelWarehouse has its own plan with warehouse names (:mod:`dynconv.surgery.kernelwarehouse`).
- Generic CNNs (any other model): every ``nn.Conv2d`` but the first one (the stem).
"""
from __future__ import annotations

from typing import Callable, Dict

from .sites import CONVNEXT, GENERIC, MOBILENETV2, RESNET, ConvSite

SiteRule = Callable[[ConvSite], bool]


def roles(*names: str) -> SiteRule:
    return lambda site: site.role in names


def _condconv_resnet(site: ConvSite) -> bool:
    if site.block_kind == "bottleneck":
        return site.role == "block" and site.stage == 3
    return site.role == "block" and not (site.stage == 3 and site.block == 0 and site.position == 0)


def _dcd_mobilenetv2(site: ConvSite) -> bool:
    # The projection of an expansion block is its third conv; the first block has only two.
    return site.role == "pw_expand" or (site.role == "pw_project" and site.position == 2)


_ALL_BUT_STEM = {
    RESNET: roles("block", "downsample"),
    MOBILENETV2: roles("pw_expand", "dw", "pw_project", "head"),
    CONVNEXT: roles("dw", "pw", "downsample"),
    GENERIC: roles("conv"),
}

LAYER_RULES: Dict[str, Dict[str, SiteRule]] = {
    "odconv": {
        RESNET: roles("block"),
        MOBILENETV2: roles("pw_expand", "dw", "pw_project", "head"),
        CONVNEXT: roles("dw", "pw"),
        GENERIC: roles("conv"),
    },
    "dyconv": _ALL_BUT_STEM,
    "condconv": {**_ALL_BUT_STEM, RESNET: _condconv_resnet},
    "dcd": {
        RESNET: roles("block"),
        MOBILENETV2: _dcd_mobilenetv2,
        CONVNEXT: roles("pw"),
        GENERIC: roles("conv"),
    },
    "fdconv": {
        RESNET: roles("block"),
        MOBILENETV2: roles("pw_expand", "pw_project", "head"),
        CONVNEXT: roles("pw"),
        GENERIC: roles("conv"),
    },
    "dgc": {
        RESNET: roles("block", "downsample"),
        MOBILENETV2: roles("pw_expand", "pw_project", "head"),
        CONVNEXT: roles("pw"),
        GENERIC: roles("conv"),
    },
}
