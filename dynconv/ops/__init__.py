"""Drop-in replacements for ``nn.Conv2d``, one file per family, and the shared batched hot path."""
from ._base import DynamicConv2dBase
from .attention_baselines import make_residual_attention
from .condconv import CondConv2d
from .dcd import DCDConv2d, DCDLinear
from .dgc import DGCConv2d
from .dyconv import DYAttention, DynamicConv2d
from .fdconv import FDConv2d
from .functional import mix_kernels, per_sample_conv2d
from .odconv import ODAttention, ODConv2d

__all__ = [
    "CondConv2d",
    "DCDConv2d",
    "DCDLinear",
    "DGCConv2d",
    "DYAttention",
    "DynamicConv2dBase",
    "DynamicConv2d",
    "FDConv2d",
    "ODAttention",
    "ODConv2d",
    "make_residual_attention",
    "mix_kernels",
    "per_sample_conv2d",
]
