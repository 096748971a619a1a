"""EDO: the efficient dilation optimisation of IC-Conv, as library functions.

Liu et al., "Inception Convolution with Efficient Dilation Search", CVPR 2021, arXiv:2012.13587. The
search code was never released (yifan123/IC-Conv issues #1, #3); this follows the paper's description
and the author's answers (issues #5, #9):

1. :func:`build_supernet`: every layer IC-Conv would replace (:func:`~dynconv.ops.icconv.icconv_sites`)
   becomes a dense :class:`SupernetConv2d` covering the whole dilation grid (9x9 for 3x3 kernels and the
   "k9" grid, 13x13 for "k13"); :func:`train_supernet` trains it briefly.
2. :func:`select_dilations`: for every output channel and every candidate dilation, the representation
   error of the dilated kernel is computed in parallel and the cheapest dilation is chosen
   (:func:`dilation_errors` states the criterion).
3. Channels are grouped by dilation, giving a pattern file (:meth:`EDOResult.save`).
4. :func:`build_icconv` builds the IC network from the patterns. Like the paper (its ImageNet
   "retrain" checkpoints), the network is then trained from scratch; :func:`inherit_layer` shows the
   selection on one layer by copying the supernet's values at the chosen taps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import conv_sites, detect_backbone, get_submodule, set_submodule
from .ops.icconv import Dilation, InceptionConv2d, Pattern, convert_icconv, dilation_grid, icconv_sites, save_patterns

Grid = Union[str, int]


class SupernetConv2d(nn.Conv2d):
    """A dense conv holding every dilation of a grid: kernel ``(k - 1) d_max + 1`` per axis, dilation 1,
    padding chosen so the output has the size of the ``k x k`` conv it replaces.

    Attributes:
        base_kernel_size, base_padding, base_dilation: those of the replaced conv.
        max_dilation: ``d_max`` of the grid.
    """

    def __init__(self, in_channels: int, out_channels: int, base_kernel_size: Tuple[int, int], max_dilation: int,
                 stride: Tuple[int, int] = (1, 1), padding: Tuple[int, int] = (1, 1),
                 dilation: Tuple[int, int] = (1, 1), groups: int = 1, bias: bool = False) -> None:
        kernel = tuple((k - 1) * max_dilation + 1 for k in base_kernel_size)
        # Same output size as the replaced conv: its padding, plus the extra reach of the bigger kernel.
        pad = tuple(p + (max_dilation - d) * (k - 1) // 2 for p, d, k in zip(padding, dilation, base_kernel_size))
        super().__init__(in_channels, out_channels, kernel, stride, pad, 1, groups, bias)
        self.base_kernel_size = tuple(base_kernel_size)
        self.base_padding = tuple(padding)
        self.base_dilation = tuple(dilation)
        self.max_dilation = max_dilation

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, max_dilation: int, init: str = "centre") -> "SupernetConv2d":
        """Supernet layer built from ``conv``.

        ``init="centre"`` (default): ``conv``'s kernel at its own taps, zero elsewhere. The supernet
        starts as exactly the network it came from (pretrained or fresh), and at selection time the
        mass on the other taps is only what supernet training put there: a channel without such
        evidence keeps dilation ``(1, 1)``, which is what the released patterns mostly hold. A short
        search from a fresh network therefore keeps ``(1, 1)`` almost everywhere.
        ``init="kaiming"``: the whole dense kernel drawn like the official ResNet init (normal, fan-out),
        a dense network trained from scratch as the paper's supernet; every tap starts with random mass,
        so the selection means something only once training has moved it (``scripts/edo_search.py``).
        """
        if init not in ("centre", "kaiming"):
            raise ValueError(f"unknown supernet init {init!r}; choose 'centre' or 'kaiming'")
        if isinstance(conv.padding, str):
            padding = tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation)) \
                if conv.padding == "same" else (0, 0)
        else:
            padding = conv.padding
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, max_dilation, conv.stride, padding,
                    conv.dilation, conv.groups, conv.bias is not None).to(conv.weight.device, conv.weight.dtype)
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            else:
                layer.weight.zero_()
                rows, cols = (_tap_index(k, d, max_dilation) for k, d in zip(conv.kernel_size, conv.dilation))
                layer.weight[:, :, rows[:, None], cols[None, :]] = conv.weight
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base_kernel_size={self.base_kernel_size}, max_dilation={self.max_dilation}"


def _tap_index(k: int, d: int, d_max: int) -> torch.Tensor:
    """Positions, in a supernet kernel of ``(k - 1) d_max + 1`` taps, of a ``k``-tap kernel dilated by ``d``."""
    centre = (k - 1) * d_max // 2
    return centre + d * (torch.arange(k) - (k - 1) // 2)


def tap_masks(base_kernel_size: Tuple[int, int], grid: Grid = "k9") -> torch.Tensor:
    """``[P, E_h, E_w]`` booleans: which supernet taps the dilated ``k x k`` kernel of each grid dilation
    (in :func:`~dynconv.ops.icconv.dilation_grid` order) uses."""
    dilations = dilation_grid(grid)
    d_max = max(max(d) for d in dilations)
    size = [(k - 1) * d_max + 1 for k in base_kernel_size]
    masks = torch.zeros(len(dilations), *size, dtype=torch.bool)
    for p, (dh, dw) in enumerate(dilations):
        rows = _tap_index(base_kernel_size[0], dh, d_max)
        cols = _tap_index(base_kernel_size[1], dw, d_max)
        masks[p, rows[:, None], cols[None, :]] = True
    return masks


def dilation_errors(weight: torch.Tensor, base_kernel_size: Tuple[int, int], grid: Grid = "k9") -> torch.Tensor:
    """EDO's representation error of every grid dilation for every output channel: ``[C_out, P]``.

    Criterion. Output channel ``c`` of the supernet computes ``y_c(u) = sum_t sum_i K_c[i, t] x_i(u + t)``
    over all taps ``t`` of the dense kernel ``K_c``. A dilated ``k x k`` kernel using the taps ``S_p``
    of dilation ``p``, with ``K_c``'s values there, computes the same sum restricted to ``t in S_p``, so
    the response error is ``e(u) = sum_{t not in S_p} sum_i K_c[i, t] x_i(u + t)`` and

        E|e| <= sum_{t not in S_p} sum_i |K_c[i, t]| E|x_i|  =  mu ||K_c - K_c restricted to S_p||_1

    for inputs whose channels have one mean magnitude ``mu`` (BN-normalised, stationary feature maps).
    ``mu`` is common to all candidates, so the chosen dilation minimises the L1 distance between the
    dense kernel and its restriction to the dilation's taps, which is also the smallest L1 distance to
    any kernel supported on those taps: the "L1 error between weights" the author said the derivation
    ends in (issue #9). Computed for all channels and dilations at once: the L1 mass per tap times the
    off-pattern tap masks, one matmul.
    """
    masks = tap_masks(base_kernel_size, grid).to(weight.device)
    if tuple(weight.shape[-2:]) != tuple(masks.shape[-2:]):
        raise ValueError(f"kernel {tuple(weight.shape[-2:])} does not hold grid {grid!r} for base kernel "
                         f"{tuple(base_kernel_size)} (needs {tuple(masks.shape[-2:])})")
    mass = weight.detach().abs().sum(1).flatten(1)  # [C_out, taps]
    return mass @ (~masks).flatten(1).to(mass.dtype).T


@dataclass
class EDOLayer:
    """The search result of one layer.

    Attributes:
        name: module path.
        assignment: grid index of the dilation chosen per output channel (original channel order).
        relative_error: chosen L1 error over the channel's total L1 mass, per channel.
        order: ``order[i]`` = original channel that becomes channel ``i`` of the IC layer (channels
            grouped by dilation in grid order, stable).
        pattern: ``{(d_h, d_w): channels}`` in grid order (zero counts dropped).
    """

    name: str
    assignment: torch.Tensor
    relative_error: torch.Tensor
    order: torch.Tensor
    pattern: Pattern


@dataclass
class EDOResult:
    """Per-layer results of :func:`select_dilations`, in network order."""

    grid: Grid
    layers: List[EDOLayer]

    @property
    def patterns(self) -> List[Pattern]:
        return [layer.pattern for layer in self.layers]

    def histogram(self) -> Dict[Dilation, int]:
        """Channels per dilation over all layers, in grid order."""
        counts = {d: 0 for d in dilation_grid(self.grid)}
        for layer in self.layers:
            for d, n in layer.pattern.items():
                counts[d] += n
        return counts

    def save(self, path: Union[str, Path]) -> Path:
        """Write the patterns in the official format (every grid key present)."""
        return save_patterns(self.patterns, path, self.grid)


def _max_dilation(grid: Grid) -> int:
    return max(max(d) for d in dilation_grid(grid))


def build_supernet(model: nn.Module, grid: Grid = "k9", backbone: Optional[str] = None,
                   init: str = "centre") -> List[str]:
    """Replace, in place, every layer IC-Conv would replace by a :class:`SupernetConv2d` of the grid
    (``init``: see :meth:`SupernetConv2d.from_conv`). Returns the replaced paths in network order."""
    backbone = backbone or detect_backbone(model)
    d_max = _max_dilation(grid)
    names = []
    for site in icconv_sites(model, conv_sites(model, backbone), backbone):
        conv = get_submodule(model, site.name)
        set_submodule(model, site.name, SupernetConv2d.from_conv(conv, d_max, init))
        names.append(site.name)
    if not names:
        raise ValueError(f"no IC-Conv site in this {backbone} model ({type(model).__name__})")
    return names


def supernet_layers(model: nn.Module) -> List[Tuple[str, SupernetConv2d]]:
    """``(path, layer)`` of every :class:`SupernetConv2d` in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SupernetConv2d)]


