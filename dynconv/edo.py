"""EDO: the efficient dilation optimisation of IC-Conv, as library functions.

Liu et al., "Inception Convolution with Efficient Dilation Search", CVPR 2021, arXiv:2012.13587,
Section 3.2 and Fig. 2. The search code was never released (yifan123/IC-Conv issues #1, #3); this
follows the paper's description and the author's answers (issues #5, #9):

1. :func:`build_supernet`: every layer IC-Conv would replace (:func:`~dynconv.surgery.icconv.icconv_sites`)
   becomes a dense :class:`SupernetConv2d` covering the whole dilation grid (9x9 for 3x3 kernels and the
   "k9" grid, 13x13 for "k13"); :func:`train_supernet` pre-trains it (by default for a full ImageNet
   schedule: "first train the net with 9x9 convs, then generate the patterns", issue #5).
2. :func:`collect_input_means`: one pass over a sample of the training data records the expected input
   of every supernet layer.
3. :func:`select_dilations`: for every output channel and every candidate dilation, the representation
   error of the dilated kernel is computed in parallel and the cheapest dilation is chosen. The default
   error is the paper's, the L1 distance between the expected outputs of the supernet layer and of the
   dilated conv cropped from it (:func:`expected_output_errors`); ``criterion="weight"`` uses the
   off-pattern weight mass instead (:func:`dilation_errors`), which needs no data.
4. Channels are grouped by dilation, giving a pattern file (:meth:`EDOResult.save`).
5. :func:`build_icconv` builds the IC network from the patterns. Like the paper (its ImageNet
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

from .surgery.sites import conv_sites, detect_backbone, get_submodule, set_submodule
from .ops.icconv import Dilation, InceptionConv2d, Pattern
from .patterns import dilation_grid, save_patterns
from .surgery.icconv import convert_icconv, icconv_sites

Grid = Union[str, int]


class SupernetConv2d(nn.Conv2d):
    """A dense conv holding every dilation of a grid: kernel ``(k - 1) d_max + 1`` per axis, dilation 1,
    padding chosen so the output has the size of the ``k x k`` conv it replaces.

    Attributes:
        base_kernel_size, base_padding, base_dilation: those of the replaced conv.
        max_dilation: ``d_max`` of the grid.
        input_mean: ``[C_in, H, W]`` mean input over a data sample (:func:`collect_input_means`), or ``None``.
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
        # E[x] per input channel and position, set by collect_input_means (not part of the checkpoint).
        self.input_mean: Optional[torch.Tensor]
        self.register_buffer("input_mean", None, persistent=False)

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
        so the selection means something only once training has moved it (:func:`search` and
        ``scripts/edo_search.py`` use it).
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
    (in :func:`~dynconv.patterns.dilation_grid` order) uses."""
    dilations = dilation_grid(grid)
    d_max = max(max(d) for d in dilations)
    size = [(k - 1) * d_max + 1 for k in base_kernel_size]
    masks = torch.zeros(len(dilations), *size, dtype=torch.bool)
    for p, (dh, dw) in enumerate(dilations):
        rows = _tap_index(base_kernel_size[0], dh, d_max)
        cols = _tap_index(base_kernel_size[1], dw, d_max)
        masks[p, rows[:, None], cols[None, :]] = True
    return masks


CRITERIA = ("expected_output", "weight")


def dilation_errors(weight: torch.Tensor, base_kernel_size: Tuple[int, int], grid: Grid = "k9") -> torch.Tensor:
    """The weight-only representation error (``criterion="weight"``) of every grid dilation for every
    output channel: ``[C_out, P]``, the L1 mass of the dense kernel off the dilation's taps.

    Output channel ``c`` of the supernet computes ``y_c(u) = sum_t sum_i K_c[i, t] x_i(u + t)`` over
    all taps ``t`` of the dense kernel ``K_c``. The dilated ``k x k`` kernel cropped to the taps ``S_p``
    of dilation ``p`` computes the same sum restricted to ``t in S_p``, so the response error is
    ``e(u) = sum_{t not in S_p} sum_i K_c[i, t] x_i(u + t)`` and

        E|e| <= sum_{t not in S_p} sum_i |K_c[i, t]| E|x_i|  =  mu ||K_c - K_c restricted to S_p||_1

    for inputs whose channels share one mean magnitude ``mu``. ``mu`` is common to all candidates, so
    this needs no data: the chosen dilation minimises the L1 distance between the dense kernel and its
    crop, an "L1 error between weights" as the IC-Conv author describes the end of the paper's
    derivation (yifan123/IC-Conv issue #9). It ignores what the inputs do on each tap (zero-mean
    channels, padding); :func:`expected_output_errors` is the paper's criterion with the input's
    statistics. Computed for all channels and dilations at once: the L1 mass per tap times the
    off-pattern tap masks, one matmul.
    """
    masks = tap_masks(base_kernel_size, grid).to(weight.device)
    if tuple(weight.shape[-2:]) != tuple(masks.shape[-2:]):
        raise ValueError(f"kernel {tuple(weight.shape[-2:])} does not hold grid {grid!r} for base kernel "
                         f"{tuple(base_kernel_size)} (needs {tuple(masks.shape[-2:])})")
    mass = weight.detach().abs().sum(1).flatten(1)  # [C_out, taps]
    return mass @ (~masks).flatten(1).to(mass.dtype).T


def expected_output_errors(weight: torch.Tensor, input_mean: torch.Tensor, base_kernel_size: Tuple[int, int],
                           grid: Grid = "k9", stride: Tuple[int, int] = (1, 1),
                           padding: Optional[Tuple[int, int]] = None, groups: int = 1,
                           max_elements: int = 1 << 24) -> torch.Tensor:
    """EDO's representation error, as the paper states it (Liu et al. 2021, Section 3.2): for every
    output channel ``c`` and grid dilation ``p``, ``|| E[W * X]_c - E[W_p * X]_c ||_1``, the L1 distance
    between the expected output map of the supernet layer (dense kernel ``W``) and that of the dilated
    conv whose kernel ``W_p`` is ``W`` cropped to the dilation's taps. Returns ``[C_out, P]``.

    A convolution is linear, so ``E[W * X] = W * E[X]``: the expectations need only the layer's mean input
    ``input_mean`` ``[C_in, H, W]`` (per channel and position, :func:`collect_input_means`), and the
    difference is the conv of ``E[X]`` with the off-pattern part of ``W``. The mean is kept per position
    and the norm runs over the output map because the expectation of an output channel is a map: taps
    that read the zero padding at the borders, or positions with other statistics, count where they
    occur. For stationary statistics away from the borders the map is constant and the error is ``H' W'``
    times ``|sum_i E[x_i] sum_{t not in S_p} W[c, i, t]|``, so the choice is the same as with per-channel
    means. Taps on zero-mean input contribute nothing, unlike in :func:`dilation_errors`. A bias is shared
    by both convs and cancels.

    All dilations are scored in parallel without running a conv per dilation: the per-tap responses
    ``r_t(u) = sum_i W[c, i, t] E[x_i](u + t)`` (one unfold of ``E[X]``) are summed over each dilation's
    off-pattern taps with one matmul, in chunks of about ``max_elements`` values.

    Args:
        weight: dense kernels ``[C_out, C_in / groups, E_h, E_w]`` of the grid (``E = (k - 1) d_max + 1``).
        input_mean: ``E[X]`` ``[C_in, H, W]``.
        base_kernel_size: ``k``, the kernel size of the replaced conv.
        stride, padding, groups: those of the dense conv (default padding: ``(E - 1) / 2``, "same").
    """
    masks = tap_masks(base_kernel_size, grid).to(weight.device)
    size = tuple(masks.shape[-2:])
    if tuple(weight.shape[-2:]) != size:
        raise ValueError(f"kernel {tuple(weight.shape[-2:])} does not hold grid {grid!r} for base kernel "
                         f"{tuple(base_kernel_size)} (needs {size})")
    c_out, c_in_g = weight.shape[:2]
    if input_mean.dim() != 3 or input_mean.shape[0] != c_in_g * groups:
        raise ValueError(f"input_mean must be [C_in={c_in_g * groups}, H, W], got {tuple(input_mean.shape)}")
    if padding is None:
        padding = tuple((e - 1) // 2 for e in size)
    taps = size[0] * size[1]
    w = weight.detach().reshape(groups, c_out // groups, c_in_g, taps)
    cols = F.unfold(input_mean.detach().to(weight.device, weight.dtype)[None], size, padding=padding, stride=stride)
    cols = cols.view(groups, c_in_g, taps, -1)  # E[x](u + t) for every output position u: [g, C_in/g, T, L]
    off = (~masks).flatten(1).to(weight.dtype)  # [P, T]
    per_out = c_out // groups
    per_channel = taps * cols.shape[-1]
    chunk_c = max(1, min(per_out, max_elements // per_channel))
    chunk_g = max(1, max_elements // (per_channel * chunk_c)) if chunk_c == per_out else 1
    errors = weight.new_empty(groups, per_out, len(masks))
    for g in range(0, groups, chunk_g):
        for c in range(0, per_out, chunk_c):
            responses = torch.einsum("gcit,gitl->gctl", w[g:g + chunk_g, c:c + chunk_c], cols[g:g + chunk_g])
            difference = torch.einsum("gctl,pt->gcpl", responses, off)  # E[W X] - E[W_p X], per position
            errors[g:g + chunk_g, c:c + chunk_c] = difference.abs().sum(-1)
    return errors.view(c_out, len(masks))


@dataclass
class EDOLayer:
    """The search result of one layer.

    Attributes:
        name: module path.
        assignment: grid index of the dilation chosen per output channel (original channel order).
        relative_error: chosen error over the channel's size, per channel: its L1 weight mass
            (``criterion="weight"``) or the L1 norm of its expected output map (``"expected_output"``).
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
    """Per-layer results of :func:`select_dilations`, in network order, and the criterion used."""

    grid: Grid
    layers: List[EDOLayer]
    criterion: str = "expected_output"

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


