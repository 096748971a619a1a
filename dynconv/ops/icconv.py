"""Inception convolution (IC-Conv): a conv whose output channels use different dilations.

Liu et al., "Inception Convolution with Efficient Dilation Search", CVPR 2021, arXiv:2012.13587.
Checked against the official code, yifan123/IC-Conv (``ICConv2d``, ``pattern_zoo/*.json``): a layer is a
list of ordinary convolutions ``conv_list``, one per dilation pattern ``(d_h, d_w)`` that received
channels, each with the layer's kernel size and stride, padding ``d (k - 1) / 2`` per axis, no bias;
their outputs are concatenated in pattern order. The searched patterns ship in :mod:`dynconv.patterns`.

Departures: grouped layers (depthwise MobileNetV2 / ConvNeXt) are grouped convs with a per-channel
dilation: a member reads the input of the groups its output channels belong to (the official
``groups`` gives every member all input groups, which only exists for ResNeXt); member padding keeps
the replaced conv's output size for any padding; an optional static bias is added last.

The forward is planned per input size (see :func:`plan_members`): on CPU, members are packed into
few convolutions, each member's kernel zero-embedded into the union tap grid of its pack, where a cost
model fitted to oneDNN says that beats one narrow convolution per member (``results/icconv_fused_cpu.md``:
1.1-1.2x faster than the loop on ic_resnet50, forward and backward); elsewhere each member runs alone
unless ``impl="union"``. Packed kernels do MACs on zero taps, which :meth:`InceptionConv2d.wasted_macs`
reports.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import is_compiling, is_exporting
from ..backbones import CONVNEXT, MOBILENETV2, RESNET, ConvSite, get_submodule, set_submodule
from ._base import DynamicConv2dBase, IntOrPair, Padding

Dilation = Tuple[int, int]
Pattern = Dict[Dilation, int]
PatternSource = Union[str, Path, Sequence[Mapping[Any, int]]]

# Dilation grids of the released patterns: "k9" = dilations 1..4 per axis (3x3 extent up to 9),
# "k13" = 1..6 (extent up to 13).
GRIDS: Dict[str, int] = {"k9": 4, "k13": 6}
IMPLS = ("auto", "loop", "union")


def dilation_grid(grid: Union[str, int] = "k9") -> List[Dilation]:
    """Candidate dilations of a grid in the official key order (``d_h`` major): ``(1, 1), (1, 2), ...``."""
    d_max = _grid_max(grid)
    return [(a, b) for a in range(1, d_max + 1) for b in range(1, d_max + 1)]


def _grid_max(grid: Union[str, int]) -> int:
    if isinstance(grid, int) and grid >= 1:
        return grid
    if grid not in GRIDS:
        raise ValueError(f"unknown dilation grid {grid!r}; choose one of {sorted(GRIDS)} or a maximum dilation")
    return GRIDS[grid]


# ---------------------------------------------------------------------------------------------------
# The layer


@dataclass(frozen=True)
class _Member:
    """One dilation: output channels ``[start, stop)``, read from input channels ``[in_start, in_stop)``
    with ``groups`` groups (1 when the member lies inside one group of the layer)."""

    dilation: Dilation
    start: int
    stop: int
    in_start: int
    in_stop: int
    groups: int
    padding: Tuple[int, int]


@dataclass(frozen=True)
class _Pack:
    """Members run as one convolution: each member's kernel sits in the union tap grid of the pack, a
    ``taps[0] x taps[1]`` kernel with dilation ``step``, at rows / columns ``slices[i]`` (``None`` for a
    pack of one member, which runs with its own kernel)."""

    members: Tuple[int, ...]
    taps: Tuple[int, int]
    step: Tuple[int, int]
    padding: Tuple[int, int]
    in_start: int
    in_stop: int
    groups: int
    channels: int
    slices: Optional[Tuple[Tuple[Tuple[int, int, int], Tuple[int, int, int]], ...]] = None


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


def _member_groups(start: int, stop: int, unit_out: int, unit_in: int, d: Dilation) -> Tuple[int, int, int]:
    """``(groups, in_start, in_stop)`` of a member spanning output channels ``[start, stop)``."""
    if start // unit_out == (stop - 1) // unit_out:  # inside one group: a dense conv on its inputs
        g = start // unit_out
        return 1, g * unit_in, (g + 1) * unit_in
    if start % unit_out or stop % unit_out:
        raise ValueError(
            f"dilation {d} takes output channels {start}..{stop - 1}, which straddle groups of {unit_out} "
            "channels; with groups > 1 a member must lie inside one group or span whole groups"
        )
    return (stop - start) // unit_out, start // unit_out * unit_in, stop // unit_out * unit_in


def _union_grid(dilations: Sequence[Dilation], kernel: Tuple[int, int]) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Taps per axis and tap step of the smallest dilated kernel holding every member's taps."""
    taps, step = [], []
    for a in (0, 1):
        ds = [d[a] for d in dilations]
        g = math.gcd(*ds)
        taps.append((kernel[a] - 1) * max(ds) // g + 1)
        step.append(g)
    return tuple(taps), tuple(step)  # type: ignore[return-value]


def _embed(weights: Sequence[torch.Tensor], pack: _Pack) -> torch.Tensor:
    """The pack's kernel: each member's taps written into a zero kernel over the union grid."""
    w0 = weights[0]
    kernel = w0.new_zeros(pack.channels, w0.shape[1], *pack.taps)
    start = 0
    for w, (rows, cols) in zip(weights, pack.slices or ()):
        kernel[start:start + w.shape[0], :, slice(*rows), slice(*cols)] = w
        start += w.shape[0]
    return kernel


# ---------------------------------------------------------------------------------------------------
# Planning: which members share a convolution


@dataclass(frozen=True)
class ConvCost:
    """Predicted milliseconds of one convolution call with ``n`` output channels, ``taps`` kernel taps,
    ``reduction`` input channels per group and ``out_pixels`` output pixels (batch included)::

        overhead + unit * ceil(n / block) * taps * reduction * out_pixels  [+ embed * n * reduction * taps]

    ``block`` is the number of output channels the backend computes together; the bracketed term, for
    packs of several members only, builds the zero-filled packed kernel. A merge must save ``margin``
    of the pair's predicted time, so near-ties the model cannot resolve stay apart.
    """

    overhead: float
    unit: float
    embed: float
    block: int
    margin: float = 0.1

    def __call__(self, n: int, taps: int, reduction: int, out_pixels: int, packed: bool) -> float:
        t = self.overhead + self.unit * math.ceil(n / self.block) * taps * reduction * out_pixels
        return t + (self.embed * n * reduction * taps if packed else 0.0)


# fp32 lanes of oneDNN's CPU kernels (16 with AVX-512, 8 with AVX2), read at import: torch.compile cannot
# trace the string the capability query returns
_SIMD_BLOCK = 16 if "512" in torch.backends.cpu.get_cpu_capability() else 8


def cpu_conv_cost(training: bool = False) -> ConvCost:
    """oneDNN fp32 on CPU, fitted (relative least squares) on single convolutions of the ic_resnet50
    layer shapes at batch 1 and 16 by ``scripts/bench_icconv.py``; ``training``: forward + backward.

    oneDNN computes output channels in SIMD-width blocks (16 fp32 lanes with AVX-512, 8 with AVX2), in
    the backward pass too: a member with 1..16 channels costs as much as one with 16, which is what
    makes a loop of narrow members slow and packing them into one wider conv with a few zero taps
    worthwhile. ``embed`` is the zero-filled packed kernel and its gradient (packed kernels are cached
    when autograd is off).
    """
    block = _SIMD_BLOCK
    if training:
        return ConvCost(overhead=0.45, unit=2.8e-7, embed=1.5e-6, block=block)
    return ConvCost(overhead=0.10, unit=8.3e-8, embed=0.0, block=block)  # packed kernels are cached


def plan_members(
    members: Sequence[_Member],
    kernel: Tuple[int, int],
    reduction: int,
    out_pixels: int,
    in_size: Tuple[int, int],
    device_type: str = "cpu",
    impl: str = "auto",
    group_width: Optional[int] = None,
    rebuild: bool = True,
) -> List[Tuple[int, ...]]:
    """Partition members into packs, each run as one convolution.

    ``"auto"``: greedy agglomeration, merging the two packs whose merge saves the most predicted time
    (:class:`ConvCost`), until no merge saves enough; on devices without a fitted cost model every
    member runs alone. ``"union"``: merge whatever may be merged. ``"loop"``: one pack per member.
    A merge is allowed when (a) the union kernel is no wider (in taps) than the input, where oneDNN
    switches to a slow path and taps fall wholly in padding, and (b) for grouped layers (``group_width``
    output channels per group) the two packs are adjacent and together lie inside one group or span
    whole groups. ``rebuild``: the packed kernels are rebuilt every call (autograd on).
    """
    packs: List[Tuple[int, ...]] = [(i,) for i in range(len(members))]
    if impl == "loop" or len(members) == 1:
        return packs
    model = cpu_conv_cost(rebuild) if device_type == "cpu" else None
    if impl == "auto" and model is None:
        return packs

    def taps(pack: Tuple[int, ...]) -> Tuple[int, int]:
        return _union_grid([members[i].dilation for i in pack], kernel)[0]

    def cost(pack: Tuple[int, ...]) -> float:
        if impl == "union":
            return 1.0
        assert model is not None
        t = taps(pack)
        n = sum(members[i].stop - members[i].start for i in pack)
        return model(n, t[0] * t[1], reduction, out_pixels, len(pack) > 1)

    def mergeable(a: Tuple[int, ...], b: Tuple[int, ...]) -> bool:
        t = taps(a + b)
        if t[0] > in_size[0] or t[1] > in_size[1]:
            return False
        if group_width is None:
            return True
        lo, hi = (a, b) if a[-1] < b[0] else (b, a)
        if lo[-1] + 1 != hi[0]:
            return False
        start, stop = members[lo[0]].start, members[hi[-1]].stop
        one_group = start // group_width == (stop - 1) // group_width
        return one_group or (start % group_width == 0 and stop % group_width == 0)

    margin = model.margin if impl == "auto" and model is not None else 0.0
    costs = [cost(p) for p in packs]
    while len(packs) > 1:
        best, pair = 0.0, None
        for i in range(len(packs)):
            for j in range(i + 1, len(packs)):
                if mergeable(packs[i], packs[j]):
                    pair_cost = costs[i] + costs[j]
                    saving = pair_cost - cost(tuple(sorted(packs[i] + packs[j])))
                    if saving > margin * pair_cost and saving > best:
                        best, pair = saving, (i, j)
        if pair is None:
            break
        i, j = pair
        merged = tuple(sorted(packs[i] + packs[j]))
        packs[i], costs[i] = merged, cost(merged)
        del packs[j], costs[j]
    return sorted(packs)


# ---------------------------------------------------------------------------------------------------
# Pattern files


_KEY = re.compile(r"^\(\s*(\d+)\s*,\s*(\d+)\s*\)$")
# The released segmentation ResNet101 patterns are the detection ones (same file in pattern_zoo).
_ALIASES = {"segmentation_ic_resnet101_k9": "detection_ic_resnet101_k9"}


def official_pattern_names() -> List[str]:
    """Names of the shipped pattern files (yifan123/IC-Conv ``pattern_zoo``), e.g. ``detection_ic_resnet50_k9``."""
    from ..patterns import PATTERN_DIR

    return sorted([p.stem for p in PATTERN_DIR.glob("*.json")] + list(_ALIASES))


def official_pattern_path(name: str) -> Path:
    """Path of a shipped pattern file, by name (see :func:`official_pattern_names`)."""
    from ..patterns import PATTERN_DIR

    path = PATTERN_DIR / f"{_ALIASES.get(name, name)}.json"
    if not path.is_file():
        raise ValueError(f"no official IC-Conv pattern {name!r}; available: {', '.join(official_pattern_names())}")
    return path


def load_patterns(source: PatternSource) -> List[Pattern]:
    """Read dilation patterns, one per layer in network order.

    Args:
        source: a JSON file in the official format (a list of objects whose keys ``"(a, b)"`` mean
            dilation ``(a + 1, b + 1)`` and whose values are channel counts), the name of a shipped
            file, or an already-parsed list: official string keys, or ``(d_h, d_w)`` tuples (1-based).

    Returns:
        ``[{(d_h, d_w): channels}]`` with zero counts dropped, key order kept (it is channel order).
    """
    where = "patterns"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file() and isinstance(source, str) and source in official_pattern_names():
            path = official_pattern_path(source)
        where = str(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
    else:
        data = source
    if not isinstance(data, (list, tuple)):
        raise ValueError(f"{where}: expected a list of patterns (one per layer), got {type(data).__name__}")
    patterns = []
    for i, entry in enumerate(data):
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: entry {i} is a {type(entry).__name__}, expected an object")
        pattern: Pattern = {}
        seen = set()
        for key, count in entry.items():
            if isinstance(key, str):
                match = _KEY.match(key)
                if match is None:
                    raise ValueError(f"{where}: entry {i} has key {key!r}; expected \"(a, b)\" with a, b >= 0")
                d = (int(match.group(1)) + 1, int(match.group(2)) + 1)
            elif isinstance(key, tuple) and len(key) == 2 and all(isinstance(v, int) and v >= 1 for v in key):
                d = key
            else:
                raise ValueError(f"{where}: entry {i} has key {key!r}; expected \"(a, b)\" or a dilation tuple")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"{where}: entry {i}, key {key!r}: count must be a non-negative int, got {count!r}")
            if d in seen:
                raise ValueError(f"{where}: entry {i} gives dilation {d} twice")
            seen.add(d)
            if count:
                pattern[d] = count
        patterns.append(pattern)
    return patterns


def save_patterns(patterns: Sequence[Mapping[Dilation, int]], path: Union[str, Path],
                  grid: Optional[Union[str, int]] = None) -> Path:
    """Write patterns in the official format: keys ``"(a, b)"`` (0-based), every key of the grid present.

    Args:
        patterns: ``[{(d_h, d_w): channels}]`` per layer; key order is channel order. Keys are written
            in grid order with the missing ones at count 0 (the official layout) when that keeps the
            channel order, else the pattern's keys first and the grid's missing ones after them.
        path: output file, written atomically.
        grid: ``"k9"``, ``"k13"`` or a maximum dilation; default the smallest of k9 / k13 that holds every
            dilation (else only the keys present).
    """
    patterns = [_check_pattern(p) for p in patterns]
    used = max((max(d) for p in patterns for d in p), default=1)
    if grid is None:
        grid = next((g for g, d_max in GRIDS.items() if used <= d_max), used)
    if used > _grid_max(grid):
        raise ValueError(f"dilation {used} is outside grid {grid!r}")
    keys = dilation_grid(grid)
    entries = []
    for p in patterns:
        used_in_grid_order = [d for d in keys if d in p] == list(p)
        order = keys if used_in_grid_order else list(p) + [d for d in keys if d not in p]
        entries.append({f"({a - 1}, {b - 1})": p.get((a, b), 0) for a, b in order})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(entries, indent=2) + "\n")
    tmp.replace(path)
    return path


