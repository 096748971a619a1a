"""Constructor contract shared by every drop-in replacement for ``nn.Conv2d``."""
from __future__ import annotations

from typing import Any, Optional, Tuple, TypeVar, Union

import torch
from torch import nn
from torch.nn.modules.utils import _pair

IntOrPair = Union[int, Tuple[int, int]]
Padding = Union[str, IntOrPair]
T = TypeVar("T", bound="DynamicConv2dBase")


def refuse_scripting(module: nn.Module) -> nn.Module:
    """``__prepare_scriptable__`` of dynconv's layers: TorchScript cannot compile their data-dependent
    paths, and ``torch.jit.script`` would otherwise fail deep inside with no layer named."""
    raise RuntimeError(
        f"{type(module).__name__} cannot be compiled with TorchScript (torch.jit.script); use torch.compile, "
        "torch.export, FX or ONNX export instead (torch.jit.trace also works, for a fixed input shape)")


class DynamicConv2dBase(nn.Module):
    """Holds the ``nn.Conv2d`` hyper-parameters and the ``from_conv`` constructor.

    Deliberately not a subclass of ``nn.Conv2d``: foreign init loops and BN fusers key on
    ``isinstance(m, nn.Conv2d)`` and would misread a kernel bank, and surgery stays idempotent.
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
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                f"by groups ({groups})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups

    __prepare_scriptable__ = refuse_scripting

    # Child modules holding the layer's attention / routing branch (for MAC accounting).
    attention_children: Tuple[str, ...] = ("attention",)
    # What the layer's own matmuls compute: mixing a kernel bank, or (DGC's small-map path) the
    # convolution itself as unfold + matmul.
    matmul_macs_kind: str = "aggregation"

    @property
    def is_depthwise(self) -> bool:
        return self.in_channels == self.groups == self.out_channels

    @classmethod
    def from_conv(cls: type[T], conv: nn.Conv2d, **kwargs: Any) -> T:
        """Build a layer with the hyper-parameters, device and dtype of ``conv``.

        The new layer is initialised the way its paper's code does it; ``conv``'s weights are not
        copied (a bank of identical kernels would start every expert at the same point).
        """
        if conv.padding_mode != "zeros":
            raise ValueError(f"{cls.__name__} supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            **kwargs,
        )
        return layer.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def _conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if getattr(self, "bias", None) is None:
            s += ", bias=False"
        return s


def init_bias_like_conv(bias: Optional[torch.Tensor], fan_in: int) -> None:
    """``nn.Conv2d``'s default bias initialisation, for banks of biases."""
    if bias is not None:
        bound = 1.0 / fan_in**0.5 if fan_in > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)
