"""The one shared hot path for per-sample-kernel convolutions.

Every dynamic layer in :mod:`dynconv.ops` reduces to: mix a bank of kernels with per-sample
coefficients (:func:`mix_kernels`, one matmul), then convolve each sample with its own kernel
(:func:`per_sample_conv2d`). Keeping both here means the speed work lands in one place.

The per-sample convolution has three paths (:func:`choose_path`): one ordinary convolution for a
single sample; the batch folded into the channel axis as one convolution with ``groups * B``
groups, the trick of CondConv in timm (pytorch/pytorch#17983) and of the official ODConv /
KernelWarehouse code, fast on large maps; and one batched matmul over the unfolded input, fast on
small maps and 1x1 kernels, and the one path that exports with a dynamic batch size. On that path
KernelWarehouse skips assembling its kernels from cells (:func:`cell_conv2d`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .._compat import contiguous_grad, is_exporting
from ._recompute import KernelRecipes, rebuilt_in_backward, tracing
from ._unfolded import Geometry, KernelOperand, sample_chunked_matmul, unfold_taps

Padding = Union[str, Sequence[int]]


def mix_kernels(coeffs: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Linear combination of a kernel bank with per-sample coefficients, as one matmul.

    Args:
        coeffs: ``(B, n)`` mixing coefficients.
        bank: ``(n, *kernel_shape)`` kernels.

    Returns:
        ``(B, *kernel_shape)``; the ``(B, n, *kernel_shape)`` product is never materialised.
    """
    return (coeffs @ bank.reshape(bank.shape[0], -1)).reshape(coeffs.shape[0], *bank.shape[1:])


# Per-sample convolution paths, chosen per call by :func:`choose_path` (measured on a 2-core CPU with
# ResNet18's shapes at batch 16, forward + backward, against a static conv of the same shape):
#   output map  kernel  grouped  matmul
#   56x56       3x3     1.03     3.05    <- oneDNN's grouped conv is as fast as the static conv
#   28x28       3x3     1.14     2.42
#   14x14       3x3     1.54     1.76    (28x28 input, stride 2: a tie)
#   14x14       3x3     2.61     2.30
#   7x7         3x3     6.46     3.78    <- few pixels: per-group overhead dominates the grouped conv
#   14x14       1x1     1.60     1.29    <- a 1x1 conv is a matmul without any unfolding
# A loop of per-sample convs was slower than both on every shape (up to 25x on 7x7 backward).
MATMUL_MAX_PIXELS = 256
PATHS = ("plain", "grouped", "matmul")
_forced_path: Optional[str] = None


