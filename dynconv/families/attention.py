"""SE, CBAM and ECA on every residual branch: the attention baselines of the ResNet tables.

Hu et al., CVPR 2018, arXiv:1709.01507; Woo et al., ECCV 2018, arXiv:1807.06521; Wang et al., CVPR 2020,
arXiv:1910.03151. The modules: :mod:`dynconv.ops.attention_baselines`; where they go:
:mod:`dynconv.surgery.attention`.
"""
from ..registry import ConvVariant, Family, register_family
from ..surgery.attention import insert_residual_attention


def _place(model, sites, backbone, options):
    return insert_residual_attention(model, backbone, **options)


ATTENTION = register_family(Family(
    "attention",
    variants=(
        ConvVariant("se", {"kind": "se"}, "squeeze-and-excitation on each residual branch (r=16)"),
        ConvVariant("cbam", {"kind": "cbam"}, "CBAM channel + spatial gates on each residual branch"),
        ConvVariant("eca", {"kind": "eca"}, "ECA 1-D channel attention on each residual branch"),
    ),
    placement=_place,
    paper="Hu et al. 2018 (SE); Woo et al. 2018 (CBAM); Wang et al. 2020 (ECA)",
))
