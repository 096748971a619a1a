"""DCD: dynamic convolution decomposition.

Li et al., "Revisiting Dynamic Convolution via Matrix Decomposition", ICLR 2021, arXiv:2103.08756.
Checked against the official code, liyunsheng13/dcd (``models/imagenet/resnet_dcd.py``,
``mobilenetv2_dcd.py``): ``W(x) = Lambda(x) W0 + P Phi(x) Q^T``, computed as the official code does,

    out = Lambda(x) * conv_W0(x) + P( BN1d(Phi(x) @ z) + z ),   z = BN2d(Q x),

with ``Q`` a 1x1 conv to the latent dimension ``L`` (carrying the layer's stride) and ``P`` a 1x1 conv
back to ``C_out``. The attention pools the input to ``pool x pool`` (2x2 in ResNet BasicBlocks, 1x1 in
Bottlenecks, 2x2 for MobileNetV2 expansions), then ``Linear(C_in pool^2 -> S)`` -> a small SE gate ->
``Phi = fc_phi`` (``L x L``) and ``Lambda = hsigmoid(fc_scale)`` with ``hsigmoid(z) = relu6(z + 3) / 3``,
whose range is 0..2, not 0..1. Module names follow ``conv_dy`` (``conv``, ``q``, ``p``, ``bn1``,
``bn2``, ``fc``, ``fc_phi``, ``fc_scale``). :class:`DCDLinear` is the official dynamic classifier ``DYCls``.

Departures: the latent path reads the input at the kernel's centre tap for any padding, dilation and
kernel size (the official layers only exist with "same" padding, where this is exactly their 1x1
``Q``); grouped kernels keep a dense ``P`` and ``Q``; an optional static bias is added last; the
BatchNorms are batch-1 safe (see :mod:`dynconv.ops._norm`).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._base import DynamicConv2dBase, IntOrPair, Padding, refuse_scripting
from ._recompute import tracing
from .functional import folds_out_scale, per_sample_conv2d
from .kernels import Kernels
from ._norm import SafeBatchNorm1d, SafeBatchNorm2d


def hard_sigmoid2(x: torch.Tensor) -> torch.Tensor:
    """DCD's ``Hsigmoid``: ``relu6(x + 3) / 3``, between 0 and 2."""
    return F.relu6(x + 3.0) / 3.0


