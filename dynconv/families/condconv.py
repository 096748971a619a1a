"""CondConv: a mixture of expert kernels routed per sample by ``sigmoid(GAP(x) R)``.

Yang et al., "CondConv: Conditionally Parameterized Convolutions for Efficient Inference", NeurIPS 2019,
arXiv:1904.04971. Layer: :class:`~dynconv.ops.condconv.CondConv2d`.

Placement. The paper gives no ResNet rule; it places CondConv layers in the later layers of a network, where
they help most (its Sections 4-5). The two tables that list CondConv (8x) on a ResNet fix the rule by their
parameter counts, and no single rule meets both:

- ResNet18, 81.35M (ODConv paper ImageNet table; KernelWarehouse paper): no whole-stage rule meets it (every conv
  but the stem 89.8M, every block conv 88.6M, the last two stages 83.9M, the last stage 69.5M). Every block conv
  except the stage-4 entry conv ``layer4.0.conv1`` gives 80.36M (-1.2%): the rule for BasicBlock ResNets (18/34),
  the closest found.
- ResNet50, +90.0M over the static Faster R-CNN (ODConv paper COCO table, as the FDConv README reprints it): the
  block convs of the last stage (``layer4``) with 8 experts give +89.98M, exact to the table's rounding; the
  ResNet18 rule would give +141.2M. That is the rule for Bottleneck ResNets (50/101), in line with the CondConv
  paper's placement in the final layers.

Elsewhere CondConv follows DY-Conv's rule (every conv but the stem).
"""
import torch
from torch import nn

from ..ops.condconv import CondConv2d
from ..pretrained import SYMMETRY_NOISE, PretrainedReport
from ..registry import ConvVariant, Family, register_family
from ..schedules import attention_temperature
from ..surgery.rules import ALL_BUT_STEM
from ..surgery.sites import RESNET, ConvSite


def _resnet_rule(site: ConvSite) -> bool:
    if site.block_kind == "bottleneck":
        return site.role == "block" and site.stage == 3
    return site.role == "block" and not (site.stage == 3 and site.block == 0 and site.position == 0)


def from_static(layer: CondConv2d, path: str, weight: torch.Tensor, bias, report: PretrainedReport) -> None:
    """Routing 0 (every expert weighted 1/2 for every input), experts ``2/K W`` plus zero-sum noise that breaks
    their symmetry: the layer computes ``W`` (exact to rounding)."""
    k = layer.num_experts
    nn.init.zeros_(layer.routing.weight)
    nn.init.zeros_(layer.routing.bias)  # every routing weight sigmoid(0) = 1/2, for every input
    report.adjusted[f"{path}.routing.weight"] = "0"
    report.adjusted[f"{path}.routing.bias"] = "0"
    share = weight.to(layer.weight.dtype) * (2.0 / k)
    noise = torch.randn_like(layer.weight) * (SYMMETRY_NOISE * share.std().clamp_min(1e-12))
    layer.weight.copy_(share + (noise - noise.mean(0, keepdim=True)))  # the 1/2-weighted sum is W
    report.mapped[f"{path}.weight"] = f"2/{k} * {path}.weight + zero-sum noise (std {SYMMETRY_NOISE} rel.)"
    if layer.bias is not None:
        layer.bias.copy_((bias if bias is not None else torch.zeros_like(layer.bias[0])).expand_as(layer.bias)
                         * (2.0 / k))
        report.mapped[f"{path}.bias"] = f"2/{k} * {path}.bias"
    report.worsen("exact to rounding")
    report.note("CondConv: routing starts at 0 (every expert weighted 1/2 for every input; official init: "
                "random), experts 2/K W plus zero-sum noise that breaks their symmetry")


CONDCONV = register_family(Family(
    "condconv",
    layers=(CondConv2d,),
    variants=(ConvVariant("condconv_8x", {"num_experts": 8}, "CondConv, 8 experts, sigmoid routing"),),
    rules={**ALL_BUT_STEM, RESNET: _resnet_rule},
    schedules={"temperature_epochs": ("temperature", attention_temperature)},
    from_static={CondConv2d: from_static},
    paper="Yang et al., NeurIPS 2019, arXiv:1904.04971",
))
