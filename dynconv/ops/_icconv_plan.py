"""How an :class:`~dynconv.ops.icconv.InceptionConv2d` runs its dilation members: which members share one
convolution (a pack whose kernel holds each member's taps zero-embedded in the union tap grid), chosen per
input size by a cost model fitted to oneDNN on CPU (``scripts/bench_icconv.py``, ``results/icconv_fused_cpu.md``).

This is speed machinery only: the layer's math is one dense convolution per member, concatenated
(:meth:`~dynconv.ops.icconv.InceptionConv2d.forward_loop`), and every plan computes exactly that.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

Dilation = Tuple[int, int]


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
