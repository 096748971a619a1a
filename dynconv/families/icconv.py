"""Inception convolution: output channels split into groups with their own dilation, from a searched pattern.

Liu et al., "Inception Convolution with Efficient Dilation Search", CVPR 2021, arXiv:2012.13587; official code
yifan123/IC-Conv. Layer: :class:`~dynconv.ops.icconv.InceptionConv2d`; placement and default patterns:
:mod:`dynconv.surgery.icconv`; pattern files: :mod:`dynconv.patterns`; the dilation search: :mod:`dynconv.edo`.
"""
import torch
from torch import nn

from ..official import ICCONV as ICCONV_FORMAT, Layout, only_on, same_shape
from ..ops.icconv import InceptionConv2d
from ..pretrained import PretrainedReport, copy_bias, set_param
from ..registry import ConvVariant, Family, register_family
from ..surgery.icconv import convert_icconv, official_task_patterns
from ..surgery.sites import RESNET


def official_layout(model: nn.Module, backbone: str) -> Layout:
    """``ic_resnet*``: torchvision names; an Inception conv keeps the official ``conv_list.{j}`` member convs."""
    only_on("icconv", backbone, RESNET)
    return Layout(ICCONV_FORMAT, {}, same_shape)


def from_static(layer: InceptionConv2d, path: str, weight: torch.Tensor, bias, report: PretrainedReport) -> None:
    """Every member takes its output rows of ``W`` (exact for the members at the static dilation; the other
    dilations read other pixels: not preserved)."""
    other = 0
    for j, (conv, member) in enumerate(zip(layer.conv_list, layer.members)):
        set_param(conv.weight, weight[member.start:member.stop])
        report.mapped[f"{path}.conv_list.{j}.weight"] = f"{path}.weight[{member.start}:{member.stop}]"
        if member.dilation != layer.dilation and max(layer.kernel_size) > 1:
            other += member.stop - member.start
    copy_bias(layer, path, bias, report)
    if other:
        report.worsen("not preserved")
        report.notes.append(f"{path}: {other} of {layer.out_channels} output channels use another dilation "
                            f"than the static {layer.dilation}: same taps, other pixels")


def task_defaults(arch: str, task: str) -> dict:
    """The pattern file the official models of ``task`` use on ``arch`` (ResNet50 / 101 only)."""
    name = official_task_patterns(arch, task)
    return {"patterns": name} if name else {}


ICCONV = register_family(Family(
    "icconv",
    layers=(InceptionConv2d,),
    variants=(ConvVariant("icconv", {}, "Inception convolution: per-channel dilation patterns from a pattern file",
                          timm_name="ic"),),
    placement=convert_icconv,
    options=("patterns", "grid", "impl"),
    layer_options=False,
    official_layout=official_layout,
    official_repo="yifan123/IC-Conv",
    from_static={InceptionConv2d: from_static},
    task_defaults=task_defaults,
    paper="Liu et al., CVPR 2021, arXiv:2012.13587",
))