# Supernet pre-training defaults. The IC-Conv text we could read does not give the supernet's schedule;
# the author's advice is to train the network with the large (9x9) convs first (yifan123/IC-Conv issue
# #5), i.e. a full training run. The defaults are therefore the standard ImageNet ResNet schedule of the
# dynamic-conv papers reproduced here (He et al. 2016; OSVAI/ODConv main.py, README ResNet command):
# 100 epochs of SGD, momentum 0.9, lr 0.1 at batch 256, weight decay 1e-4, lr x0.1 at epochs 30, 60, 90.
SUPERNET_EPOCHS = 100.0
SUPERNET_LR = 0.1  # at batch 256; scale linearly with the batch size
SUPERNET_MILESTONES = (0.3, 0.6, 0.9)  # fractions of the run: epochs 30, 60, 90 of 100


def train_supernet(model: nn.Module, loader: Iterable, epochs: float = SUPERNET_EPOCHS, *,
                   steps: Optional[int] = None, lr: float = SUPERNET_LR, momentum: float = 0.9,
                   weight_decay: float = 1e-4, milestones: Sequence[float] = SUPERNET_MILESTONES,
                   gamma: float = 0.1, device: Union[str, torch.device] = "cpu") -> List[float]:
    """Pre-train ``model`` (its supernet layers built) with cross-entropy, cycling over ``loader`` of
    ``(images, labels)``. Returns the loss of every step.

    Args:
        epochs: run length in passes over ``loader`` (needs ``len(loader)``); default the full schedule
            (:data:`SUPERNET_EPOCHS`).
        steps: run length in SGD steps instead of ``epochs`` (short runs, tests).
        lr, momentum, weight_decay: SGD (weight decay on every parameter, as ODConv's main.py).
        milestones: the learning rate is multiplied by ``gamma`` after these fractions of the run.
    """
    total = int(steps) if steps is not None else math.ceil(epochs * len(loader))  # type: ignore[arg-type]
    if total < 1:
        raise ValueError(f"the supernet needs at least one training step (epochs={epochs}, steps={steps})")
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    boundaries = [round(m * total) for m in milestones]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: gamma ** sum(s >= b for b in boundaries))
    losses: List[float] = []
    for _, (images, labels) in zip(range(total), _epochs(loader)):
        loss = F.cross_entropy(model(images.to(device)), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def collect_input_means(model: nn.Module, loader: Iterable, batches: Optional[int] = 64,
                        device: Union[str, torch.device] = "cpu") -> int:
    """One pass over (a sample of) ``loader`` recording ``E[X]`` per input channel and position for every
    :class:`SupernetConv2d` (its ``input_mean``), the statistics :func:`expected_output_errors` needs.

    The network runs in eval mode (BatchNorm with its running statistics: the pre-trained network as it
    computes), without gradients; train/eval flags are restored afterwards. Means are accumulated in
    float64. Every batch must give each layer inputs of one spatial size (fixed-size crops), since the
    expectation is taken per position. ``batches=None`` reads the whole loader. Returns the number of
    images averaged.
    """
    layers = supernet_layers(model)
    if not layers:
        raise ValueError("model has no SupernetConv2d layer; call build_supernet first")
    sums: Dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach()
            total = x.sum(0, dtype=torch.float64)
            if name in sums and sums[name].shape != total.shape:
                raise ValueError(f"{name} saw inputs of size {tuple(total.shape[1:])} after "
                                 f"{tuple(sums[name].shape[1:])}: the expectation is per position, "
                                 "so the statistics pass needs fixed-size inputs")
            sums[name] = sums[name] + total if name in sums else total
        return record

    modes = {m: m.training for m in model.modules()}
    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers]
    count = 0
    try:
        model.to(device).eval()
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if batches is not None and i >= batches:
                    break
                images = batch[0] if isinstance(batch, (list, tuple)) else batch
                model(images.to(device))
                count += images.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    if not count:
        raise ValueError("the loader yields no batch")
    for name, layer in layers:
        if name not in sums:
            raise ValueError(f"{name} was not run by the model's forward")
        layer.input_mean = (sums[name] / count).to(layer.weight.dtype)
    return count


