"""The one shared hot path for per-sample-kernel convolutions.

Every dynamic layer in :mod:`dynconv.ops` describes its kernels (:mod:`dynconv.ops.kernels`: given, mixed
from a bank, or KernelWarehouse cells, with per-sample factors per tap, input and output channel) and hands
the description to :func:`per_sample_conv2d`, which convolves each sample with its own kernel. Keeping that
here means the speed and memory work lands in one place, out of the layers' sight.

The per-sample convolution has three paths (:func:`choose_path`): one ordinary convolution for a
single sample; the batch folded into the channel axis as one convolution with ``groups * B``
groups, the trick of CondConv in timm (pytorch/pytorch#17983) and of the official ODConv /
KernelWarehouse code, fast on large maps; and one batched matmul over the unfolded input
(:mod:`~dynconv.ops._matmul`), fast on small maps and 1x1 kernels, and the one path that exports with a
dynamic batch size. On that path KernelWarehouse skips assembling its kernels from cells
(:mod:`~dynconv.ops._cells`). Kernels the call forms are rebuilt in the backward instead of kept
(:mod:`~dynconv.ops._recompute`). The thresholds are measured: :mod:`~dynconv.ops._cpu_tuning`.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .._compat import autocast_enabled, contiguous_grad, is_exporting
from . import _cpu_tuning
from ._cells import cell_conv2d
from ._matmul import _matmul_conv
from ._recompute import KernelRecipes, rebuilt_in_backward, tracing
from .kernels import Kernels, MixedKernels, WarehouseCells, mix_kernels

__all__ = ["PATHS", "cell_conv2d", "choose_path", "choose_path_for", "conv_patches", "folds_out_scale",
           "forced_path", "mix_kernels", "per_sample_conv2d"]

Padding = Union[str, Sequence[int]]
Description = Union[torch.Tensor, Kernels, MixedKernels, WarehouseCells]

PATHS = ("plain", "grouped", "matmul")
# The path every per-sample conv of the current context takes (None: each chooses its own); set by
# :func:`forced_path`, a context variable so that threads and tasks each see their own.
_FORCED_PATH: ContextVar[Optional[str]] = ContextVar("dynconv_forced_path", default=None)


@contextlib.contextmanager
def forced_path(path: str) -> Iterator[None]:
    """Every per-sample conv in the block takes ``path`` (except while exporting). MAC counting uses
    ``"grouped"``, so that its op counter sees each per-sample conv as a convolution at any batch size."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; choose one of {PATHS}")
    token = _FORCED_PATH.set(path)
    try:
        yield
    finally:
        _FORCED_PATH.reset(token)


def choose_path(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Padding,
                groups: int) -> str:
    """The per-sample conv path for this call: ``"plain"`` (one sample: an ordinary conv),
    ``"grouped"`` (the batch folded into the groups of one conv) or ``"matmul"`` (one batched matmul
    over the unfolded input).

    While exporting (``torch.export`` / ONNX) the answer is ``"matmul"`` for every shape: the other
    paths read the batch size into the graph (``groups * B``, ``B == 1``), which would fix it there.
    """
    return choose_path_for(x, weight.shape[-2:], stride, padding, groups)