def default_patterns(
    widths: Sequence[int],
    stages: Sequence[int],
    grid: Union[str, int] = "k9",
    early_stages: int = 2,
    units: Optional[Sequence[int]] = None,
) -> List[Pattern]:
    """Hand-set patterns for networks without a searched file, as the IC-Conv author advises
    (yifan123/IC-Conv issues #5, #6): dilation ``(1, 1)`` gets 50% of a layer's channels in early layers
    and 70% in later ones, the rest is spread uniformly over the grid's other dilations.

    "Early" means stages ``0 .. early_stages - 1`` (ResNet ``layer1``-``layer2``, ConvNeXt stages 0-1,
    timm MobileNetV2 ``blocks.0``-``blocks.1``). Counts are in multiples of ``units[i]`` (1 by default;
    a grouped layer's group width): ``round(ratio * blocks)`` blocks go to ``(1, 1)``, the remainder
    is divided evenly and its leftover given one block each to the other dilations in grid order.
    """
    if len(widths) != len(stages):
        raise ValueError(f"{len(widths)} widths but {len(stages)} stages")
    units = list(units) if units is not None else [1] * len(widths)
    others = [d for d in dilation_grid(grid) if d != (1, 1)]
    patterns = []
    for width, stage, unit in zip(widths, stages, units):
        if width % unit:
            raise ValueError(f"width {width} is not a multiple of its unit {unit}")
        blocks = width // unit
        ratio = 0.5 if stage < early_stages else 0.7
        centre = min(blocks, math.floor(ratio * blocks + 0.5))
        share, leftover = divmod(blocks - centre, len(others))
        pattern: Pattern = {(1, 1): centre * unit}
        for i, d in enumerate(others):
            pattern[d] = (share + (i < leftover)) * unit
        patterns.append({d: n for d, n in pattern.items() if n})
    return patterns


