"""DY-Conv: dynamic convolution with softmax attention over K kernels.

Chen et al., "Dynamic Convolution: Attention over Convolution Kernels", CVPR 2020,
arXiv:1912.03458. No official code exists; the attention layout (GAP -> FC(C_in -> int(C_in/4)+1,
no bias) -> ReLU -> FC(-> K) -> softmax(z / T)) and the aggregated bias follow the best-known
re-implementation, kaijieshi7/Dynamic-convolution-Pytorch, whose widths reproduce the 45.47M of
"DY-Conv (4x)" ResNet18 in the ODConv/KernelWarehouse tables. The temperature schedule is the
paper's 30 -> 1 over the first 10 epochs, applied per iteration as in the ODConv code.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from ..schedules import attention_temperature
from ._base import DynamicConv2dBase, IntOrPair, Padding
from ._routing import TemperatureScheduled, global_pool
from .functional import per_sample_conv2d
from .kernels import MixedKernels


class DYAttention(TemperatureScheduled):
    """Softmax attention over ``num_kernels`` kernels with a scheduled temperature."""

    def __init__(
        self,
        in_channels: int,
        num_kernels: int,
        reduction: float = 0.25,
        schedule: Optional[Callable[[float], float]] = None,
    ) -> None:
        super().__init__(schedule or attention_temperature())
        hidden = num_kernels if in_channels == 3 else int(in_channels * reduction) + 1
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, num_kernels)
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc2(self.relu(self.fc1(global_pool(x).flatten(1))))
        return torch.softmax(logits / self.temperature, dim=1)


class DynamicConv2d(DynamicConv2dBase):
    """Drop-in ``nn.Conv2d`` whose kernel (and bias) is a softmax-weighted sum of ``num_kernels``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``.
        num_kernels: K ("DY-Conv (4x)" is 4).
        reduction: attention hidden width ``int(in_channels * reduction) + 1``.
        temperature: schedule of the softmax temperature (30 -> 1 over 10 epochs).
    """

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
        num_kernels: int = 4,
        reduction: float = 0.25,
        temperature: Optional[Callable[[float], float]] = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.num_kernels = num_kernels
        self.attention = DYAttention(in_channels, num_kernels, reduction, temperature)
        self.weight = nn.Parameter(torch.empty(num_kernels, out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(num_kernels, out_channels)) if bias else None
        for i in range(num_kernels):
            nn.init.kaiming_uniform_(self.weight[i], a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attention(x)
        bias = attn @ self.bias if self.bias is not None else None
        return per_sample_conv2d(x, MixedKernels(attn, self.weight), bias, **self._conv_kwargs())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_kernels={self.num_kernels}"