def _epochs(loader: Iterable) -> Iterator:
    """The loader's batches, epoch after epoch (re-iterated, so a shuffling loader reshuffles)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the loader yields no batch")


def train_supernet(model: nn.Module, loader: Iterable, steps: int, lr: float = 0.05, momentum: float = 0.9,
                   weight_decay: float = 1e-4, device: Union[str, torch.device] = "cpu") -> List[float]:
    """Train ``model`` for ``steps`` SGD steps with cross-entropy (cosine learning rate), cycling over
    ``loader`` of ``(images, labels)``. Returns the loss of every step."""
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses: List[float] = []
    for _, (images, labels) in zip(range(steps), _epochs(loader)):
        loss = F.cross_entropy(model(images.to(device)), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def select_dilations(model: nn.Module, grid: Optional[Grid] = None) -> EDOResult:
    """Choose a dilation per output channel of every :class:`SupernetConv2d` (minimal
    :func:`dilation_errors`; ties go to the first dilation in grid order, i.e. ``(1, 1)``).

    In a grouped layer with several channels per group, the choice is made per group (errors summed),
    so every dilation takes whole groups as :class:`~dynconv.ops.icconv.InceptionConv2d` requires.
    """
    layers = supernet_layers(model)
    if not layers:
        raise ValueError("model has no SupernetConv2d layer; call build_supernet first")
    if grid is None:
        grid = next((g for g in ("k9", "k13") if _max_dilation(g) == layers[0][1].max_dilation),
                    layers[0][1].max_dilation)
    dilations = dilation_grid(grid)
    out = []
    for name, conv in layers:
        if conv.max_dilation != _max_dilation(grid):
            raise ValueError(f"{name} was built for dilations up to {conv.max_dilation}, not grid {grid!r}")
        errors = dilation_errors(conv.weight, conv.base_kernel_size, grid)
        unit = conv.out_channels // conv.groups if conv.groups > 1 else 1
        choice = errors.view(-1, unit, errors.shape[1]).sum(1).argmin(1).repeat_interleave(unit)
        total = conv.weight.detach().abs().sum((1, 2, 3)).clamp_min(torch.finfo(errors.dtype).tiny)
        relative = errors.gather(1, choice[:, None])[:, 0] / total
        order = torch.sort(choice, stable=True).indices
        counts = torch.bincount(choice, minlength=len(dilations)).tolist()
        pattern = {d: n for d, n in zip(dilations, counts) if n}
        out.append(EDOLayer(name, choice.cpu(), relative.cpu(), order.cpu(), pattern))
    return EDOResult(grid, out)


def search(model: nn.Module, loader: Iterable, grid: Grid = "k9", steps: int = 100, lr: float = 0.05,
           device: Union[str, torch.device] = "cpu", init: str = "centre") -> EDOResult:
    """Build the supernet of ``model`` in place, train it for ``steps`` and select the dilations."""
    build_supernet(model, grid, init=init)
    train_supernet(model, loader, steps, lr=lr, device=device)
    return select_dilations(model, grid)


def build_icconv(model: nn.Module, patterns: Union[EDOResult, Sequence[Pattern], str, Path],
                 backbone: Optional[str] = None) -> List[Tuple[str, str]]:
    """Turn a fresh ``model`` (same architecture as the searched one) into its IC network, in place.

    Its IC layers are initialised like the official IC-ResNet and are meant to be trained from scratch,
    as the paper retrains the searched network on ImageNet. Supernet weights are not carried over:
    grouping channels by dilation permutes a layer's outputs, and in general that permutation cannot be
    pushed into what consumes them (residual sums, depthwise convs reading the residual stream).
    """
    backbone = backbone or detect_backbone(model)
    source = patterns.patterns if isinstance(patterns, EDOResult) else patterns
    replaced = convert_icconv(model, conv_sites(model, backbone), backbone, {"patterns": source})
    if not replaced:
        raise ValueError(f"no IC-Conv site in this {backbone} model ({type(model).__name__})")
    return replaced


def inherit_layer(conv: SupernetConv2d, layer: EDOLayer) -> InceptionConv2d:
    """The IC layer of one searched supernet layer, with the supernet's values at each channel's taps.

    Output channel ``i`` of the returned layer approximates supernet channel ``layer.order[i]``, exactly
    when the supernet kernel is zero off the chosen taps. Dense layers only (``groups == 1``).
    """
    if conv.groups != 1:
        raise ValueError("inherit_layer supports groups == 1 only: a grouped layer's inputs follow its outputs")
    ic = InceptionConv2d(conv.in_channels, conv.out_channels, conv.base_kernel_size, conv.stride, conv.base_padding,
                         conv.base_dilation, 1, conv.bias is not None, pattern=layer.pattern)
    ic = ic.to(conv.weight.device, conv.weight.dtype)
    with torch.no_grad():
        start = 0
        for member, d in zip(ic.conv_list, ic.dilations):
            channels = layer.order[start:start + member.out_channels].to(conv.weight.device)
            rows, cols = (_tap_index(k, dd, conv.max_dilation) for k, dd in zip(conv.base_kernel_size, d))
            member.weight.copy_(conv.weight[channels][:, :, rows[:, None], cols[None, :]])
            start += member.out_channels
        if conv.bias is not None:
            ic.bias.copy_(conv.bias[layer.order.to(conv.bias.device)])
    return ic
