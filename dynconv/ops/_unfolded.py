"""The matmul path's unfolded input, and a backward that forms it a few samples at a time.

On the matmul path a convolution is ``kernels @ cols``, ``cols`` the input under each kernel tap
(``kh * kw`` times the input). Autograd's backward of ``unfold -> tap scale -> matmul`` forms, for the whole
batch at once, the rebuilt ``cols``, their gradient, and with a per-sample tap scale (ODConv's spatial
attention) the scaled copy and the product for the tap gradient: several tensors of ``kh * kw`` times the
layer's input, which oneDNN's convolution backward (the static network's) never forms; on ResNet18's 14x14
layers they made the peak of a training step (``results/bench_cpu.md``, memory table).

:class:`SampleChunkedMatmul` keeps the forward as it was and runs the backward over chunks of samples with
at most :data:`~dynconv.ops._cpu_tuning.UNFOLD_CHUNK_BYTES` of ``cols`` each: per chunk it rebuilds ``cols``
from the input, takes the kernels' gradient and the columns' gradient from a :class:`KernelOperand` (how the
kernels are given: shared, per sample, or mixed from a bank), and folds the latter back through the unfold
by autograd. The products are the same as the whole batch's, so the gradients are equal up to float
summation order.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import _cpu_tuning

def unfold_taps(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int] = (1, 1),
                padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), taps_first: bool = False):
    """``(cols, H', W')`` with ``cols`` the ``(B, C, kh * kw, H' * W')`` input under each kernel tap
    (``(B, kh * kw, C, H' * W')`` with ``taps_first``).

    Built from one strided slice per tap, so it traces and exports with a symbolic batch size (unlike
    :func:`~dynconv.ops.functional.conv_patches`' ``as_strided`` view); a 1x1 kernel at stride 1 costs no copy.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    batch, channels, h, w = x.shape
    out_h, out_w = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    if (kh, kw, sh, sw) == (1, 1, 1, 1):
        return x.reshape(batch, *((1, channels) if taps_first else (channels, 1)), h * w), out_h, out_w
    taps = [x[:, :, i * dh:i * dh + sh * (out_h - 1) + 1:sh, j * dw:j * dw + sw * (out_w - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]
    if taps_first:
        return torch.stack(taps, dim=1).reshape(batch, kh * kw, channels, out_h * out_w), out_h, out_w
    return torch.stack(taps, dim=2).reshape(batch, channels, kh * kw, out_h * out_w), out_h, out_w


class Geometry:
    """A convolution's kernel size, stride, (numeric) padding, dilation and groups."""
    __slots__ = ("kernel_size", "stride", "padding", "dilation", "groups")

    def __init__(self, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int], groups: int) -> None:
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), tuple(stride), tuple(padding)
        self.dilation, self.groups = tuple(dilation), groups

    def output_size(self, x: torch.Tensor) -> Sequence[int]:
        """``(H', W')`` of the convolution of ``x``."""
        return [(size + 2 * pad - step * (k - 1) - 1) // stride + 1 for size, pad, step, k, stride in
                zip(x.shape[-2:], self.padding, self.dilation, self.kernel_size, self.stride)]

    def cols(self, x: torch.Tensor, tap_scale: Optional[torch.Tensor]) -> torch.Tensor:
        """``(B, g, C_in / g * kh * kw, H' * W')``: ``x`` under each tap, times ``tap_scale`` ``(B, kh * kw)``."""
        cols, _, _ = unfold_taps(x, self.kernel_size, self.stride, self.padding, self.dilation)
        if tap_scale is not None:
            cols = cols * tap_scale.reshape(x.shape[0], 1, -1, 1)
        return cols.reshape(x.shape[0], self.groups, -1, cols.shape[-1])


class KernelOperand(ABC):
    """How the kernels of :class:`SampleChunkedMatmul` are given. ``forward(cols, *tensors)`` is
    ``kernels @ cols`` for the whole batch (``(B, g, K, P) -> (B, g, C_out / g, P)``); ``backward`` takes one
    chunk of samples: it adds the kernel tensors' gradients for those samples into ``grads`` (allocating
    them on the first chunk) and returns the chunk's ``d_cols`` (or None when not ``want_cols``)."""

    @abstractmethod
    def forward(self, cols: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        ...

    @abstractmethod
    def backward(self, grad: torch.Tensor, cols: torch.Tensor, samples: slice, tensors: Sequence[torch.Tensor],
                 grads: List[Optional[torch.Tensor]], needs: Sequence[bool], want_cols: bool,
                 batch: int) -> Optional[torch.Tensor]:
        ...


class SampleChunkedMatmul(torch.autograd.Function):
    """``operand.forward(geometry.cols(x, tap_scale), *tensors)``, whose backward forms ``cols`` and their
    gradient a chunk of samples at a time (see the module docstring). Keeps ``x``, ``tap_scale`` and the
    operand's tensors (each may be rebuilt by a recipe of :mod:`dynconv.ops._recompute`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tap_scale: Optional[torch.Tensor], geometry: Geometry,
                operand: KernelOperand, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, tap_scale, *tensors)
        ctx.geometry, ctx.operand = geometry, operand
        return operand.forward(geometry.cols(x, tap_scale), *tensors)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, tap_scale, *tensors = ctx.saved_tensors
        need_x, need_taps = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        needs = ctx.needs_input_grad[4:]
        batch, geometry = x.shape[0], ctx.geometry
        d_x = torch.zeros_like(x) if need_x else None
        d_taps = torch.zeros_like(tap_scale) if need_taps else None
        grads: List[Optional[torch.Tensor]] = [None] * len(tensors)
        per_sample = x[:1].numel() * geometry.kernel_size[0] * geometry.kernel_size[1] * x.element_size()
        step = max(1, _cpu_tuning.UNFOLD_CHUNK_BYTES // max(1, per_sample))
        for start in range(0, batch, step):
            samples = slice(start, min(start + step, batch))
            with torch.enable_grad():
                x_part = x[samples].detach().requires_grad_(need_x)
                taps_part = tap_scale[samples].detach().requires_grad_(need_taps) if tap_scale is not None else None
                cols = geometry.cols(x_part, taps_part)
            d_cols = ctx.operand.backward(grad[samples], cols.detach(), samples, tensors, grads, needs,
                                          need_x or need_taps, batch)
            if d_cols is None:
                continue
            inputs = [t for t, need in ((x_part, need_x), (taps_part, need_taps)) if need]
            found = iter(torch.autograd.grad(cols, inputs, d_cols.to(cols.dtype)))
            if need_x:
                d_x[samples] = next(found)
            if need_taps:
                d_taps[samples] = next(found)
            del cols, d_cols
        grads = [g.to(t.dtype) if g is not None else None for g, t in zip(grads, tensors)]
        return (d_x, d_taps, None, None, *grads)


def sample_chunked_matmul(x: torch.Tensor, tap_scale: Optional[torch.Tensor], geometry: Geometry,
                          operand: KernelOperand, *tensors: torch.Tensor) -> torch.Tensor:
    """:class:`SampleChunkedMatmul` (``(B, g, C_out / g, H' * W')``)."""
    return SampleChunkedMatmul.apply(x, tap_scale, geometry, operand, *tensors)
