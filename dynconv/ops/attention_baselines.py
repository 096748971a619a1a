"""SE, CBAM and ECA, the attention baselines of the ResNet tables, as modules for a residual branch.

Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018, arXiv:1709.01507 (r = 16).
Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018, arXiv:1807.06521.
Wang et al., "ECA-Net", CVPR 2020, arXiv:1910.03151 (adaptive kernel size, gamma 2, b 1).
The modules are timm's (where they go: :mod:`dynconv.surgery.attention`). SE uses the exact C/16 width (no
rounding to 8) and CBAM's MLP has biases, as in the papers' code (Jongchan/attention-module), which gives the
tables' 11.78M.
"""
from __future__ import annotations

from timm.layers.cbam import CbamModule
from timm.layers.eca import EcaModule
from timm.layers.squeeze_excite import SEModule
from torch import nn


def make_residual_attention(kind: str, channels: int) -> nn.Module:
    """One attention module for a residual branch with ``channels`` outputs."""
    if kind == "se":
        return SEModule(channels, rd_ratio=1 / 16, rd_divisor=1)
    if kind == "cbam":
        return CbamModule(channels, rd_ratio=1 / 16, rd_divisor=1, mlp_bias=True)
    if kind == "eca":
        return EcaModule(channels)
    raise ValueError(f"unknown residual attention {kind!r}; choose se, cbam or eca")
