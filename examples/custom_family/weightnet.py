"""WeightNet as a dynconv conv family, written only against dynconv's public API.

Ma, Zhang, Huang, Sun, "WeightNet: Revisiting the Design Space of Weight Networks", ECCV 2020, arXiv:2007.11823;
official code megvii-model/WeightNet (MegEngine, ``weightnet.py``, ``shufflenet_v2.py``).

WeightNet generates each sample's kernel directly from the pooled input with two fully-connected layers, the
second one grouped (paper Sec. 3, Fig. 1)::

    a = sigmoid(FC1(GAP(x)))        M x C_out values per sample (after a C_in -> max(16, C_in / 16) reduction)
    W = FC2(a)                      grouped in G x C_out groups: C_out x C_in/g x k x k values per sample
    y = W * x                       one convolution per sample with its own kernel

``M`` and ``G`` trade parameters for accuracy (the paper's "WeightNet (M=2, G=2)" is the default here). A depthwise
conv generates one kernel per channel with ``C_in`` groups (the official ``WeightNet_DW``: ``M/G x C_in`` hidden
values). The official ShuffleNetV2 blocks share one reduction between their WeightNet convs; as a drop-in layer
each conv has its own. Initialisation as the official ``_initialize_weights``: every weight-network layer
``normal(0, 1 / fan_in_per_group)``, biases 0.

Register it by importing this file (``dynconv.load_family_module("examples/custom_family/weightnet.py")``, or
``conv.module`` in a Hydra config: see ``configs/conv/weightnet.yaml`` here and the README section "Adding your own
dynamic convolution").
"""
from __future__ import annotations

import torch
from torch import nn

import dynconv
from dynconv.ops import DynamicConv2dBase, per_sample_conv2d
from dynconv.surgery.rules import roles
from dynconv.surgery.sites import CONVNEXT, GENERIC, MOBILENETV2, RESNET


class WeightNetConv2d(DynamicConv2dBase):
    """Drop-in ``nn.Conv2d`` whose kernel a grouped weight network generates per sample.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``
            (``groups`` 1, or depthwise).
        m: the paper's ``M``, hidden values per output channel of FC1.
        g: the paper's ``G``, groups per output channel of FC2.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, m: int = 2, g: int = 2) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        if groups != 1 and not self.is_depthwise:
            raise ValueError(f"WeightNet generates dense or depthwise kernels; groups={groups} is neither")
        if m % g:
            raise ValueError(f"m ({m}) must be a multiple of g ({g})")
        kernel = (in_channels // groups) * self.kernel_size[0] * self.kernel_size[1]
        hidden, fc2_groups = (m * out_channels, g * out_channels) if groups == 1 else (m // g * in_channels, in_channels)
        self.attention = nn.Sequential(
            nn.Linear(in_channels, max(16, in_channels // 16)),  # the reduction of GAP(x)
            nn.Linear(max(16, in_channels // 16), hidden),  # FC1
            nn.Sigmoid(),
            nn.Unflatten(1, (hidden, 1)),
            nn.Conv1d(hidden, out_channels * kernel, 1, groups=fc2_groups, bias=False),  # FC2, grouped
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        for layer in self.attention:
            if isinstance(layer, (nn.Linear, nn.Conv1d)):
                fan_in = layer.weight.shape[1] * (layer.weight.shape[2] if layer.weight.dim() == 3 else 1)
                nn.init.normal_(layer.weight, 0.0, 1.0 / fan_in)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = self.attention(x.mean((2, 3))).view(x.shape[0], self.out_channels, -1, *self.kernel_size)
        return per_sample_conv2d(x, kernels, self.bias, **self._conv_kwargs())

    def extra_repr(self) -> str:
        m = self.attention[1].out_features // (self.out_channels if self.groups == 1 else self.in_channels)
        return super().extra_repr() + f", weight network hidden={self.attention[1].out_features} (m={m})"


@torch.no_grad()
def from_static(layer: WeightNetConv2d, path: str, weight: torch.Tensor, bias, report) -> None:
    """FC1 weights and biases 0 (every hidden value ``sigmoid(0) = 1/2``) and FC2 so that those halves generate
    ``W``: the layer computes the static conv for every input (exact to rounding)."""
    fc1, fc2 = layer.attention[1], layer.attention[4]
    nn.init.zeros_(fc1.weight)
    nn.init.zeros_(fc1.bias)
    per_group = fc2.weight.shape[1]  # hidden values each FC2 output reads, each 1/2
    fc2.weight.copy_((weight.reshape(-1, 1, 1) / (0.5 * per_group)).expand_as(fc2.weight).to(fc2.weight))
    report.adjusted[f"{path}.attention.1.weight"] = "0"
    report.adjusted[f"{path}.attention.1.bias"] = "0"
    report.mapped[f"{path}.attention.4.weight"] = f"{path}.weight / (M/G / 2): the constant hidden values give W"
    if layer.bias is not None and bias is not None:
        layer.bias.copy_(bias)
        report.mapped[f"{path}.bias"] = f"{path}.bias"
    report.worsen("exact to rounding")


WEIGHTNET = dynconv.register_family(dynconv.Family(
    "weightnet",
    layers=(WeightNetConv2d,),
    variants=(dynconv.Variant("weightnet", {"m": 2, "g": 2}, "WeightNet (M=2, G=2): kernels from a grouped FC"),),
    # The official models replace every conv of the ShuffleNetV2 blocks (1x1, depthwise, 1x1); on the
    # other backbones: every conv of the blocks, stem and downsample static.
    rules={
        RESNET: roles("block"),
        MOBILENETV2: roles("pw_expand", "dw", "pw_project"),
        CONVNEXT: roles("dw", "pw"),
        GENERIC: roles("conv"),
    },
    from_static={WeightNetConv2d: from_static},
    paper="Ma et al., ECCV 2020, arXiv:2007.11823",
))