def choose_path_for(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Padding,
                    groups: int) -> str:
    """:func:`choose_path` from the kernel size alone (for kernels that are never assembled). The matmul's
    bound on CPU is measured: :data:`~dynconv.ops._cpu_tuning.MATMUL_MAX_PIXELS`."""
    if is_exporting():
        return "matmul"
    forced = _FORCED_PATH.get()
    if forced is not None:
        return forced
    if x.shape[0] == 1:
        return "plain"
    if isinstance(padding, str) or (groups > 1 and groups == x.shape[1]):
        return "grouped"  # a depthwise conv of B * C channels is oneDNN's / cuDNN's fast case
    if tuple(kernel_size) == (1, 1):
        return "matmul"
    out_pixels = (x.shape[2] // stride[0]) * (x.shape[3] // stride[1])
    return "matmul" if x.device.type == "cpu" and out_pixels <= _cpu_tuning.MATMUL_MAX_PIXELS else "grouped"


def contracts_cells(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Padding,
                    groups: int, path: Optional[str] = None) -> bool:
    """Whether :func:`per_sample_conv2d` convolves with KernelWarehouse cells directly (:func:`cell_conv2d`)
    instead of assembling the kernels: on the matmul path with several taps, in plain eager mode (no autocast,
    compile or export), without groups and with numeric padding."""
    if (groups != 1 or tuple(kernel_size) == (1, 1) or isinstance(padding, str) or x.is_meta
            or autocast_enabled(x.device.type) or tracing()):
        return False
    return (path or choose_path_for(x, kernel_size, stride, padding, groups)) == "matmul"


def per_sample_conv2d(
    x: torch.Tensor,
    kernels: Description,
    bias: Optional[torch.Tensor] = None,
    stride: Sequence[int] = (1, 1),
    padding: Padding = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    *,
    path: Optional[str] = None,
) -> torch.Tensor:
    """Convolve sample ``b`` of ``x`` with its kernel, as ``kernels`` describes it (:mod:`dynconv.ops.kernels`).

    Args:
        x: ``(B, C_in, H, W)``.
        kernels: a :class:`~dynconv.ops.kernels.Kernels`, :class:`~dynconv.ops.kernels.MixedKernels` or
            :class:`~dynconv.ops.kernels.WarehouseCells` description, or a tensor (``Kernels(tensor)``):
            ``(B, C_out, C_in // groups, kh, kw)``, one kernel per sample, or ``(C_out, C_in // groups, kh, kw)``
            shared by all samples.
        bias: ``(B, C_out)`` per-sample bias, ``(C_out,)`` shared bias, or ``None``.
        stride, padding, dilation, groups: as in :func:`torch.nn.functional.conv2d`.
        path: force ``"plain"`` / ``"grouped"`` / ``"matmul"`` for this call; default :func:`choose_path`
            (which :func:`forced_path` overrides for a whole block).

    Returns:
        ``(B, C_out, H', W')``.

    How it computes, given the description:

    - kernels it forms (mixed, assembled from cells) are rebuilt in the backward instead of kept
      (:func:`~dynconv.ops._recompute.rebuilt_in_backward`): ``B`` x the layer's weights less memory for one
      more mixing; so are the channel-scaled input and, on the matmul path, the unfolded input;
    - mixed kernels on the matmul path with autograd are never formed whole: a slice of output channels at
      a time, forward and backward (:class:`~dynconv.ops._matmul._MixedMatmul`); KernelWarehouse cells are
      contracted tap by tap instead of assembled (:func:`contracts_cells`);
    - the spatial factor scales the unfolded input on the matmul path (exact: a tap's weight multiplies only
      that tap's input, and cheaper when the kernels outnumber the pixels), the kernels elsewhere;
    - the output-channel factor scales the kernels' rows where per-sample kernels are formed (the grouped
      and plain paths), and in training on the matmul path for a shared kernel whose row is smaller than the
      output map (:func:`folds_out_scale`), so that the unscaled output, which the factor's gradient would
      read, is not kept (a map per layer); elsewhere it scales the output.
    """
    if isinstance(kernels, torch.Tensor):
        kernels = Kernels(kernels)
    if isinstance(kernels, WarehouseCells):
        if contracts_cells(x, kernels.kernel_size, stride, padding, groups, path):
            # the cells as (rows, bank): in training, mixed a few at a time, never all B x the weights at once
            out = cell_conv2d(x, None, kernels.blocks, kernels.kernel_size, stride, padding, dilation,
                              mixing=kernels.rows())
            return out + bias.reshape(1, -1, 1, 1) if bias is not None else out
        kernels = Kernels(kernels.assemble(), rebuild=kernels.assemble)
    tap_scale, in_scale, out_scale = (t.flatten(1) if t is not None else None
                                      for t in (kernels.spatial, kernels.in_channel, kernels.out_channel))
    mixing, static = None, False
    if isinstance(kernels, MixedKernels) and kernels.coeffs is None:
        weight, rebuild, static = kernels.bank[0], None, kernels.is_static
        if static:  # one ordinary convolution; the output-channel factor on its output
            path = path or "grouped"
    elif isinstance(kernels, MixedKernels):
        coeffs, bank = kernels.coeffs, kernels.bank
        path = path or choose_path_for(x, bank.shape[-2:], stride, padding, groups)
        if path != "matmul" or not torch.is_grad_enabled() or tracing():
            weight, rebuild = mix_kernels(coeffs, bank), (lambda: mix_kernels(coeffs, bank))
        else:
            weight, rebuild, mixing = None, None, (coeffs, bank)
    else:
        weight, rebuild = kernels.weight, kernels.rebuild
    path = path or choose_path(x, weight, stride, padding, groups)
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; choose one of {PATHS}")
    c_out = (weight if mixing is None else mixing[1]).shape[-4]
    # The matmul path's input gradient is a transposed view, which torch 2.1's CPU GELU backward would turn
    # into uninitialised memory (see dynconv._compat.contiguous_grad); on other torch releases a no-op.
    x = contiguous_grad(x)
    # per-sample kernels (and scaled copies) to rebuild in the backward instead of keeping them
    recipes = KernelRecipes(wanted=rebuild is not None or tap_scale is not None or in_scale is not None
                            or out_scale is not None or path == "matmul")
    if rebuild is not None and mixing is None and weight.dim() == 5:
        recipes.add(weight, rebuild)
    if (out_scale is not None and path == "matmul" and mixing is None and not static and recipes.enabled
            and weight.dim() == 4 and _kernel_row_smaller_than_map(x, weight, stride)):
        # training on the matmul path with a shared kernel (1x1 convs on large maps): the factor rides on
        # per-sample copies of the kernel, rebuilt in the backward, instead of on the output, which its
        # gradient would keep
        shared, rows = weight.detach(), out_scale.reshape(*out_scale.shape, 1, 1, 1)
        weight = weight.unsqueeze(0) * rows
        recipes.add(weight, lambda: shared.unsqueeze(0) * rows)
        out_scale = None
    with rebuilt_in_backward(recipes, x.device):
        if in_scale is not None:
            source, factor = x, in_scale.reshape(*in_scale.shape, 1, 1)
            x = source * factor
            recipes.add(x, lambda: source * factor)
        if mixing is not None:
            out = _matmul_conv(x, mixing[1], stride, padding, dilation, groups, tap_scale, recipes, mixing[0])
        else:
            folded = out_scale if path != "matmul" and not static else None
            # the bias rides in the convolution (one pass over the output fewer; the scale is folded first),
            # unless an output factor comes after the convolution
            inner_bias = bias if path != "matmul" and (out_scale is None or folded is not None) else None
            out = _conv(path, x, weight, stride, padding, dilation, groups, tap_scale, recipes, folded, inner_bias)
            out_scale = None if folded is not None else out_scale
            bias = None if inner_bias is not None else bias
    if out_scale is not None:
        out = out * out_scale.reshape(*out_scale.shape, 1, 1)
    if bias is not None:
        out = out + bias.reshape(-1 if bias.dim() == 2 else 1, c_out, 1, 1)
    return out


def folds_out_scale(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Padding,
                    groups: int) -> bool:
    """Whether :func:`per_sample_conv2d` in training folds an output-channel factor into per-sample copies of the shared
    ``weight`` (so that the unscaled output is not kept): on the grouped and plain paths, which form per-sample
    kernels anyway, and on the matmul path where one sample's kernel row is smaller than its output map."""
    if choose_path(x, weight, stride, padding, groups) != "matmul":
        return True
    return _kernel_row_smaller_than_map(x, weight, stride)


def _kernel_row_smaller_than_map(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int]) -> bool:
    return weight[0].numel() < (x.shape[-2] // stride[0]) * (x.shape[-1] // stride[1])


def _conv(path: str, x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Padding,
          dilation: Sequence[int], groups: int, tap_scale: Optional[torch.Tensor],
          recipes: KernelRecipes, out_scale: Optional[torch.Tensor] = None,
          bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The grouped / plain convolution, with ``bias`` (``(C_out,)`` or ``(B, C_out)``) inside it, or the
    matmul one (no ``bias``)."""
    batch, c_out = x.shape[0], weight.shape[-4]
    if bias is not None and bias.dim() == 2 and batch == 1:
        bias = bias.reshape(-1)
    if path == "matmul":
        out = _matmul_conv(x, weight, stride, padding, dilation, groups, tap_scale, recipes)
    else:
        if tap_scale is not None or out_scale is not None:
            if weight.dim() == 4:  # shared kernel: only its scaled per-sample copies are per-sample
                shared = weight.detach().unsqueeze(0).expand(batch, *weight.shape)
                weight, base = weight.unsqueeze(0).expand(batch, *weight.shape), (lambda: shared)
            else:
                base = recipes.get(weight)
            scale = _kernel_scale(batch, weight.shape, tap_scale, out_scale)
            weight = weight * scale
            if base is not None:  # the scaled copy is rebuilt too (registered before the conv saves it)
                recipes.add(weight, lambda: base() * scale)
        if weight.dim() == 4 and (bias is None or bias.dim() == 1):
            out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        elif weight.dim() == 4:  # per-sample biases on a shared kernel
            out = F.conv2d(x, weight, None, stride, padding, dilation, groups) + bias.reshape(batch, c_out, 1, 1)
        elif path == "plain" and batch == 1:  # one sample: no concatenation, which would copy the output
            out = F.conv2d(x, weight[0], bias, stride, padding, dilation, groups)
        elif path == "plain":
            per_sample = bias is not None and bias.dim() == 2
            out = torch.cat([F.conv2d(x[b:b + 1], weight[b], bias[b] if per_sample else bias, stride, padding,
                                      dilation, groups) for b in range(batch)])
        else:
            if bias is not None:  # sample-major, as the batch is folded into the groups
                bias = bias.reshape(-1) if bias.dim() == 2 else bias.repeat(batch)
            out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), weight.reshape(-1, *weight.shape[2:]), bias,
                           stride, padding, dilation, groups * batch)
            out = out.reshape(batch, c_out, *out.shape[2:])
    return out


def _kernel_scale(batch: int, shape: Sequence[int], tap_scale: Optional[torch.Tensor],
                  out_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """The per-sample factor of the ``(B, C_out, C_in / g, kh, kw)`` kernels: per tap, per output channel."""
    taps = tap_scale.reshape(batch, 1, 1, *shape[-2:]) if tap_scale is not None else None
    rows = out_scale.reshape(batch, shape[-4], 1, 1, 1) if out_scale is not None else None
    if taps is None or rows is None:
        return taps if rows is None else rows
    return rows * taps  # (B, C_out, 1, kh, kw): small next to the kernels


def conv_patches(
    x: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
) -> torch.Tensor:
    """The ``(B, C, kh, kw, H', W')`` view of a (zero-padded) ``x`` that a convolution reads: element
    ``[b, c, i, j, u, v]`` is the input under tap ``(i, j)`` of output pixel ``(u, v)``.

    ``F.unfold`` is this view made contiguous and flattened to ``(B, C * kh * kw, H' * W')``; making it
    contiguous yourself (``.reshape``, or an elementwise op that writes a fresh tensor) is one strided
    copy, about 3x faster on CPU than ``F.unfold``'s ``im2col`` loop.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    batch, channels, h, w = x.shape
    out_h, out_w = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    sb, sc, sy, sx = x.stride()
    return x.as_strided((batch, channels, kh, kw, out_h, out_w), (sb, sc, sy * dh, sx * dw, sy * sh, sx * sw))
