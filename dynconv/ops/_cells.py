"""KernelWarehouse's per-sample convolution with its kernels given as cells, on the matmul path.

A KernelWarehouse kernel is a grid of cells (:class:`~dynconv.ops.kernels.WarehouseCells`). Contracting each
cell with its tap's unfolded input (accumulating matmuls) never assembles the ``(B, C_out, C_in, kh, kw)``
kernels, whose permute from the tap-major cells was a copy of ``B`` times the layer's weights forward and
backward; in training the cells themselves are mixed a chunk at a time (:class:`_MixedCellMatmul`).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch

from . import _cpu_tuning
from ._matmul import _same_storage
from ._recompute import KernelRecipes, rebuilt_in_backward, tracing
from ._unfolded import unfold_taps
from .kernels import mix_kernels


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
    :class:`~dynconv.ops.kernels.Kernels`). ``mixing``: ``(rows, bank)`` instead of ``cells``, which are then
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
    """:class:`_CellMatmul` of the cells ``rows @ bank``, mixed a chunk of mixtures at a time
    (:func:`~dynconv.ops._cpu_tuning.cell_mixtures_per_chunk`) forward and backward: the cells, and their
    gradient, are never all alive. ``rows`` ``(m * B, n)``, mixture-major; ``bank`` ``(n, cell_out, cell_in)``."""

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
    step = _cpu_tuning.cell_mixtures_per_chunk(len(indices), batch, n, per_mixture)
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
