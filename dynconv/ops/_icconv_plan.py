"""How an :class:`~dynconv.ops.icconv.InceptionConv2d` runs its dilation members: which members share one
convolution (a pack whose kernel holds each member's taps zero-embedded in the union tap grid), chosen per
input size by a cost model fitted to oneDNN on CPU (:func:`dynconv.ops._cpu_tuning.cpu_conv_cost`).

This is speed machinery only: the layer's math is one dense convolution per member, concatenated
(:meth:`~dynconv.ops.icconv.InceptionConv2d.forward_loop`), and every plan computes exactly that.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from . import _cpu_tuning

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
    (:class:`~dynconv.ops._cpu_tuning.ConvCost`), until no merge saves enough; on devices without a fitted cost model every
    member runs alone. ``"union"``: merge whatever may be merged. ``"loop"``: one pack per member.
    A merge is allowed when (a) the union kernel is no wider (in taps) than the input, where oneDNN
    switches to a slow path and taps fall wholly in padding, and (b) for grouped layers (``group_width``
    output channels per group) the two packs are adjacent and together lie inside one group or span
    whole groups. ``rebuild``: the packed kernels are rebuilt every call (autograd on).
    """
    packs: List[Tuple[int, ...]] = [(i,) for i in range(len(members))]
    if impl == "loop" or len(members) == 1:
        return packs
    model = _cpu_tuning.cpu_conv_cost(rebuild) if device_type == "cpu" else None
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