def _layer_errors(conv: SupernetConv2d, grid: Grid, criterion: str, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(errors [C_out, P], reference [C_out])``: the criterion's errors and the size they are relative to
    (the channel's L1 weight mass, or the L1 norm of its expected output map)."""
    weight = conv.weight.detach()
    if criterion == "weight":
        return dilation_errors(weight, conv.base_kernel_size, grid), weight.abs().sum((1, 2, 3))
    if conv.input_mean is None:
        raise ValueError(f"{name} has no input statistics: criterion='expected_output' needs "
                         "collect_input_means(model, loader) first (or criterion='weight')")
    errors = expected_output_errors(weight, conv.input_mean, conv.base_kernel_size, grid, conv.stride,
                                    conv.padding, conv.groups)  # type: ignore[arg-type]
    # The expected output map itself: the conv of E[X] with the whole kernel (the "pattern" with no tap).
    mean = conv.input_mean.to(weight.device, weight.dtype)[None]
    full = F.conv2d(mean, weight, None, conv.stride, conv.padding, 1, conv.groups)[0]
    return errors, full.abs().sum((1, 2))


def select_dilations(model: nn.Module, grid: Optional[Grid] = None, criterion: str = "expected_output") -> EDOResult:
    """Choose a dilation per output channel of every :class:`SupernetConv2d`: the one with the smallest
    representation error (ties go to the first dilation in grid order, i.e. ``(1, 1)``).

    ``criterion="expected_output"`` (default, the paper's): :func:`expected_output_errors`, from the
    statistics :func:`collect_input_means` stored on the layers. ``criterion="weight"``:
    :func:`dilation_errors`, from the weights alone.

    In a grouped layer with several channels per group, the choice is made per group (errors summed),
    so every dilation takes whole groups as :class:`~dynconv.ops.icconv.InceptionConv2d` requires.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {CRITERIA}")
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
        errors, reference = _layer_errors(conv, grid, criterion, name)
        unit = conv.out_channels // conv.groups if conv.groups > 1 else 1
        choice = errors.view(-1, unit, errors.shape[1]).sum(1).argmin(1).repeat_interleave(unit)
        relative = errors.gather(1, choice[:, None])[:, 0] / reference.clamp_min(torch.finfo(errors.dtype).tiny)
        order = torch.sort(choice, stable=True).indices
        counts = torch.bincount(choice, minlength=len(dilations)).tolist()
        pattern = {d: n for d, n in zip(dilations, counts) if n}
        out.append(EDOLayer(name, choice.cpu(), relative.cpu(), order.cpu(), pattern))
    return EDOResult(grid, out, criterion)


def search(model: nn.Module, loader: Iterable, grid: Grid = "k9", epochs: float = SUPERNET_EPOCHS, *,
           steps: Optional[int] = None, lr: float = SUPERNET_LR, device: Union[str, torch.device] = "cpu",
           init: str = "kaiming", criterion: str = "expected_output",
           statistics_batches: Optional[int] = 64) -> EDOResult:
    """The whole search on ``model`` (modified in place): build the supernet (``init="kaiming"``: a
    dense network trained from scratch, the paper's supernet), pre-train it (:func:`train_supernet`;
    the full schedule by default, ``steps`` for a short run), collect the input statistics over
    ``statistics_batches`` batches of ``loader`` (expected-output criterion only) and select the
    dilations."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {CRITERIA}")
    build_supernet(model, grid, init=init)
    train_supernet(model, loader, epochs, steps=steps, lr=lr, device=device)
    if criterion == "expected_output":
        collect_input_means(model, loader, statistics_batches, device)
    return select_dilations(model, grid, criterion)


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