@contextlib.contextmanager
def forced_path(path: str) -> Iterator[None]:
    """Every per-sample conv in the block takes ``path`` (except while exporting). MAC counting uses
    ``"grouped"``, so that its op counter sees each per-sample conv as a convolution at any batch size."""
    global _forced_path
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; choose one of {PATHS}")
    previous, _forced_path = _forced_path, path
    try:
        yield
    finally:
        _forced_path = previous


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
    """:func:`choose_path` from the kernel size alone (for layers that never assemble the kernels)."""
    if is_exporting():
        return "matmul"
    if _forced_path is not None:
        return _forced_path
    if x.shape[0] == 1:
        return "plain"
    if isinstance(padding, str) or (groups > 1 and groups == x.shape[1]):
        return "grouped"  # a depthwise conv of B * C channels is oneDNN's / cuDNN's fast case
    if tuple(kernel_size) == (1, 1):
        return "matmul"
    out_pixels = (x.shape[2] // stride[0]) * (x.shape[3] // stride[1])
    return "matmul" if x.device.type == "cpu" and out_pixels <= MATMUL_MAX_PIXELS else "grouped"


def per_sample_conv2d(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor] = None,
    stride: Sequence[int] = (1, 1),
    padding: Padding = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    tap_scale: Optional[torch.Tensor] = None,
    path: Optional[str] = None,
    rebuild: Optional[Callable[[], torch.Tensor]] = None,
    in_scale: Optional[torch.Tensor] = None,
    mixing: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    out_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Convolve sample ``b`` of ``x`` with ``weight[b]`` (times ``tap_scale[b]`` per kernel tap).

    Args:
        x: ``(B, C_in, H, W)``.
        weight: ``(B, C_out, C_in // groups, kh, kw)``, one kernel per sample, or
            ``(C_out, C_in // groups, kh, kw)`` shared by all samples (then only ``tap_scale`` varies);
            ``None`` with ``mixing``.
        bias: ``(B, C_out)`` per-sample bias, ``(C_out,)`` shared bias, or ``None``.
        stride, padding, dilation, groups: as in :func:`torch.nn.functional.conv2d`.
        tap_scale: optional ``(B, kh * kw)`` per-sample factor of each kernel position (ODConv's
            spatial attention). The matmul path scales the unfolded input instead of the kernels,
            which is exact (a tap's weight multiplies only that tap's input) and cheaper when the
            kernels outnumber the pixels.
        path: force ``"plain"`` / ``"grouped"`` / ``"matmul"``; default :func:`choose_path`.
        rebuild: recomputes ``weight`` exactly (e.g. the kernel mixing, from detached inputs). Given, the
            per-sample kernels are not kept for the backward but rebuilt there
            (:func:`~dynconv.ops._recompute.rebuilt_in_backward`): ``B`` x the layer's weights less memory
            for one more kernel mixing.
        in_scale: optional ``(B, C_in)`` factor of each input channel (ODConv's channel attention),
            applied here so that the scaled input, too, is rebuilt in the backward rather than kept.
        mixing: ``(coeffs, bank)`` instead of ``weight``: the per-sample kernels are
            :func:`mix_kernels` ``(coeffs, bank)``. On the matmul path with autograd they are then never
            formed whole: a slice of output channels at a time, forward and backward
            (:class:`_MixedMatmul`), so training holds at most :data:`MIX_CHUNK_BYTES` of them instead of
            ``B`` x the layer's weights (and as much again for their gradient). Elsewhere they are mixed
            here and rebuilt in the backward (as with ``rebuild``).
        out_scale: optional ``(B, C_out)`` factor of each output channel (ODConv's filter attention, DCD's
            Lambda). Where per-sample kernels are formed (the grouped and plain paths), and in training on
            the matmul path for a shared kernel whose row is smaller than the output map
            (:func:`folds_out_scale`), it scales the kernels' rows, so that the unscaled output, which the
            factor's gradient would read, is not kept (a map per layer); elsewhere it scales the output.

    Returns:
        ``(B, C_out, H', W')``.
    """
    if mixing is not None:
        coeffs, bank = mixing
        path = path or choose_path_for(x, bank.shape[-2:], stride, padding, groups)
        if path != "matmul" or not torch.is_grad_enabled() or tracing():
            weight, rebuild, mixing = mix_kernels(coeffs, bank), (lambda: mix_kernels(coeffs, bank)), None
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
    if (out_scale is not None and path == "matmul" and mixing is None and recipes.enabled and weight.dim() == 4
            and _kernel_row_smaller_than_map(x, weight, stride)):
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
            folded = out_scale if path != "matmul" else None
            # the bias rides in the convolution (one pass over the output fewer; the scale is folded first)
            inner_bias = bias if bias is not None and path != "matmul" else None
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
    """Whether :func:`per_sample_conv2d` in training folds ``out_scale`` into per-sample copies of the shared
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


def _matmul_conv(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Padding,
                 dilation: Sequence[int], groups: int, tap_scale: Optional[torch.Tensor],
                 recipes: Optional[KernelRecipes] = None, coeffs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The conv as ``kernels @ unfolded input``, batched over samples and groups; with ``coeffs``, the
    kernels are ``mix_kernels(coeffs, weight)``, formed a slice of output channels at a time.

    The unfolded input (``kh * kw`` times the input) and its tap-scaled copy are rebuilt in the backward
    from the input (itself kept, or rebuilt by its own recipe) instead of kept: with ``recipes`` enabled.
    """
    batch, c_in = x.shape[:2]
    (kh, kw) = weight.shape[-2:]
    if isinstance(padding, str):
        padding = _numeric_padding(padding, (kh, kw), stride, dilation)
    recipes = recipes if recipes is not None else KernelRecipes(wanted=False)
    if recipes.enabled and (kh, kw, *stride) != (1, 1, 1, 1):  # training, and the unfolding copies the input
        return _chunked_backward_conv(x, weight, Geometry((kh, kw), stride, padding, dilation, groups), tap_scale,
                                      coeffs)
    source = recipes.get(x) or (lambda: x)
    cols, out_h, out_w = unfold_taps(x, (kh, kw), stride, padding, dilation)  # (B, C_in, taps, pixels)
    unfolded = lambda: unfold_taps(source(), (kh, kw), stride, padding, dilation)[0]  # noqa: E731
    # a 1x1 stride-1 kernel unfolds to a view of the input: nothing to add (recipes are off without autograd
    # and while tracing, where a traced tensor has no storage to compare)
    if recipes.enabled and not _same_storage(cols, x):
        recipes.add(cols, unfolded)
    rebuilt_cols, unscaled = unfolded, cols  # held to the end: a recipe's tensor must outlive the saves
    if tap_scale is not None:
        taps = tap_scale.reshape(batch, 1, kh * kw, 1)
        cols = cols * taps
        rebuilt_cols = lambda: unfolded() * taps  # noqa: E731
        recipes.add(cols, rebuilt_cols)
    cols = cols.reshape(batch, groups, (c_in // groups) * kh * kw, out_h * out_w)
    c_out = weight.shape[-4]
    if weight.dim() == 4 and groups == 1:
        # one kernel for all: a single matmul over the batch's pixels, so the backward yields one weight
        # gradient instead of one per sample (B times the memory, then summed)
        pixels = cols.shape[-1]
        cols = cols[:, 0].transpose(0, 1).reshape(-1, batch * pixels)  # a copy (the batch moves inward)
        recipes.add(cols, lambda: rebuilt_cols().reshape(batch, -1, pixels).transpose(0, 1).reshape(-1, batch * pixels))
        out = weight.reshape(c_out, -1) @ cols
        return out.reshape(c_out, batch, out_h, out_w).transpose(0, 1).contiguous()
    kernels = weight.reshape(*weight.shape[:-4], groups, c_out // groups, -1)  # ([B,] g, C_out / g, K)
    if coeffs is not None:  # ``kernels`` is the bank (n, g, C_out / g, K)
        out = _MixedMatmul.apply(coeffs, kernels, cols)
    elif weight.dim() == 5 and torch.is_grad_enabled() and not tracing():
        out = _PerSampleMatmul.apply(kernels, cols)
    else:
        out = torch.matmul(kernels, cols)
    return out.reshape(batch, c_out, out_h, out_w)


def _chunked_backward_conv(x: torch.Tensor, weight: torch.Tensor, geometry: Geometry,
                           tap_scale: Optional[torch.Tensor], coeffs: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`_matmul_conv` in training: the same products, with a backward that forms the unfolded input and
    its gradient a few samples at a time (:class:`~dynconv.ops._unfolded.SampleChunkedMatmul`)."""
    batch, groups, c_out = x.shape[0], geometry.groups, weight.shape[-4]
    kernels = weight.reshape(*weight.shape[:-4], groups, c_out // groups, -1)
    if coeffs is not None:
        out = sample_chunked_matmul(x, tap_scale, geometry, _MIXED, coeffs, kernels)
    else:
        out = sample_chunked_matmul(x, tap_scale, geometry, _PER_SAMPLE if weight.dim() == 5 else _SHARED, kernels)
    return out.reshape(batch, c_out, *geometry.output_size(x))


class _PerSampleMatmul(torch.autograd.Function):
    """``kernels @ cols`` whose input gradient is computed as ``(grad^T @ kernels)^T``, which reads the
    per-sample kernels in their own row-major layout. Autograd's ``kernels^T @ grad`` took twice as long
    on ResNet18's 7x7 maps (2 CPU cores, batch 16: 36 ms against 19 ms for one 512-channel 3x3 layer)."""

    @staticmethod
    def forward(ctx, kernels: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(kernels if ctx.needs_input_grad[1] else None,
                              cols if ctx.needs_input_grad[0] else None)
        ctx.dtypes = kernels.dtype, cols.dtype
        return torch.matmul(kernels, cols)  # under autocast, in its dtype (the gradient's dtype too)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        kernels, cols = ctx.saved_tensors
        d_kernels = d_cols = None
        # the input gradient first: the kernels (rebuilt for this backward, B x the layer's weights) are
        # freed before their gradient, as large, is made
        if ctx.needs_input_grad[1]:
            d_cols = (grad.transpose(-1, -2) @ kernels.to(grad.dtype)).transpose(-1, -2).to(ctx.dtypes[1])
        del kernels
        if ctx.needs_input_grad[0]:
            d_kernels = (grad @ cols.to(grad.dtype).transpose(-1, -2)).to(ctx.dtypes[0])
        return d_kernels, d_cols


# The most bytes of per-sample kernels (or of their gradient) :class:`_MixedMatmul` forms at once.
MIX_CHUNK_BYTES = 16 * 2**20


def _channel_slices(batch: int, bank: torch.Tensor, itemsize: int) -> Iterator[slice]:
    """Slices of the output channels (per group) whose ``batch`` per-sample kernels fit MIX_CHUNK_BYTES."""
    n, groups, c_out, k = bank.shape
    step = max(1, MIX_CHUNK_BYTES // max(1, batch * groups * k * itemsize))
    return (slice(start, min(start + step, c_out)) for start in range(0, c_out, step))


class _MixedMatmul(torch.autograd.Function):
    """``mix_kernels(coeffs, bank) @ cols`` without the ``(B, g, C_out / g, K)`` kernels, nor their gradient,
    ever formed whole: each slice of output channels is mixed, used and dropped (the bank is read once).

    Same products as mixing then :class:`_PerSampleMatmul`, summed in another order: ``d_cols`` adds the
    slices' contributions, ``d_coeffs`` the slices' inner products. ``coeffs`` ``(B, n)``, ``bank``
    ``(n, g, C_out / g, K)``, ``cols`` ``(B, g, K, P)``; returns ``(B, g, C_out / g, P)``.
    """

    @staticmethod
    def forward(ctx, coeffs: torch.Tensor, bank: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(coeffs, bank, cols)
        return _mixed_matmul(coeffs, bank, cols)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        coeffs, bank, cols = ctx.saved_tensors
        d_coeffs, d_bank, d_cols = _mixed_matmul_grads(grad, coeffs, bank, cols, *ctx.needs_input_grad)
        return (d_coeffs.to(coeffs.dtype) if ctx.needs_input_grad[0] else None,
                d_bank.to(bank.dtype) if ctx.needs_input_grad[1] else None, d_cols)


def _mixed_matmul(coeffs: torch.Tensor, bank: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """:class:`_MixedMatmul`'s product, a slice of output channels at a time."""
    batch, (n, groups, c_out, k) = coeffs.shape[0], bank.shape
    parts = []
    for part in _channel_slices(batch, bank, cols.element_size()):
        kernels = (coeffs @ bank[:, :, part].reshape(n, -1)).reshape(batch, groups, -1, k)
        parts.append(torch.matmul(kernels, cols))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _mixed_matmul_grads(grad: torch.Tensor, coeffs: torch.Tensor, bank: torch.Tensor, cols: torch.Tensor,
                        need_coeffs: bool, need_bank: bool, need_cols: bool):
    """``(d_coeffs, d_bank, d_cols)`` of :func:`_mixed_matmul` (in ``grad``'s dtype; ``d_cols`` in ``cols``'),
    a slice of output channels at a time."""
    batch, (n, groups, c_out, k) = coeffs.shape[0], bank.shape
    dtype = grad.dtype
    d_coeffs = torch.zeros(batch, n, dtype=dtype, device=grad.device)
    d_bank = torch.empty(bank.shape, dtype=dtype, device=grad.device)
    d_cols_t = None  # (B, g, P, K): each product (grad^T @ kernels) reads the kernels row-major
    cols_t = cols.to(dtype).transpose(-1, -2)
    for part in _channel_slices(batch, bank, cols.element_size()):
        block = bank[:, :, part].reshape(n, -1).to(dtype)
        grad_part = grad[:, :, part]
        if need_cols:
            kernels = (coeffs.to(dtype) @ block).reshape(batch, groups, -1, k)
            contribution = grad_part.transpose(-1, -2) @ kernels
            d_cols_t = contribution if d_cols_t is None else d_cols_t.add_(contribution)
            del kernels, contribution
        if need_coeffs or need_bank:
            d_kernels = (grad_part @ cols_t).reshape(batch, -1)  # (B, g * slice * K)
            d_bank[:, :, part] = (coeffs.to(dtype).transpose(0, 1) @ d_kernels).reshape(n, groups, -1, k)
            d_coeffs.addmm_(d_kernels, block.transpose(0, 1))
            del d_kernels
    d_cols = d_cols_t.transpose(-1, -2).to(cols.dtype) if d_cols_t is not None else None
    return d_coeffs, d_bank, d_cols


class _SharedKernel(KernelOperand):
    """One ``(g, C_out / g, K)`` kernel for every sample (only a tap scale varies per sample)."""

    def forward(self, cols: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        batch, groups, k, pixels = cols.shape
        if groups == 1:  # one matmul over the batch's pixels (the batch moves inward: a copy)
            out = kernel[0] @ cols[:, 0].transpose(0, 1).reshape(k, batch * pixels)
            return out.reshape(-1, batch, pixels).transpose(0, 1).contiguous().unsqueeze(1)
        return torch.matmul(kernel, cols)

    def backward(self, grad, cols, samples, tensors, grads, needs, want_cols, batch):
        (kernel,), dtype = tensors, grad.dtype
        part, groups, c_out, pixels = grad.shape
        grad_inward = grad.permute(1, 2, 0, 3).reshape(groups, c_out, part * pixels)
        if needs[0]:  # one weight gradient, not one per sample
            d_kernel = grad_inward @ cols.to(dtype).permute(1, 0, 3, 2).reshape(groups, part * pixels, -1)
            grads[0] = d_kernel if grads[0] is None else grads[0].add_(d_kernel)
        if not want_cols:
            return None
        d_cols = kernel.to(dtype).transpose(-1, -2) @ grad_inward  # (g, K, part * P)
        return d_cols.reshape(groups, -1, part, pixels).permute(2, 0, 1, 3)


class _PerSampleKernels(KernelOperand):
    """``(B, g, C_out / g, K)`` kernels, one per sample (see :class:`_PerSampleMatmul` for the layouts)."""

    def forward(self, cols: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        return torch.matmul(kernels, cols)

    def backward(self, grad, cols, samples, tensors, grads, needs, want_cols, batch):
        (kernels,), dtype = tensors, grad.dtype
        d_cols = None
        if want_cols:
            d_cols = (grad.transpose(-1, -2) @ kernels[samples].to(dtype)).transpose(-1, -2)
        if needs[0]:
            if grads[0] is None:
                grads[0] = grad.new_empty(kernels.shape)
            torch.matmul(grad, cols.to(dtype).transpose(-1, -2), out=grads[0][samples])
        return d_cols


class _MixedKernels(KernelOperand):
    """Kernels ``mix_kernels(coeffs, bank)`` (``coeffs`` ``(B, n)``, ``bank`` ``(n, g, C_out / g, K)``), formed
    a slice of output channels at a time as in :class:`_MixedMatmul`."""

    def forward(self, cols: torch.Tensor, coeffs: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        return _mixed_matmul(coeffs, bank, cols)

    def backward(self, grad, cols, samples, tensors, grads, needs, want_cols, batch):
        coeffs, bank = tensors
        d_coeffs, d_bank, d_cols = _mixed_matmul_grads(grad, coeffs[samples], bank, cols, *needs, want_cols)
        if needs[0]:
            if grads[0] is None:
                grads[0] = d_coeffs.new_zeros(batch, coeffs.shape[1])
            grads[0][samples] = d_coeffs
        if needs[1]:
            grads[1] = d_bank if grads[1] is None else grads[1].add_(d_bank)
        return d_cols


_SHARED, _PER_SAMPLE, _MIXED = _SharedKernel(), _PerSampleKernels(), _MixedKernels()


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _numeric_padding(padding: str, kernel: Sequence[int], stride: Sequence[int],
                     dilation: Sequence[int]) -> Sequence[int]:
    """``"valid"`` / ``"same"`` as per-side padding (``"same"``: stride 1, symmetric only)."""
    if padding == "valid":
        return (0, 0)
    spans = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if padding != "same" or any(s != 1 for s in stride) or any(span % 2 for span in spans):
        raise ValueError(f"padding={padding!r} with kernel {tuple(kernel)}, stride {tuple(stride)}: the matmul "
                         "path needs numeric or symmetric 'same' padding")
    return tuple(span // 2 for span in spans)


def cell_conv2d(
    x: torch.Tensor,
    cells: torch.Tensor,
    blocks: Tuple[int, int],
    kernel_size: Sequence[int],
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    rebuild: Optional[Callable[[], torch.Tensor]] = None,
    mixing: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Per-sample convolution with kernels given as KernelWarehouse cells, on the matmul path.

    ``cells[j, b]`` is sample ``b``'s ``(C_out / O, C_in / I)`` block for mixture
    ``j = (tap * O + o) * I + i`` of ``blocks = (O, I)``: output block ``o``, input block ``i`` at one
    kernel tap. Contracting each cell with its tap's unfolded input (accumulating matmuls) never
    assembles the ``(B, C_out, C_in, kh, kw)`` kernels, whose permute from the tap-major cells was a
    copy of ``B`` times the layer's weights forward and backward. No groups; numeric padding.
    ``rebuild`` recomputes ``cells`` in the backward instead of keeping them (see
    :func:`per_sample_conv2d`). ``mixing``: ``(rows, bank)`` instead of ``cells``, which are then
    ``rows @ bank`` (``rows`` ``(m * B, n)`` mixture-major, ``bank`` ``(n, cell_out, cell_in, ...)``); with
    autograd they are formed a few mixtures at a time, forward and backward (:class:`_MixedCellMatmul`),
    never all ``B`` x the layer's weights at once.
    """
    batch = x.shape[0]
    if mixing is not None and (not torch.is_grad_enabled() or tracing()):
        rows, bank = mixing
        cells, mixing = mix_kernels(rows, bank).reshape(-1, batch, bank.shape[1], bank.shape[2]), None
    recipes = KernelRecipes()  # the unfolded input (kh * kw times the input) is rebuilt too
    if rebuild is not None:
        recipes.add(cells, rebuild)
    with rebuilt_in_backward(recipes, x.device):
        cols, out_h, out_w = unfold_taps(x, kernel_size, stride, padding, dilation, taps_first=True)
        if recipes.enabled and not _same_storage(cols, x):  # (a traced tensor has no storage to compare)
            recipes.add(cols, lambda: unfold_taps(x, kernel_size, stride, padding, dilation, taps_first=True)[0])
        if mixing is not None:
            out = _MixedCellMatmul.apply(mixing[0], mixing[1], cols, blocks)
        else:
            out = _CellMatmul.apply(cells, cols, blocks)  # (O, B, C_out / O, pixels)
    return out.transpose(0, 1).reshape(batch, -1, out_h, out_w)


class _CellMatmul(torch.autograd.Function):
    """``out[o, b] = sum over taps s and input blocks i of cells[(s * O + o) * I + i, b] @ cols[b, s, i]``,
    and its gradients in the cells' and the columns' own layouts (see :class:`_PerSampleMatmul`)."""

    @staticmethod
    def forward(ctx, cells: torch.Tensor, cols: torch.Tensor, blocks: Tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(cells if ctx.needs_input_grad[1] else None,
                              cols if ctx.needs_input_grad[0] else None)
        ctx.blocks, ctx.cells_shape, ctx.taps = blocks, cells.shape, cols.shape[1]
        (n_out, n_in), (cell_out, cell_in) = blocks, cells.shape[2:]
        out = cols.new_zeros(n_out, cols.shape[0], cell_out, cols.shape[-1])
        for j, s, o, i in _cell_indices(ctx.taps, n_out, n_in):
            out[o].baddbmm_(cells[j], cols[:, s, i * cell_in:(i + 1) * cell_in])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cells, cols = ctx.saved_tensors
        (n_out, n_in), taps, cell_in = ctx.blocks, ctx.taps, ctx.cells_shape[-1]
        grad = grad.contiguous()  # (O, B, C_out / O, pixels)
        d_cells = d_cols = None
        if ctx.needs_input_grad[1]:
            batch, pixels = grad.shape[1], grad.shape[-1]
            # (taps, B, pixels, C_in), returned as a (B, taps, C_in, pixels) view: each product below is
            # (grad^T @ cell), which reads the cell in its own row-major layout
            d_cols = grad.new_zeros(taps, batch, pixels, cell_in * n_in)
            for j, s, o, i in _cell_indices(taps, n_out, n_in):
                d_cols[s, :, :, i * cell_in:(i + 1) * cell_in].baddbmm_(grad[o].transpose(1, 2), cells[j])
            d_cols = d_cols.permute(1, 0, 3, 2)
        del cells  # (rebuilt for this backward, B x the layer's weights) freed before its gradient is made
        if ctx.needs_input_grad[0]:
            d_cells = grad.new_empty(ctx.cells_shape)
            for j, s, o, i in _cell_indices(taps, n_out, n_in):
                torch.bmm(grad[o], cols[:, s, i * cell_in:(i + 1) * cell_in].transpose(1, 2), out=d_cells[j])
        return d_cells, d_cols, None


class _MixedCellMatmul(torch.autograd.Function):
    """:class:`_CellMatmul` of the cells ``rows @ bank``, mixed a chunk of mixtures at a time (at most
    :data:`MIX_CHUNK_BYTES`, at least one mixture) forward and backward: the cells, and their gradient,
    are never all alive. ``rows`` ``(m * B, n)``, mixture-major; ``bank`` ``(n, cell_out, cell_in)``."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, bank: torch.Tensor, cols: torch.Tensor,
                blocks: Tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(rows, bank, cols)
        ctx.blocks = blocks
        (n_out, n_in), (cell_out, cell_in), batch = blocks, bank.shape[1:3], cols.shape[0]
        out = cols.new_zeros(n_out, batch, cell_out, cols.shape[-1])
        for cells, chunk in _mixed_cells(rows, bank, batch, cols.shape[1], blocks):
            for j, s, o, i in chunk:
                out[o].baddbmm_(cells[j], cols[:, s, i * cell_in:(i + 1) * cell_in])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, bank, cols = ctx.saved_tensors
        (n_out, n_in), (cell_out, cell_in), batch = ctx.blocks, bank.shape[1:3], cols.shape[0]
        taps, pixels, n = cols.shape[1], grad.shape[-1], bank.shape[0]
        grad = grad.contiguous()
        flat_bank = bank.reshape(n, -1)
        d_rows = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        d_bank = torch.zeros_like(flat_bank) if ctx.needs_input_grad[1] else None
        # (taps, B, pixels, C_in), returned as a (B, taps, C_in, pixels) view (see _CellMatmul)
        d_cols = grad.new_zeros(taps, batch, pixels, cell_in * n_in) if ctx.needs_input_grad[2] else None
        for cells, chunk in _mixed_cells(rows, bank, batch, taps, ctx.blocks):
            first = chunk[0][0]
            if d_cols is not None:
                for j, s, o, i in chunk:
                    d_cols[s, :, :, i * cell_in:(i + 1) * cell_in].baddbmm_(grad[o].transpose(1, 2), cells[j])
            del cells
            if d_rows is not None or d_bank is not None:
                d_cells = grad.new_empty(len(chunk), batch, cell_out, cell_in)
                for j, s, o, i in chunk:
                    torch.bmm(grad[o], cols[:, s, i * cell_in:(i + 1) * cell_in].transpose(1, 2),
                              out=d_cells[j - first])
                d_cells = d_cells.reshape(len(chunk) * batch, -1)
                part = slice(first * batch, (first + len(chunk)) * batch)
                if d_rows is not None:
                    torch.mm(d_cells, flat_bank.transpose(0, 1), out=d_rows[part])
                if d_bank is not None:
                    d_bank.addmm_(rows[part].transpose(0, 1), d_cells)
                del d_cells
        return (d_rows, d_bank.reshape(bank.shape) if d_bank is not None else None,
                d_cols.permute(1, 0, 3, 2) if d_cols is not None else None, None)


def _mixed_cells(rows: torch.Tensor, bank: torch.Tensor, batch: int, taps: int, blocks: Tuple[int, int]):
    """``(cells, chunk)`` per chunk of consecutive mixtures: ``chunk`` the :func:`_cell_indices` entries it
    holds, ``cells[j]`` their cells by absolute mixture index ``j``."""
    (n_out, n_in), n = blocks, bank.shape[0]
    per_mixture = batch * bank.shape[1] * bank.shape[2] * bank.element_size()
    indices = list(_cell_indices(taps, n_out, n_in))
    # each chunk reads the whole bank: at most (cells / bank) = m * B / n chunks, so that the bank is read no
    # more than the cells would be written and read whole (KW 4x ResNet18 layer4, 9 x 16 rows of 108 cells:
    # one chunk; 16 MiB chunks there made the training step 40% slower)
    most_chunks = max(1, (len(indices) * batch) // n)
    step = max(1, MIX_CHUNK_BYTES // max(1, per_mixture), -(-len(indices) // most_chunks))
    flat_bank = bank.reshape(n, -1)
    for first in range(0, len(indices), step):
        chunk = indices[first:first + step]
        # made in the yield expression, not bound here: the caller's ``del`` frees the cells, which a local
        # of this generator would keep alive while the caller forms their gradient
        yield _Offset((rows[first * batch:(first + len(chunk)) * batch] @ flat_bank).reshape(
            len(chunk), batch, bank.shape[1], bank.shape[2]), first), chunk


class _Offset:
    """``cells[j]`` for the absolute mixture index ``j`` of a chunk starting at ``first``."""
    __slots__ = ("cells", "first")

    def __init__(self, cells: torch.Tensor, first: int) -> None:
        self.cells, self.first = cells, first

    def __getitem__(self, j: int) -> torch.Tensor:
        return self.cells[j - self.first]


def _cell_indices(taps: int, n_out: int, n_in: int) -> Iterator[Tuple[int, int, int, int]]:
    for s in range(taps):
        for o in range(n_out):
            for i in range(n_in):
                yield (s * n_out + o) * n_in + i, s, o, i



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
