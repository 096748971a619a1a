"""DY-Conv: ``K`` kernels mixed per sample by a softmax attention with a temperature.

Chen et al., "Dynamic Convolution: Attention over Convolution Kernels", CVPR 2020, arXiv:1912.03458. Layer:
:class:`~dynconv.ops.dyconv.DynamicConv2d`. Placement: "all convolutional layers except the first" (the paper;
consistent with the 45.47M of DY-Conv (4x) ResNet18): every conv but the stem, downsample included.
"""
import torch

from ..ops.dyconv import DynamicConv2d
from ..pretrained import PretrainedReport, set_param
from ..registry import ConvVariant, Family, register_family
from ..schedules import attention_temperature
from ..surgery.rules import ALL_BUT_STEM


def from_static(layer: DynamicConv2d, path: str, weight: torch.Tensor, bias, report: PretrainedReport) -> None:
    """Every kernel ``W``, every bias ``b``: the softmax weights sum to 1 (exact to rounding)."""
    for i in range(layer.num_kernels):
        set_param(layer.weight[i], weight)
    report.mapped[f"{path}.weight"] = f"{path}.weight in each of {layer.num_kernels} kernels"
    if layer.bias is not None and bias is not None:
        layer.bias.copy_(bias.expand_as(layer.bias))
        report.mapped[f"{path}.bias"] = f"{path}.bias in each of {layer.num_kernels} kernels"
    report.worsen("exact to rounding")


DYCONV = register_family(Family(
    "dyconv",
    layers=(DynamicConv2d,),
    variants=(ConvVariant("dyconv_4x", {"num_kernels": 4}, "DY-Conv, 4 kernels, softmax attention"),),
    rules=ALL_BUT_STEM,
    schedules={"temperature_epochs": ("temperature", attention_temperature)},
    from_static={DynamicConv2d: from_static},
    paper="Chen et al., CVPR 2020, arXiv:1912.03458",
))
