"""ODConv: four attentions (kernel, filter, input channel, spatial) over ``n`` kernels.

Li, Zhou, Yao, "Omni-Dimensional Dynamic Convolution", ICLR 2022, arXiv:2209.07947; official code OSVAI/ODConv.
Layer: :class:`~dynconv.ops.odconv.ODConv2d`. Placement as the official models: ResNet block convs only (stem,
downsample and fc static); MobileNetV2 every conv of the inverted-residual blocks plus the final 1x1 (stem and
classifier static). ConvNeXt has no official ODConv model; we treat it like ResNet: the block convs (depthwise
7x7 and both pointwise convs), stem and downsample static.
"""
import torch
from torch import nn

from ..official import odconv_layout
from ..ops.odconv import ODConv2d
from ..pretrained import PretrainedReport, copy_bias, set_param
from ..registry import ConvVariant, Family, register_family
from ..schedules import attention_temperature
from ..surgery.rules import roles
from ..surgery.sites import CONVNEXT, GENERIC, MOBILENETV2, RESNET


def from_static(layer: ODConv2d, path: str, weight: torch.Tensor, bias, report: PretrainedReport) -> None:
    """Every kernel ``2^h W``, the ``h`` sigmoid heads (channel, filter, spatial) with zero weights and biases:
    each attention is exactly 1/2 at any temperature (exact; to rounding with several kernels)."""
    att = layer.attention
    heads = 0
    for name in ("channel_fc", "filter_fc", "spatial_fc"):
        fc = getattr(att, name)
        if fc is not None:  # sigmoid(0 / T) = 1/2 at every temperature
            nn.init.zeros_(fc.weight)
            nn.init.zeros_(fc.bias)
            report.adjusted[f"{path}.attention.{name}.weight"] = "0"
            report.adjusted[f"{path}.attention.{name}.bias"] = "0"
            heads += 1
    scale = float(2 ** heads)  # a power of two: the product with the halves is exact in floating point
    for i in range(layer.kernel_num):
        set_param(layer.weight[i], weight * scale)
    report.mapped[f"{path}.weight"] = f"{scale:g} * {path}.weight in each of {layer.kernel_num} kernels"
    copy_bias(layer, path, bias, report)
    if layer.kernel_num > 1:
        report.worsen("exact to rounding")  # the softmax weights sum to 1 up to rounding
    report.note("ODConv: channel / filter / spatial heads start at 0 (each attention exactly 1/2 at any "
                "temperature; official init: random), kernels 2^h W; the kernel attention keeps its official init")


ODCONV = register_family(Family(
    "odconv",
    layers=(ODConv2d,),
    variants=(
        ConvVariant("odconv_1x", {"kernel_num": 1}, "ODConv, 1 kernel, four attentions"),
        ConvVariant("odconv_2x", {"kernel_num": 2}, "ODConv, 2 kernels"),
        ConvVariant("odconv_4x", {"kernel_num": 4}, "ODConv, 4 kernels"),
    ),
    rules={
        RESNET: roles("block"),
        MOBILENETV2: roles("pw_expand", "dw", "pw_project", "head"),
        CONVNEXT: roles("dw", "pw"),
        GENERIC: roles("conv"),
    },
    schedules={"temperature_epochs": ("temperature", attention_temperature)},
    official_layout=odconv_layout,
    official_repo="OSVAI/ODConv",
    from_static={ODConv2d: from_static},
    paper="Li, Zhou, Yao, ICLR 2022, arXiv:2209.07947",
))
