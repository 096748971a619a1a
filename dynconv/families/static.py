"""The unmodified backbone: the baseline row of every table."""
from ..official import static_layout
from ..registry import ConvVariant, Family, register_family

STATIC = register_family(Family(
    "static",
    variants=(ConvVariant("static", {}, "the unmodified backbone"),),
    official_layout=static_layout,
    official_repo="OSVAI/ODConv, OSVAI/KernelWarehouse",
))