# ---------------------------------------------------------------------------------------------------
# Placement


def icconv_sites(model: nn.Module, sites: Sequence[ConvSite], backbone: str) -> List[ConvSite]:
    """The sites IC-Conv replaces, in network order.

    ResNet: every block conv with a 3x3 kernel (both BasicBlock convs, a Bottleneck's ``conv2``; stem,
    1x1 and downsample convs stay), as the official ``ic_resnet``; MobileNetV2 and ConvNeXt: the
    depthwise convs; any other CNN: every conv but the stem with an odd kernel larger than 1.
    """
    chosen = []
    inside = [name for name, m in model.named_modules() if isinstance(m, InceptionConv2d)]
    for site in sites:
        module = get_submodule(model, site.name)
        if type(module) is not nn.Conv2d or any(site.name.startswith(f"{p}.") for p in inside):
            continue
        k = module.kernel_size
        if backbone == RESNET:
            keep = site.role == "block" and k == (3, 3)
        elif backbone in (MOBILENETV2, CONVNEXT):
            keep = site.role == "dw"
        else:
            keep = site.role == "conv"
        if keep and min(k) % 2 == 1 and max(k) > 1:
            chosen.append(site)
    return chosen


def _group_unit(conv: nn.Conv2d) -> int:
    return conv.out_channels // conv.groups if conv.groups > 1 else 1


