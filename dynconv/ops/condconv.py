"""CondConv: conditionally parameterized convolution.

Yang, Bender, Le, Ngiam, "CondConv: Conditionally Parameterized Convolutions for Efficient
Inference", NeurIPS 2019, arXiv:1904.04971. Per-layer routing ``r(x) = sigmoid(GAP(x) R)`` (one
sigmoid per expert, no softmax, no temperature), ``W(x) = sum_i r_i(x) W_i``, experts and biases
initialised like ordinary convolutions (as timm's ``CondConv2d``). Unlike timm's layer, the
routing lives inside the layer, so this is a drop-in ``nn.Conv2d``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ._base import DynamicConv2dBase, IntOrPair, Padding, init_bias_like_conv
from ._routing import global_pool
from .functional import per_sample_conv2d
from .kernels import MixedKernels


class CondConv2d(DynamicConv2dBase):
    """Drop-in ``nn.Conv2d`` mixing ``num_experts`` kernels with per-sample sigmoid routing.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``.
        num_experts: number of expert kernels ("CondConv (8x)" is 8).
    """

    attention_children = ("routing",)

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
        num_experts: int = 8,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.num_experts = num_experts
        self.routing = nn.Linear(in_channels, num_experts)
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None
        fan_in = self.weight[0].numel() // out_channels
        for i in range(num_experts):
            nn.init.kaiming_uniform_(self.weight[i], a=math.sqrt(5))
            init_bias_like_conv(self.bias[i] if bias else None, fan_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = torch.sigmoid(self.routing(global_pool(x).flatten(1)))
        return per_sample_conv2d(x, MixedKernels(routing, self.weight), self.mixed_bias(routing),
                                 **self._conv_kwargs())

    def mixed_bias(self, routing: torch.Tensor) -> Optional[torch.Tensor]:
        """``(B, C_out)``: the experts' biases weighted by the routing, or ``None`` without biases."""
        return routing @ self.bias if self.bias is not None else None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_experts={self.num_experts}"
