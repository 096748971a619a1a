"""Drop-in replacements for ``nn.Conv2d``, one file per family, and the shared batched hot path.

A family's file states its method (its layer and its attention); the layers describe their per-sample
kernels (:mod:`dynconv.ops.kernels`) and hand them to :func:`per_sample_conv2d`, which owns the speed and
memory machinery (``functional``, ``_matmul``, ``_cells``, ``_unfolded``, ``_recompute``) and reads its
measured thresholds from ``_cpu_tuning``.
"""
from ._base import DynamicConv2dBase
from .attention_baselines import make_residual_attention
from .condconv import CondConv2d
from .dcd import DCDConv2d, DCDLinear
from .dgc import DGCConv2d
from .dyconv import DYAttention, DynamicConv2d
from .fdconv import FDConv2d
from .functional import forced_path, mix_kernels, per_sample_conv2d
from .icconv import InceptionConv2d
from .kernels import Kernels, MixedKernels, WarehouseCells
from .kernelwarehouse import KWAttention, KWConv2d, KWLinear, WarehouseManager
from .odconv import ODAttention, ODConv2d

__all__ = [
    "CondConv2d",
    "DCDConv2d",
    "DCDLinear",
    "DGCConv2d",
    "DYAttention",
    "DynamicConv2d",
    "DynamicConv2dBase",
    "FDConv2d",
    "InceptionConv2d",
    "KWAttention",
    "KWConv2d",
    "KWLinear",
    "Kernels",
    "MixedKernels",
    "ODAttention",
    "ODConv2d",
    "WarehouseCells",
    "WarehouseManager",
    "forced_path",
    "make_residual_attention",
    "mix_kernels",
    "per_sample_conv2d",
]