OFFICIAL_TASKS = ("detection", "segmentation")


def official_task_patterns(arch: str, task: str) -> Optional[str]:
    """The shipped pattern file the official models of ``task`` use on ``arch``, or None if there is none.

    The yifan123/IC-Conv README model zoo pairs every Faster / Cascade R-CNN row with
    ``pattern_zoo/detection/ic_resnet{50,101}_k9.json`` and every Mask R-CNN (instance segmentation) row
    with ``pattern_zoo/segmentation/ic_resnet{50,101}_k9.json``; only ResNet50 and ResNet101 have files.
    """
    if task not in OFFICIAL_TASKS:
        raise ValueError(f"task {task!r}: the official IC-Conv patterns are for {', '.join(OFFICIAL_TASKS)}")
    if arch not in ("resnet50", "resnet101"):
        return None
    return f"{task}_ic_{arch}_k9"


def _official_default(widths: List[int]) -> Optional[List[Pattern]]:
    """The official detection patterns when the layers are those of ResNet50 (16) or ResNet101 (33):
    same count and widths (ResNet18 also has 16 such layers, with other widths)."""
    for name in ("detection_ic_resnet50_k9", "detection_ic_resnet101_k9"):
        patterns = load_patterns(official_pattern_path(name))
        if [sum(p.values()) for p in patterns] == widths:
            return patterns
    return None


