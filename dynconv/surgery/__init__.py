"""Backbone surgery: where each backbone's convolutions sit (:mod:`.sites`), which of them a conv family makes
dynamic (:mod:`.rules`, and the per-family placement plans :mod:`.kernelwarehouse`, :mod:`.icconv`,
:mod:`.attention`), and the in-place replacement itself (:mod:`.convert`). Layers (:mod:`dynconv.ops`) know no
backbone; everything that does lives here."""
from .convert import VARIANT_ATTR, ConvertReport, convert
from .sites import CONVNEXT, GENERIC, MOBILENETV2, RESNET, ConvSite, conv_sites, detect_backbone

__all__ = ["CONVNEXT", "GENERIC", "MOBILENETV2", "RESNET", "VARIANT_ATTR", "ConvSite", "ConvertReport",
           "conv_sites", "convert", "detect_backbone"]
