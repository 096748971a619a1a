"""ODConv: omni-dimensional dynamic convolution.

Li, Zhou, Yao, "Omni-Dimensional Dynamic Convolution", ICLR 2022, arXiv:2209.07947.
Checked against the official code, OSVAI/ODConv (modules/odconv.py): the attention layout, the
``A = max(int(C_in * reduction), 16)`` hidden width, the kaiming fan-out initialisation, the
temperature shared by all four heads, and the state-dict names (so official checkpoints load).
The layer states equation (1) as a :class:`~dynconv.ops.kernels.MixedKernels` description; where each
attention is applied (the channel attention on the input, the filter attention on the kernels' rows or on
the output, the spatial one on the kernels or the unfolded input: all exact, conv is linear per channel and
per tap) is :func:`~dynconv.ops.functional.per_sample_conv2d`'s choice. One spatial map, one channel and
one filter attention are shared by all kernels, as in the official code.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_tracing

from .._compat import is_exporting
from ..schedules import attention_temperature
from ._base import DynamicConv2dBase, IntOrPair, Padding
from ._norm import SafeBatchNorm2d
from ._routing import TemperatureScheduled, global_pool
from .functional import per_sample_conv2d
from .kernels import Kernels, MixedKernels


def _kaiming_fan_out(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ODAttention(TemperatureScheduled):
    """The four attentions of ODConv: input channel, output filter, spatial and kernel.

    Heads that would be constant are omitted exactly as in the official code: no filter head for
    depthwise layers, no spatial head for 1x1 kernels, no kernel head for a single kernel.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Tuple[int, int],
        groups: int = 1,
        reduction: float = 0.0625,
        kernel_num: int = 4,
        min_channel: int = 16,
        schedule: Optional[Callable[[float], float]] = None,
    ) -> None:
        super().__init__(schedule or attention_temperature())
        hidden = max(int(in_channels * reduction), min_channel)
        kernel_area = kernel_size[0] * kernel_size[1]
        self.kernel_size = kernel_size
        self.fc = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.bn = SafeBatchNorm2d(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.channel_fc = nn.Conv2d(hidden, in_channels, 1)
        depthwise = in_channels == groups == out_channels
        self.filter_fc = None if depthwise else nn.Conv2d(hidden, out_channels, 1)
        self.spatial_fc = None if kernel_area == 1 else nn.Conv2d(hidden, kernel_area, 1)
        self.kernel_fc = None if kernel_num == 1 else nn.Conv2d(hidden, kernel_num, 1)
        _kaiming_fan_out(self)

    def forward(
        self, x: torch.Tensor
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Returns ``(a_c (B,C_in,1,1), a_f (B,C_out,1,1), a_s (B,1,1,kh,kw), a_w (B,n))``; omitted heads are ``None``."""
        h = self.relu(self.bn(self.fc(global_pool(x))))
        t = self.temperature
        a_c = torch.sigmoid(self.channel_fc(h) / t)
        a_f = torch.sigmoid(self.filter_fc(h) / t) if self.filter_fc is not None else None
        a_s = None
        if self.spatial_fc is not None:
            a_s = torch.sigmoid(self.spatial_fc(h) / t).reshape(x.shape[0], 1, 1, *self.kernel_size)
        a_w = torch.softmax(self.kernel_fc(h).flatten(1) / t, dim=1) if self.kernel_fc is not None else None
        return a_c, a_f, a_s, a_w


class ODConv2d(DynamicConv2dBase):
    """Drop-in ``nn.Conv2d`` with ODConv's four attentions over ``kernel_num`` kernels.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``
            (the official layer has no bias; with ``bias=True`` a static bias is added last).
        kernel_num: number of kernels ``n`` ("ODConv (4x)" is 4).
        reduction: attention hidden width as a fraction of ``in_channels`` (1/16).
        min_channel: lower bound of the attention hidden width (16).
        temperature: schedule of the attention temperature (30 -> 1 over 10 epochs).
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
        kernel_num: int = 4,
        reduction: float = 0.0625,
        min_channel: int = 16,
        temperature: Optional[Callable[[float], float]] = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.kernel_num = kernel_num
        self.attention = ODAttention(
            in_channels, out_channels, self.kernel_size, groups, reduction, kernel_num, min_channel, temperature
        )
        self.weight = nn.Parameter(torch.empty(kernel_num, out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        for i in range(kernel_num):
            nn.init.kaiming_normal_(self.weight[i], mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and not is_fx_tracing() and not is_exporting() and x.shape[0] == 1:
            return self._forward_one(x)
        a_c, a_f, a_s, a_w = self.attention(x)
        # equation (1): y = (a_w1 * a_f * a_c * a_s * W_1 + ... + a_wn * a_f * a_c * a_s * W_n) * x, with the
        # filter, channel and spatial attentions shared by the n kernels (as in the official code)
        kernels = MixedKernels(a_w, self.weight, spatial=a_s, in_channel=a_c, out_channel=a_f)
        y = per_sample_conv2d(x, kernels, None, **self._conv_kwargs())
        return y + self.bias.reshape(1, -1, 1, 1) if self.bias is not None else y

    def _forward_one(self, x: torch.Tensor) -> torch.Tensor:
        """One sample without autograd (batch-1 inference): its one kernel takes every attention where that
        costs least. The channel and spatial attentions (and the filter attention with them) scale the
        kernel where it is smaller than the input and output maps (early layers), else the maps are scaled
        (late layers, where the kernels outweigh the maps), where the static bias rides on the filter
        scaling. The convolution is :func:`per_sample_conv2d`'s plain one."""
        a_c, a_f, a_s, a_w = self.attention(x)
        if a_w is not None:  # the mixed kernel is a fresh tensor: the scalings below may go in place
            kernel, fresh = (a_w @ self.weight.reshape(self.kernel_num, -1)).reshape(self.weight.shape[1:]), True
        else:
            kernel, fresh = self.weight[0], False
        out_pixels = 1
        for axis in (0, 1):
            out_pixels *= self._out_size(x.shape[2 + axis], axis)
        maps = x.numel() + self.out_channels * out_pixels
        if (self.groups == 1 or self.is_depthwise) and kernel.numel() <= maps:
            # input channel c is kernel column c, or (depthwise) kernel row c
            factor = a_c.reshape(1, -1, 1, 1) if self.groups == 1 else a_c.reshape(-1, 1, 1, 1)
            if a_s is not None:
                factor = factor * a_s.reshape(1, 1, *self.kernel_size)
            kernel = kernel.mul_(factor) if fresh else kernel * factor
            if a_f is not None:
                kernel = kernel.mul_(a_f.reshape(-1, 1, 1, 1))
            return per_sample_conv2d(x, kernel, self.bias, **self._conv_kwargs())
        if a_s is not None:
            factor = a_s.reshape(1, 1, *self.kernel_size)
            kernel = kernel.mul_(factor) if fresh else kernel * factor
        y = per_sample_conv2d(x, Kernels(kernel, in_channel=a_c), None if a_f is not None else self.bias,
                              **self._conv_kwargs())
        if a_f is None:
            return y
        return torch.addcmul(self.bias.reshape(1, -1, 1, 1), y, a_f) if self.bias is not None else y * a_f

    def _out_size(self, size: int, axis: int) -> int:
        if isinstance(self.padding, str):  # "same" (stride 1) or "valid"
            return size if self.padding == "same" else size - self.dilation[axis] * (self.kernel_size[axis] - 1)
        span = self.dilation[axis] * (self.kernel_size[axis] - 1) + 1
        return (size + 2 * self.padding[axis] - span) // self.stride[axis] + 1

    def elementwise_macs(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, int]:
        """MACs outside the matmuls and convolutions an op counter sees.

        ``scaling``: input x a_c and output x a_f. ``aggregation``: the kernel aggregation as the
        paper's formula writes it, every attention factor on the kernels (spatial, kernel) multiplying
        all ``n`` kernels, ``factors * n * numel(W_i)``, whatever evaluation order the code uses; the
        mixing matmul, which the counter already sees, is subtracted. Against the ODConv README's
        MAdds this gives ResNet18 1x -0.5%, 4x -0.6%, MobileNetV2 1.0 1x +0.3%, 4x -1.6%.
        """
        att = self.attention
        per_kernel = self.weight[0].numel()
        factors = (att.spatial_fc is not None) + (att.kernel_fc is not None)
        seen_by_counter = self.kernel_num * per_kernel if att.kernel_fc is not None else 0
        scaling = x[0].numel() + (y[0].numel() if att.filter_fc is not None else 0)
        aggregation = factors * self.kernel_num * per_kernel - seen_by_counter
        return {"aggregation": aggregation * x.shape[0], "scaling": scaling * x.shape[0]}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel_num={self.kernel_num}"
