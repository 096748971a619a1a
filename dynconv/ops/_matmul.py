"""The per-sample convolution as a batched matmul over the unfolded input, and its hand-written backwards.

``kernels @ cols``, ``cols`` the input under each kernel tap, batched over samples and groups: fast on small
maps and 1x1 kernels on CPU, and the one path that exports with a dynamic batch size
(:func:`~dynconv.ops.functional.choose_path`). Three ways to give the kernels: shared, per sample, or mixed
from a bank (:class:`_MixedMatmul`: never all formed at once). In training the unfolded input is rebuilt
in the backward a few samples at a time (:mod:`~dynconv.ops._unfolded`).
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

import torch

from . import _cpu_tuning
from ._recompute import KernelRecipes, tracing
from ._unfolded import Geometry, KernelOperand, sample_chunked_matmul, unfold_taps

Padding = Union[str, Sequence[int]]


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
    per-sample kernels in their own row-major layout, where autograd's ``kernels^T @ grad`` took twice as long
    on ResNet18's 7x7 maps (results/per_sample_paths_cpu.md)."""

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


def _channel_slices(batch: int, bank: torch.Tensor, itemsize: int) -> Iterator[slice]:
    """Slices of the output channels (per group) whose ``batch`` per-sample kernels fit
    :data:`~dynconv.ops._cpu_tuning.MIX_CHUNK_BYTES`."""
    n, groups, c_out, k = bank.shape
    step = max(1, _cpu_tuning.MIX_CHUNK_BYTES // max(1, batch * groups * k * itemsize))
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


class _MixedOperand(KernelOperand):
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


_SHARED, _PER_SAMPLE, _MIXED = _SharedKernel(), _PerSampleKernels(), _MixedOperand()


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
