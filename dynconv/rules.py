"""Which layers each conv family makes dynamic, per backbone, as the official code does.

- ODConv (OSVAI/ODConv): ResNet block convs only (stem, downsample and fc static); MobileNetV2 every
  conv of the inverted-residual blocks plus the final 1x1 (stem and classifier static).
  ConvNeXt has no official ODConv model; we treat it like ResNet: the block convs (depthwise 7x7
  and both pointwise convs), stem and downsample static.
- DY-Conv (paper: "all convolutional layers except the first"; consistent with the 45.47M of
  DY-Conv (4x) ResNet18): every conv but the stem, downsample included.
- CondConv: the paper gives no ResNet rule. The 81.35M of "CondConv (8x)" ResNet18 in the ODConv
  table is not met by any whole-stage rule (every conv but the stem: 89.8M, every block conv:
  88.6M, the last two stages: 83.9M). Every block conv except the stage-4 entry conv
  ``layer4.0.conv1`` gives 80.4M (-1.2%); that is the rule used here, chosen to match the table.
  Elsewhere CondConv follows DY-Conv's rule.
- KernelWarehouse has its own plan with warehouse names (:mod:`dynconv.ops.kernelwarehouse`).
- Generic CNNs (any other model): every ``nn.Conv2d`` but the first one (the stem).
"""
from __future__ import annotations

from typing import Callable, Dict

from .backbones import CONVNEXT, GENERIC, MOBILENETV2, RESNET, ConvSite

SiteRule = Callable[[ConvSite], bool]


def roles(*names: str) -> SiteRule:
    return lambda site: site.role in names


def _condconv_resnet(site: ConvSite) -> bool:
    return site.role == "block" and not (site.stage == 3 and site.block == 0 and site.position == 0)


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
}
