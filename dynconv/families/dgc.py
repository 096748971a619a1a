"""DGC: dynamic group convolution, ``heads`` saliency-gated heads each reading a per-sample subset of channels.

Su et al., "Dynamic Group Convolution for Accelerating Convolutional Neural Networks", ECCV 2020,
arXiv:2007.04242; official code zhuogege1943/dgc. Layer: :class:`~dynconv.ops.dgc.DGCConv2d`.

Placement as ``dyresnet18``: both BasicBlock convs and the downsample 1x1 (stem and fc static); every block conv
of a Bottleneck likewise. No official model exists for MobileNetV2 or ConvNeXt; there DGC takes the dense
pointwise convs (as in the official CondenseNet-DGC, whose 1x1 bottleneck convs are the dynamic ones) and the
depthwise convs stay static. Convs whose widths do not divide by the number of heads, or grouped convs, stay
static on any backbone. The layer's internal BN-ReLU belongs to post-activation ResNets (and generic CNNs);
MobileNetV2 and ConvNeXt convs already see normalised, activated inputs, so there it is off.
"""
from typing import Any, Dict

import torch
from torch import nn

from ..fresh_statistics import use_batch_statistics_until_trained
from ..official import DGC as DGC_FORMAT, Layout, only_on, same_shape
from ..ops.dgc import DGCConv2d
from ..pretrained import PretrainedReport, copy_bias, mark_statistics_loaded, set_param
from ..registry import ConvVariant, Family, register_family
from ..schedules import dgc_pruning
from ..surgery.convert import check_options, replace_sites
from ..surgery.rules import roles
from ..surgery.sites import CONVNEXT, GENERIC, MOBILENETV2, RESNET

RULES = {
    RESNET: roles("block", "downsample"),
    MOBILENETV2: roles("pw_expand", "pw_project", "head"),
    CONVNEXT: roles("pw"),
    GENERIC: roles("conv"),
}


def place(model, sites, backbone, options):
    """The rule's dense convs whose widths divide by ``heads``."""
    options = dict(options)
    options.setdefault("preactivation", backbone in (RESNET, GENERIC))
    check_options(DGCConv2d, options)
    heads = options.get("heads", 4)
    rule = RULES[backbone]

    def chosen(site, module):
        return (isinstance(module, nn.Conv2d) and rule(site) and module.groups == 1
                and module.in_channels % heads == 0 and module.out_channels % heads == 0)

    return replace_sites(model, sites, chosen, lambda site, module: DGCConv2d.from_conv(module, **options))


def prepare(model: nn.Module, options: Dict[str, Any]) -> None:
    """DGC multiplies by its input: fresh BatchNorms use batch statistics until trained
    (:func:`~dynconv.fresh_statistics.use_batch_statistics_until_trained`)."""
    use_batch_statistics_until_trained(model)


def official_layout(model: nn.Module, backbone: str) -> Layout:
    """``dyresnet18``: torchvision names; the BatchNorm after a DGC downsample sits one level deeper, at
    ``downsample.1.norm``."""
    only_on("dgc", backbone, RESNET)
    renames = {f"{name}.1": f"{name}.1.norm" for name, m in model.named_modules()
               if name.endswith(".downsample") and isinstance(m[0], DGCConv2d)}
    return Layout(DGC_FORMAT, renames, same_shape)


def from_static(layer: DGCConv2d, path: str, weight: torch.Tensor, bias, report: PretrainedReport) -> None:
    """Head ``h`` takes rows ``h::heads`` of ``W``; saliency ``fc2`` weight 0 (bias 1, the official init: every
    gate is 1); the internal BatchNorm an identity (exact in eval mode with nothing pruned)."""
    for h, head in enumerate(layer.head_modules()):
        set_param(head.conv.weight, weight[h::layer.heads])  # head h computes output channels h, h + heads, ...
        report.mapped[f"{path}.headconv_{h}.conv.weight"] = f"{path}.weight[{h}::{layer.heads}]"
        nn.init.zeros_(head.fc2.weight)
        nn.init.constant_(head.fc2.bias, 1.0)  # the official bias init: saliency ReLU(1) = 1 everywhere
        report.adjusted[f"{path}.headconv_{h}.fc2.weight"] = "0 (saliency 1)"
    norm = layer.norm
    if norm is not None:  # eval-mode identity; its input is already post-ReLU in the ResNet blocks
        nn.init.ones_(norm.weight)
        nn.init.zeros_(norm.bias)
        norm.running_mean.zero_()
        norm.running_var.fill_(1.0 - norm.eps)
        for key in ("weight", "bias", "running_mean", "running_var"):
            report.adjusted[f"{path}.norm.{key}"] = "identity in eval mode"
        mark_statistics_loaded(norm)
        report.worsen("eval mode only")
        report.note("DGC: the layer's own pre-activation BatchNorm is an identity in eval mode (its input is "
                    "post-ReLU in the ResNets, so the ReLU is one too); in training mode it normalises with batch "
                    "statistics, which the static network does not")
    report.note("DGC: head h takes rows h::heads of W, saliency fc2 weight 0 and bias 1 (every gate 1; official "
                "weight init: random); nothing is pruned before the pruning stage (progress <= 1/12 of the run)")
    copy_bias(layer, path, bias, report)


DGC = register_family(Family(
    "dgc",
    layers=(DGCConv2d,),
    variants=(ConvVariant("dgc", {"heads": 4, "pruning_rate": 0.55},
                          "DGC, 4 heads each dropping 55% of the input channels per sample"),),
    rules=RULES,
    placement=place,
    schedules={"total_epochs": ("schedule", dgc_pruning)},
    prepare=prepare,
    official_layout=official_layout,
    official_repo="zhuogege1943/dgc",
    from_static={DGCConv2d: from_static},
    paper="Su et al., ECCV 2020, arXiv:2007.04242",
))
