"""Inception convolution (IC-Conv): a conv whose output channels use different dilations.

Liu et al., "Inception Convolution with Efficient Dilation Search", CVPR 2021, arXiv:2012.13587.
Checked against the official code, yifan123/IC-Conv (``ICConv2d``, ``pattern_zoo/*.json``): a layer is a
list of ordinary convolutions ``conv_list``, one per dilation pattern ``(d_h, d_w)`` that received
channels, each with the layer's kernel size and stride, padding ``d (k - 1) / 2`` per axis, no bias;
their outputs are concatenated in pattern order. The searched patterns ship in :mod:`dynconv.patterns`, which also reads and writes
pattern files; where the layers go is :mod:`dynconv.surgery.icconv`.

Departures: grouped layers (depthwise MobileNetV2 / ConvNeXt) are grouped convs with a per-channel
dilation: a member reads the input of the groups its output channels belong to (the official
``groups`` gives every member all input groups, which only exists for ResNeXt); member padding keeps
the replaced conv's output size for any padding; an optional static bias is added last.

The forward is planned per input size (see :func:`dynconv.ops._icconv_plan.plan_members`): on CPU, members are packed into
few convolutions, each member's kernel zero-embedded into the union tap grid of its pack, where a cost
model fitted to oneDNN says that beats one narrow convolution per member (``results/icconv_fused_cpu.md``:
1.1-1.2x faster than the loop on ic_resnet50, forward and backward); elsewhere each member runs alone
unless ``impl="union"``. Packed kernels do MACs on zero taps, which :meth:`InceptionConv2d.wasted_macs`
reports.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import is_compiling, is_exporting
from ._base import DynamicConv2dBase, IntOrPair, Padding
from ._icconv_plan import Dilation, _embed, _Member, _member_groups, _Pack, _union_grid, plan_members

Pattern = Dict[Dilation, int]
IMPLS = ("auto", "loop", "union")


# ---------------------------------------------------------------------------------------------------
# The layer


def _base_padding(padding: Padding, kernel: Tuple[int, int], dilation: Tuple[int, int]) -> Tuple[int, int]:
    if padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))  # type: ignore[return-value]
    if padding == "valid":
        return (0, 0)
    return tuple(padding)  # type: ignore[arg-type,return-value]


class InceptionConv2d(DynamicConv2dBase):
    """Drop-in ``nn.Conv2d`` whose output channels are split into groups with their own dilation.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``
            (odd kernel sizes). A member with dilation ``d`` pads ``padding + (d - dilation) (k - 1) / 2``,
            so the output has the replaced conv's size (``d (k - 1) / 2`` for a "same" conv, as official).
        pattern: ``{(d_h, d_w): channels}``, 1-based dilations; insertion order is the output channel
            order, zero counts are skipped, counts add up to ``out_channels``. Default: every channel at
            ``dilation``. With ``groups > 1`` each member must lie inside one group or span whole groups.
        impl: ``"auto"`` (packs chosen by the cost model), ``"loop"`` (one conv per member, the official
            forward) or ``"union"`` (all members in as few zero-embedded convs as possible).

    Parameters follow the official layout: ``conv_list.{j}.weight`` ``[count_j, C_in / groups, k, k]``.
    """

    attention_children: Tuple[str, ...] = ()

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: Padding = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = False,
        pattern: Optional[Mapping[Dilation, int]] = None,
        impl: str = "auto",
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        if any(k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"InceptionConv2d needs odd kernel sizes, got {self.kernel_size}")
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}; choose one of {IMPLS}")
        self.impl = impl
        self.pattern = _check_pattern(pattern if pattern is not None else {self.dilation: out_channels})
        total = sum(self.pattern.values())
        if total != out_channels:
            raise ValueError(f"pattern has {total} channels, the layer has {out_channels}: {self.pattern}")
        base = _base_padding(self.padding, self.kernel_size, self.dilation)
        unit_out, unit_in = out_channels // groups, in_channels // groups
        self.members: List[_Member] = []
        self.conv_list = nn.ModuleList()
        start = 0
        for d, count in self.pattern.items():
            stop = start + count
            member_groups, in_start, in_stop = _member_groups(start, stop, unit_out, unit_in, d)
            pad = tuple(p + (dd - d0) * (k - 1) // 2 for p, dd, d0, k in zip(base, d, self.dilation, self.kernel_size))
            if min(pad) < 0:
                raise ValueError(f"dilation {d} needs padding {pad} < 0 with padding={padding}, dilation={dilation}")
            member = _Member(d, start, stop, in_start, in_stop, member_groups, pad)  # type: ignore[arg-type]
            self.members.append(member)
            self.conv_list.append(
                nn.Conv2d(in_stop - in_start, count, self.kernel_size, self.stride, pad, d, member_groups, bias=False)
            )
            start = stop
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self._plans: Dict[tuple, List[_Pack]] = {}
        self._packed: Dict[_Pack, Tuple[tuple, torch.Tensor]] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official IC-ResNet init: every member ``normal(0, sqrt(2 / (k_h k_w count_j)))``, i.e. kaiming
        fan-out of the member conv (so narrow members start with larger weights)."""
        for conv in self.conv_list:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @property
    def dilations(self) -> List[Dilation]:
        return [m.dilation for m in self.members]

    # -- forward paths ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.forward_loop(x) if self.impl == "loop" else self._forward_packs(x, self.plan(x))
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def forward_loop(self, x: torch.Tensor) -> torch.Tensor:
        """The official forward: one convolution per member, concatenated (no bias)."""
        outs = [conv(self._member_input(x, m)) for conv, m in zip(self.conv_list, self.members)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    def _member_input(self, x: torch.Tensor, m: Union[_Member, _Pack]) -> torch.Tensor:
        return x if m.in_stop - m.in_start == self.in_channels else x[:, m.in_start:m.in_stop]

    def plan(self, x: torch.Tensor) -> List[_Pack]:
        """The packs the forward runs for an input like ``x`` (cached per size bucket and device)."""
        h, w = x.shape[-2:]
        # an exported graph keeps one plan for every batch size (reading the batch would fix it): batch 1's
        batch = 1 if is_exporting() else x.shape[0]
        out_px = batch * self._out_size(h, 0) * self._out_size(w, 1)
        rebuild = self._needs_grad()
        key = (self.impl, x.device, x.dtype, rebuild, round(math.log2(max(out_px, 1))), min(h, 64), min(w, 64))
        packs = self._plans.get(key)
        if packs is None:
            group_width = self.out_channels // self.groups if self.groups > 1 else None
            groups = plan_members(self.members, self.kernel_size, self.in_channels // self.groups, out_px, (h, w),
                                  x.device.type, self.impl, group_width, rebuild)
            packs = [self._make_pack(g) for g in groups]
            self._plans[key] = packs
        return packs

    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(c.weight.requires_grad for c in self.conv_list)

    def _out_size(self, size: int, axis: int) -> int:
        m = self.members[0]
        k, s = self.kernel_size[axis], self.stride[axis]
        return (size + 2 * m.padding[axis] - m.dilation[axis] * (k - 1) - 1) // s + 1

    def _make_pack(self, members: Tuple[int, ...]) -> _Pack:
        ms = [self.members[i] for i in members]
        if len(ms) == 1:
            m = ms[0]
            return _Pack(members, self.kernel_size, m.dilation, m.padding, m.in_start, m.in_stop, m.groups,
                         m.stop - m.start)
        taps, step = _union_grid([m.dilation for m in ms], self.kernel_size)
        d_max = tuple(max(m.dilation[a] for m in ms) for a in (0, 1))
        first = ms[0]
        # The pack's outer tap sits where its widest member's outer tap sits: that member's padding.
        padding = tuple(first.padding[a] + (d_max[a] - first.dilation[a]) * (self.kernel_size[a] - 1) // 2
                        for a in (0, 1))
        unit_out, unit_in = self.out_channels // self.groups, self.in_channels // self.groups
        groups, in_start, in_stop = _member_groups(ms[0].start, ms[-1].stop, unit_out, unit_in, d_max)
        slices = []
        for m in ms:
            axes = []
            for a in (0, 1):
                stride, r = m.dilation[a] // step[a], (self.kernel_size[a] - 1) // 2
                centre = (taps[a] - 1) // 2
                axes.append((centre - r * stride, centre + r * stride + 1, stride))
            slices.append(tuple(axes))
        return _Pack(members, taps, step, padding, in_start, in_stop, groups,  # type: ignore[arg-type]
                     sum(m.stop - m.start for m in ms), tuple(slices))

    def _pack_weight(self, pack: _Pack) -> torch.Tensor:
        weights = [self.conv_list[i].weight for i in pack.members]
        if pack.slices is None:
            return weights[0]
        if self._needs_grad() or is_compiling():  # a compiled graph builds it in the graph
            return _embed(weights, pack)
        # Without autograd the packed kernel only changes with the parameters: reuse it.
        stamp = tuple((w.data_ptr(), w._version, w.dtype) for w in weights)
        cached = self._packed.get(pack)
        if cached is None or cached[0] != stamp:
            cached = (stamp, _embed(weights, pack))
            self._packed[pack] = cached
        return cached[1]

    def _forward_packs(self, x: torch.Tensor, packs: List[_Pack]) -> torch.Tensor:
        ys, where = [], {}  # member -> (pack, channel offset in the pack's output)
        for p, pack in enumerate(packs):
            ys.append(F.conv2d(self._member_input(x, pack), self._pack_weight(pack), None, self.stride,
                               pack.padding, pack.step, pack.groups))
            offset = 0
            for i in pack.members:
                where[i] = (p, offset)
                offset += self.members[i].stop - self.members[i].start
        # Concatenate in pattern order, one slice per run of consecutive members of one pack.
        pieces, i = [], 0
        while i < len(self.members):
            p, start = where[i]
            stop = start + self.members[i].stop - self.members[i].start
            while i + 1 < len(self.members) and where[i + 1] == (p, stop):
                i += 1
                stop += self.members[i].stop - self.members[i].start
            pieces.append(ys[p] if (start, stop) == (0, ys[p].shape[1]) else ys[p][:, start:stop])
            i += 1
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)

    # -- accounting ---------------------------------------------------------------------------------

    def true_macs(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """MACs of the layer as the paper counts them: each member's dense ``k x k`` conv."""
        return y.numel() * (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]

    def wasted_macs(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """MACs the planned forward spends on the zero taps of packed kernels (0 for ``impl="loop"``).

        An op counter (``FlopCounterMode``) sees ``true_macs + wasted_macs`` for this layer.
        """
        if self.impl == "loop":
            return 0
        pixels = y.shape[0] * y.shape[2] * y.shape[3]
        k = self.kernel_size[0] * self.kernel_size[1]
        per_out = self.in_channels // self.groups
        return sum(p.channels * per_out * (p.taps[0] * p.taps[1] - k) * pixels for p in self.plan(x))

    def elementwise_macs(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, int]:
        """Takes the zero taps back out of the counted convolution, so that :func:`dynconv.count_macs`
        is the paper's (an IC-ResNet costs what its ResNet costs)."""
        wasted = self.wasted_macs(x, y)
        return {"dynamic_conv": -wasted} if wasted else {}

    def extra_repr(self) -> str:
        pattern = ", ".join(f"{d}: {n}" for d, n in self.pattern.items())
        return f"{super().extra_repr()}, pattern={{{pattern}}}, impl={self.impl!r}"


def _check_pattern(pattern: Mapping[Dilation, int]) -> Pattern:
    out: Pattern = {}
    for d, n in pattern.items():
        if (not isinstance(d, tuple) or len(d) != 2 or not all(isinstance(v, int) and v >= 1 for v in d)):
            raise ValueError(f"pattern key {d!r} is not a dilation (d_h, d_w) with d >= 1")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"pattern count for {d} must be a non-negative int, got {n!r}")
        if d in out:
            raise ValueError(f"dilation {d} appears twice in the pattern")
        if n:
            out[d] = n
    return out
