"""DCD: dynamic channel fusion, ``out = Lambda(x) conv_W0(x) + P(BN(Phi(x) z) + z)`` with ``z = Q^T x``.

Li et al., "Revisiting Dynamic Convolution via Matrix Decomposition", ICLR 2021, arXiv:2103.08756; official code
liyunsheng13/dcd. Layers: :class:`~dynconv.ops.dcd.DCDConv2d` and the dynamic classifier
:class:`~dynconv.ops.dcd.DCDLinear`.

Placement as the official models: ResNet block convs (BasicBlock convs with the 2x2-pool attention, Bottleneck
convs with the 1x1 one), stem and downsample static; MobileNetV2 the expansion and projection 1x1 convs of the
expansion-6 blocks (first block, depthwise convs, stem and final 1x1 static); and the classifier becomes DCD's
dynamic one. ConvNeXt has no official DCD model; we treat it like MobileNetV2: the pointwise MLP convs dynamic,
the depthwise 7x7 static.
"""
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..fresh_statistics import use_batch_statistics_until_trained
from ..models import use_dynamic_head
from ..official import dcd_layout
from ..ops.dcd import DCDConv2d, DCDLinear, mobilenetv2_dims
from ..pretrained import PretrainedReport, copy_bias, set_param
from ..registry import ConvVariant, Family, register_family
from ..surgery.convert import check_options, replace_sites
from ..surgery.rules import roles
from ..surgery.sites import CONVNEXT, GENERIC, MOBILENETV2, RESNET, ConvSite


def _mobilenetv2_rule(site: ConvSite) -> bool:
    # The projection of an expansion block is its third conv; the first block has only two.
    return site.role == "pw_expand" or (site.role == "pw_project" and site.position == 2)


RULES = {RESNET: roles("block"), MOBILENETV2: _mobilenetv2_rule, CONVNEXT: roles("pw"), GENERIC: roles("conv")}


def _layer_options(site: ConvSite, conv: nn.Conv2d, backbone: str, bottlenecks: set,
                   fc_squeeze: int) -> Dict[str, Any]:
    """Per-layer shapes of the official DCD models: 2x2 pooling in ResNet BasicBlocks, the DYModule
    rule on MobileNetV2, the Bottleneck (1x1 pool) rule elsewhere."""
    if backbone == RESNET:
        return {"pool": 1 if (site.stage, site.block) in bottlenecks else 2}
    if backbone == MOBILENETV2:
        pool, latent, squeeze = mobilenetv2_dims(conv.in_channels, conv.out_channels, fc_squeeze)
        return {"pool": pool, "latent_dim": latent, "squeeze": squeeze}
    return {}


def place(model, sites, backbone, options):
    """The rule's convs with their per-layer shapes, and the classifier (``dynamic_classifier``)."""
    options = dict(options)
    fc_squeeze = options.pop("fc_squeeze", 8)
    dynamic_classifier = options.pop("dynamic_classifier", True)
    check_options(DCDConv2d, options)
    rule = RULES[backbone]
    bottlenecks = {(s.stage, s.block) for s in sites if s.role == "block" and s.position == 2}

    def chosen(site, module):
        return (isinstance(module, nn.Conv2d) and rule(site)) or (
            isinstance(module, nn.Linear) and site.role == "classifier" and dynamic_classifier)

    def build(site, module):
        if isinstance(module, nn.Linear):
            return DCDLinear.from_linear(module)
        layer_options = {**_layer_options(site, module, backbone, bottlenecks, fc_squeeze), **options}
        return DCDConv2d.from_conv(module, **layer_options)

    return replace_sites(model, sites, chosen, build)


def prepare(model: nn.Module, options: Dict[str, Any]) -> None:
    """DCD's classifier stays DCD's after ``reset_classifier``; fresh BatchNorms use batch statistics (DCD
    multiplies by its input, see :func:`~dynconv.fresh_statistics.use_batch_statistics_until_trained`)."""
    if use_dynamic_head(model, "dcd"):
        classifier = model.get_classifier()
        model._dynconv_dynamic_classifier = isinstance(classifier, DCDLinear) or (
            not isinstance(classifier, nn.Linear) and options.get("dynamic_classifier", True))
    use_batch_statistics_until_trained(model)


def rebuild_classifier(model: nn.Module, new: nn.Linear) -> Optional[nn.Module]:
    """The new classifier is DCD's dynamic one again (official ``DYCls``), not a plain Linear."""
    return DCDLinear.from_linear(new) if getattr(model, "_dynconv_dynamic_classifier", False) else None


def from_static(layer: DCDConv2d, path: str, weight: torch.Tensor, bias, report: PretrainedReport) -> None:
    """``W0 = W``, ``Lambda = 1`` (``fc_scale`` zero, ``hsigmoid(0) = 1``), ``P = 0`` (exact)."""
    set_param(layer.conv.weight, weight)
    report.mapped[f"{path}.conv.weight"] = f"{path}.weight (W0)"
    nn.init.zeros_(layer.fc_scale.weight)  # Lambda = hsigmoid(0) = relu6(3) / 3 = 1
    nn.init.zeros_(layer.p.weight)  # the dynamic residual P(...) starts at zero
    report.adjusted[f"{path}.fc_scale.weight"] = "0 (Lambda = 1)"
    report.adjusted[f"{path}.p.weight"] = "0 (residual P Phi Q^T x = 0)"
    copy_bias(layer, path, bias, report)
    report.note("DCD: W0 = W, fc_scale and P start at 0 (Lambda = 1, no residual; official init: random)")


def linear_from_static(layer: DCDLinear, path: str, weight: torch.Tensor, bias, report: PretrainedReport) -> None:
    set_param(layer.cls.weight, weight)
    report.mapped[f"{path}.cls.weight"] = f"{path}.weight"
    if bias is not None:
        set_param(layer.cls.bias, bias)
        report.mapped[f"{path}.cls.bias"] = f"{path}.bias"
    nn.init.zeros_(layer.fc_scale.weight)
    nn.init.zeros_(layer.cls_p.weight)
    report.adjusted[f"{path}.fc_scale.weight"] = "0 (Lambda = 1)"
    report.adjusted[f"{path}.cls_p.weight"] = "0 (residual = 0)"


def classifier_names(path: str):
    """DCD's dynamic classifier has three ``num_classes``-wide layers."""
    return (f"{path}.cls", f"{path}.cls_p", f"{path}.fc_scale")


DCD = register_family(Family(
    "dcd",
    layers=(DCDConv2d, DCDLinear),
    variants=(ConvVariant("dcd", {}, "DCD, dynamic channel scaling plus a low-rank dynamic residual"),),
    rules=RULES,
    placement=place,
    options=("fc_squeeze", "dynamic_classifier"),
    prepare=prepare,
    rebuild_classifier=rebuild_classifier,
    official_layout=dcd_layout,
    official_repo="liyunsheng13/dcd",
    from_static={DCDConv2d: from_static, DCDLinear: linear_from_static},
    timm_names=lambda variant, arch, first_conv, classifier: (first_conv, classifier_names(classifier)),
    width_layers={DCDLinear: classifier_names},
    paper="Li et al., ICLR 2021, arXiv:2103.08756",
))