def convert_icconv(model: nn.Module, sites: Sequence[ConvSite], backbone: str,
                   options: Optional[Mapping[str, Any]] = None) -> List[Tuple[str, str]]:
    """Replace the IC-Conv sites (:func:`icconv_sites`) by :class:`InceptionConv2d`, layer ``i`` taking
    pattern ``i``.

    Options:
        patterns: a pattern file, the name of a shipped one, or a list (:func:`load_patterns`). Default:
            the official detection k9 patterns when the layers are ResNet50's (16) or ResNet101's (33)
            3x3 convs, else :func:`default_patterns`.
        grid: grid of the default patterns (``"k9"``).
        impl: forward implementation of the new layers (``"auto"``).

    Returns ``(path, "InceptionConv2d")`` per replaced layer.
    """
    options = dict(options or {})
    source = options.pop("patterns", None)
    grid = options.pop("grid", "k9")
    impl = options.pop("impl", "auto")
    if options:
        raise TypeError(f"icconv has no option(s) {sorted(options)}; it accepts ['grid', 'impl', 'patterns']")
    chosen = icconv_sites(model, sites, backbone)
    if not chosen:
        return []
    convs = [get_submodule(model, s.name) for s in chosen]
    widths = [c.out_channels for c in convs]
    if source is not None:
        patterns = load_patterns(source)
    else:
        patterns = (_official_default(widths) if backbone == RESNET else None) or default_patterns(
            widths, [s.stage for s in chosen], grid, units=[_group_unit(c) for c in convs])
    if len(patterns) != len(chosen):
        raise ValueError(f"{len(patterns)} patterns for {len(chosen)} IC-Conv layers "
                         f"({chosen[0].name} ... {chosen[-1].name})")
    for i, (site, conv, pattern) in enumerate(zip(chosen, convs, patterns)):
        if sum(pattern.values()) != conv.out_channels:
            raise ValueError(f"pattern {i} ({site.name}) has {sum(pattern.values())} channels, "
                             f"the layer has {conv.out_channels}")
    replaced = []
    for i, (site, conv, pattern) in enumerate(zip(chosen, convs, patterns)):
        try:
            layer = InceptionConv2d.from_conv(conv, pattern=pattern, impl=impl)
        except ValueError as e:
            raise ValueError(f"pattern {i} ({site.name}): {e}") from None
        set_submodule(model, site.name, layer)
        replaced.append((site.name, InceptionConv2d.__name__))
    return replaced
