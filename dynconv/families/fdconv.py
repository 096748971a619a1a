"""FDConv: frequency-disjoint kernels from one Fourier-domain weight, with kernel spatial and frequency band
modulation.

Chen et al., "Frequency Dynamic Convolution for Dense Image Prediction", CVPR 2025, arXiv:2503.18783; official
code Linwei-Chen/FDConv. Layer: :class:`~dynconv.ops.fdconv.FDConv2d`.

Placement as ``FDConv_detection/mmdet_custom/resnet.py`` (``ResNet_FDConv``): the layer is built wherever
``conv_cfg`` reaches, the stem conv and every Bottleneck conv (the downsample conv is built with ``cfg=None``:
static), and the official ``FDConv`` itself stays a plain conv unless ``min(C_in, C_out) > 16`` and the kernel
size is 1 or 3 (``use_fdconv_if_c_gt``, ``use_fdconv_if_k_in``; the 7x7 RGB stem never qualifies;
``use_fdconv_if_stride_in`` is accepted but never read, so the stride-2 3x3s are converted too). Here the site
rule says "block convs" and the placement applies the size test, together the official set: all 48 Bottleneck
convs of ResNet-50 (+3.65M). No official model exists for BasicBlock ResNets, MobileNetV2 or ConvNeXt; the same
two tests are applied to the analogous convs: every BasicBlock conv; MobileNetV2's expansion, projection and
final 1x1 convs (the depthwise 3x3s are grouped, which FDW's full kernel matrix cannot hold); ConvNeXt's pointwise
MLP convs (the depthwise 7x7s fail both tests).
"""
import torch
from torch import nn

from ..official import FDCONV as FDCONV_FORMAT, Layout, only_on, same_shape
from ..ops.fdconv import FDConv2d
from ..pretrained import PretrainedReport, copy_bias
from ..registry import ConvVariant, Family, register_family
from ..surgery.convert import check_options, replace_sites
from ..surgery.rules import roles
from ..surgery.sites import CONVNEXT, GENERIC, MOBILENETV2, RESNET

RULES = {
    RESNET: roles("block"),
    MOBILENETV2: roles("pw_expand", "pw_project", "head"),
    CONVNEXT: roles("pw"),
    GENERIC: roles("conv"),
}


def place(model, sites, backbone, options):
    """The official ``FDConv`` size test on top of the site rule: ``groups == 1``, ``min(C_in, C_out) >
    use_fdconv_if_c_gt`` (16) and a square kernel of a size in ``use_fdconv_if_k_in`` (1, 3); other convs stay
    static (official ``FDConv.__init__`` returns before building anything and ``forward`` falls back to
    ``nn.Conv2d``'s; ``groups == 1`` because FDW transforms the whole kernel matrix)."""
    options = dict(options)
    c_gt = options.pop("use_fdconv_if_c_gt", 16)
    k_in = tuple(options.pop("use_fdconv_if_k_in", (1, 3)))
    check_options(FDConv2d, options)
    rule = RULES[backbone]

    def chosen(site, module):
        return (isinstance(module, nn.Conv2d) and rule(site) and module.groups == 1
                and min(module.in_channels, module.out_channels) > c_gt
                and module.kernel_size[0] == module.kernel_size[1] and module.kernel_size[0] in k_in)

    return replace_sites(model, sites, chosen, lambda site, module: FDConv2d.from_conv(module, **options))


def official_layout(model: nn.Module, backbone: str) -> Layout:
    """``ResNet_FDConv``: torchvision names; FDConv layers keep ``dft_weight``, ``KSM_Global.*``, ``KSM_Local.*``
    and ``FBM.*``."""
    only_on("fdconv", backbone, RESNET)
    return Layout(FDCONV_FORMAT, {}, same_shape)


def from_static(layer: FDConv2d, path: str, weight: torch.Tensor, bias, report: PretrainedReport) -> None:
    """``dft_weight = rfft2(M(W)) / (min(C_in, C_out) // 2)`` (the official ``tools/convert_to_fdconv.py``);
    the heads, the local KSM conv and the FBM maps with zero weights: every ``2 sigmoid`` factor is 1, the kernel
    attention ``1/n`` (exact to rounding: the FFT round trip, FBM's bands)."""
    layer.set_kernel(weight)
    report.mapped[f"{path}.dft_weight"] = (f"rfft2 of {path}.weight as a (C_out k, C_in k) matrix "
                                           "/ (min(C_in, C_out) // 2)")
    # The official conversion stops at dft_weight. Its heads then start at their init: normal(0, 1e-6)
    # weights (each factor 1 to about 1e-5) except the filter head, whose kaiming weights the official
    # _initialize_weights never reaches: 2 sigmoid(z) of a random z, so the converted net does not start at
    # the static function. Zero weights make every factor exactly 1 (biases are 0 already).
    heads = [f"KSM_Global.{name}" for name in ("channel_fc", "filter_fc", "spatial_fc", "kernel_fc")
             if getattr(layer.KSM_Global, name) is not None]
    if layer.KSM_Local is not None:
        heads.append("KSM_Local.conv")
    if layer.FBM is not None:
        heads += [f"FBM.freq_weight_conv_list.{i}" for i in range(len(layer.FBM.freq_weight_conv_list))]
    for name in heads:
        conv = layer.get_submodule(name)
        nn.init.zeros_(conv.weight)
        report.adjusted[f"{path}.{name}.weight"] = "0"
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
            report.adjusted[f"{path}.{name}.bias"] = "0"
    copy_bias(layer, path, bias, report)
    report.worsen("exact to rounding")
    report.note("FDConv: dft_weight from the static kernel (official conversion); the attention heads, the local "
                "KSM conv and the FBM maps start at 0 (every factor 1, kernel attention 1/n; official init: "
                "1e-6 noise, and a random filter head that the official conversion leaves in place)")


FDCONV = register_family(Family(
    "fdconv",
    layers=(FDConv2d,),
    variants=(ConvVariant("fdconv", {"kernel_num": 64},
                          "FDConv, 64 frequency-disjoint kernels with KSM and FBM (the official detection setting)"),),
    rules=RULES,
    placement=place,
    options=("use_fdconv_if_c_gt", "use_fdconv_if_k_in"),
    official_layout=official_layout,
    official_repo="Linwei-Chen/FDConv",
    from_static={FDConv2d: from_static},
    paper="Chen et al., CVPR 2025, arXiv:2503.18783",
))