class SmallSE(nn.Module):
    """``x * hsigmoid(W x)`` on a vector (official ``SEModule_small``); the Linear sits at ``fc.0``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * hard_sigmoid2(self.fc(x))


def squeeze_width(features: int, latent: int, fc_squeeze: int = 16) -> int:
    """Attention width ``S = max(features, L^2) // fc_squeeze``, at least 4 (official)."""
    return max(max(features, latent**2) // fc_squeeze, 4)


def resnet_dims(in_channels: int, pool: int) -> Tuple[int, int]:
    """``(L, S)`` of ``conv_dy`` (pool 1) and ``conv_basic_dy`` (pool 2): ``L = int(sqrt(C_in pool^2))``."""
    features = in_channels * pool * pool
    latent = max(int(math.sqrt(features)), 1)
    return latent, squeeze_width(features, latent)


def mobilenetv2_dims(in_channels: int, out_channels: int, fc_squeeze: int = 8) -> Tuple[int, int, int]:
    """``(pool, L, S)`` of the official ``DYModule``: expansions (``C_in < C_out``) pool 2x2 and start at
    reduction 8, projections pool 1x1 and start at 2; the reduction doubles while ``L^2 > 2 C_in pool^2``."""
    pool, reduction = (2, 8) if in_channels < out_channels else (1, 2)
    features = in_channels * pool * pool
    latent = min(features // reduction, out_channels // reduction)
    while latent**2 > features * 2:
        reduction *= 2
        latent = min(features // reduction, out_channels // reduction)
    latent = max(latent, 4)
    return pool, latent, squeeze_width(features, latent, fc_squeeze)


class DCDConv2d(DynamicConv2dBase):
    """Drop-in ``nn.Conv2d`` with DCD's dynamic channel scaling and low-rank dynamic residual.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``
            (padding must be numeric).
        pool: side of the attention's average pool (1 or 2).
        latent_dim: ``L``; default ``int(sqrt(C_in pool^2))`` (ResNet rule).
        squeeze: attention width ``S``; default ``max(C_in pool^2, L^2) / 16``, at least 4.
    """

    attention_children = ("fc", "fc_phi", "fc_scale")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: Padding = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
        pool: int = 1,
        latent_dim: Optional[int] = None,
        squeeze: Optional[int] = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        if isinstance(self.padding, str):
            raise ValueError(f"DCDConv2d needs numeric padding, got {padding!r}")
        self.pool = pool
        self.latent_dim = latent = latent_dim or resnet_dims(in_channels, pool)[0]
        squeeze = squeeze or squeeze_width(in_channels * pool * pool, latent)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)
        self.q = nn.Conv2d(in_channels, latent, 1, stride, 0, bias=False)
        self.p = nn.Conv2d(latent, out_channels, 1, bias=False)
        self.bn1 = SafeBatchNorm2d(latent)
        self.bn2 = SafeBatchNorm1d(latent)
        self.fc = nn.Sequential(nn.Linear(in_channels * pool * pool, squeeze, bias=False), SmallSE(squeeze))
        self.fc_phi = nn.Linear(squeeze, latent * latent, bias=False)
        self.fc_scale = nn.Linear(squeeze, out_channels, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        for conv in (self.conv, self.q, self.p):  # official: normal(0, sqrt(2 / (k*k*C_out)))
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def _centre_tap(self, x: torch.Tensor) -> torch.Tensor:
        """Pad or crop ``x`` so a strided 1x1 conv reads what the kernel's centre tap reads."""
        pads = []
        for axis in (1, 0):  # F.pad lists the last dim first
            k, d, p = self.kernel_size[axis], self.dilation[axis], self.padding[axis]
            tap = (k - 1) // 2
            pads += [p - d * tap, p - d * (k - 1 - tap)]
        return F.pad(x, pads) if any(pads) else x

    def attention(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(Phi (B, L, L), Lambda (B, C_out))``."""
        pooled = x.mean((2, 3)) if self.pool == 1 else F.adaptive_avg_pool2d(x, self.pool).flatten(1)
        y = self.fc(pooled)
        phi = self.fc_phi(y).view(-1, self.latent_dim, self.latent_dim)
        return phi, hard_sigmoid2(self.fc_scale(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phi, scale = self.attention(x)
        z = self.bn1(self.q(self._centre_tap(x)))
        b, latent, h, w = z.shape
        z = z.flatten(2)
        z = self.bn2(phi @ z) + z
        residual = self._project(z.view(b, latent, h, w))
        if self._scale_kernels(x):
            return self._scaled_conv(x, scale) + residual
        # Lambda * conv_W0(x) + (P z + bias) as one fused multiply-add over the output, the static bias added
        # by P's convolution: one pass over the output instead of four (scale, add, bias)
        return torch.addcmul(residual, self.conv(x), scale[:, :, None, None])

    def _scale_kernels(self, x: torch.Tensor) -> bool:
        """In training, where per-sample copies of W0 cost no more than the static conv (oneDNN's grouped conv on
        large maps; 1x1 kernels smaller than their maps), Lambda scales W0's rows per sample instead of the
        output: conv_W0(x), which Lambda's gradient would read, is then not kept (a map per layer)."""
        conv = self.conv
        return (torch.is_grad_enabled() and not tracing() and x.shape[0] > 1
                and folds_out_scale(x, conv.weight, conv.stride, conv.padding, conv.groups))

    def _scaled_conv(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        return per_sample_conv2d(x, Kernels(conv.weight, out_channel=scale), None, conv.stride, conv.padding,
                                 conv.dilation, conv.groups)

    def _project(self, z: torch.Tensor) -> torch.Tensor:
        """``P z`` plus the layer's static bias, in one convolution."""
        if self.bias is None:
            return self.p(z)
        bias = self.bias if self.p.bias is None else self.p.bias + self.bias
        return F.conv2d(z, self.p.weight, bias)  # P: a 1x1 conv, stride 1, no padding (see __init__)

    def elementwise_macs(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, int]:
        """``Lambda * conv_W0(x)``: one multiply per output element, invisible to op counters."""
        return {"aggregation": 0, "scaling": y.numel()}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pool={self.pool}, latent_dim={self.latent_dim}"


class DCDLinear(nn.Module):
    """DCD's dynamic classifier (official ``DYCls``): ``Lambda(x) * cls(x) + P(BN(Phi(x) Q x) + Q x)``
    with ``Q``, ``P`` of latent width 32 and a 32-wide attention."""

    __prepare_scriptable__ = refuse_scripting

    def __init__(self, in_features: int, out_features: int, latent_dim: int = 32, squeeze: int = 32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dim = in_features, out_features, latent_dim
        self.cls = nn.Linear(in_features, out_features)
        self.cls_q = nn.Linear(in_features, latent_dim, bias=False)
        self.cls_p = nn.Linear(latent_dim, out_features, bias=False)
        self.fc = nn.Sequential(nn.Linear(in_features, squeeze, bias=False), SmallSE(squeeze))
        self.fc_phi = nn.Linear(squeeze, latent_dim**2, bias=False)
        self.fc_scale = nn.Linear(squeeze, out_features, bias=False)
        self.bn1 = SafeBatchNorm1d(latent_dim)
        self.bn2 = SafeBatchNorm1d(latent_dim)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "DCDLinear":
        layer = cls(linear.in_features, linear.out_features, **kwargs)
        return layer.to(device=linear.weight.device, dtype=linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        phi = self.fc_phi(y).view(-1, self.dim, self.dim)
        r = hard_sigmoid2(self.fc_scale(y)) * self.cls(x)
        z = self.bn1(self.cls_q(x))
        z = self.bn2((phi @ z.unsqueeze(2)).squeeze(2)) + z
        return self.cls_p(z) + r

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, latent_dim={self.dim}"
