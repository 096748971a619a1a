"""What a per-sample convolution convolves with: a description of the kernels, as a paper writes them.

A dynamic layer states its kernels once and hands the description to
:func:`~dynconv.ops.functional.per_sample_conv2d`, which decides how to compute with it: form the kernels (and
rebuild them in the backward instead of keeping them, ``B`` x the layer's weights), or never form them whole
(mixed a slice at a time on the matmul path, KernelWarehouse's cells contracted tap by tap), and where each
per-sample factor goes (onto the kernels, the input or the output). All descriptions mean, for sample ``b``,

    y_b = out_channel_b * ( (spatial_b * W_b) conv (in_channel_b * x_b) )

with ``W_b`` the sample's kernel, ``spatial_b`` a factor per kernel tap, ``in_channel_b`` per input channel and
``out_channel_b`` per output channel (each optional, ``(B, ...)`` with ``B * count`` elements): ODConv's
spatial, channel and filter attentions (Li et al., ICLR 2022, eq. 1). The descriptions:

- :class:`Kernels`: given kernels, ``(C_out, C_in / g, kh, kw)`` shared by all samples or
  ``(B, C_out, C_in / g, kh, kw)`` one per sample;
- :class:`MixedKernels`: ``W_b = sum_i coeffs[b, i] bank[i]`` (CondConv, DY-Conv, ODConv's kernel attention);
- :class:`WarehouseCells`: KernelWarehouse's kernels, each a grid of cells ``attention @ warehouse``.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch


def mix_kernels(coeffs: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Linear combination of a kernel bank with per-sample coefficients, as one matmul.

    Args:
        coeffs: ``(B, n)`` mixing coefficients.
        bank: ``(n, *kernel_shape)`` kernels.

    Returns:
        ``(B, *kernel_shape)``; the ``(B, n, *kernel_shape)`` product is never materialised.
    """
    return (coeffs @ bank.reshape(bank.shape[0], -1)).reshape(coeffs.shape[0], *bank.shape[1:])


class _Factors:
    """The per-sample factors every description may carry (see the module docstring)."""

    __slots__ = ("spatial", "in_channel", "out_channel")

    def __init__(self, spatial: Optional[torch.Tensor], in_channel: Optional[torch.Tensor],
                 out_channel: Optional[torch.Tensor]) -> None:
        self.spatial, self.in_channel, self.out_channel = spatial, in_channel, out_channel


class Kernels(_Factors):
    """Given kernels: ``weight`` ``(C_out, C_in / g, kh, kw)`` shared by all samples, or
    ``(B, C_out, C_in / g, kh, kw)`` one per sample.

    ``rebuild``: a recipe that recomputes ``weight`` exactly (the same ops on the same inputs). Given, the
    per-sample kernels are not kept for the backward but rebuilt there
    (:func:`~dynconv.ops._recompute.rebuilt_in_backward`). Layers describe their kernels with
    :class:`MixedKernels` or :class:`WarehouseCells`, which carry their own recipe; this is the general form.
    """

    __slots__ = ("weight", "rebuild")

    def __init__(self, weight: torch.Tensor, *, spatial: Optional[torch.Tensor] = None,
                 in_channel: Optional[torch.Tensor] = None, out_channel: Optional[torch.Tensor] = None,
                 rebuild: Optional[Callable[[], torch.Tensor]] = None) -> None:
        super().__init__(spatial, in_channel, out_channel)
        self.weight, self.rebuild = weight, rebuild


class MixedKernels(_Factors):
    """``W_b = sum_i coeffs[b, i] bank[i]``: a bank ``(n, C_out, C_in / g, kh, kw)`` mixed per sample by
    ``coeffs`` ``(B, n)``; ``coeffs=None`` for a bank of one kernel, which all samples share.

    A mixture of one kernel without a spatial factor is one ordinary convolution of the (channel-scaled)
    input, its ``out_channel`` factor on the output: ODConv's 1x1 single-kernel layers, as the official code
    computes them (``_forward_impl_pw1x``).
    """

    __slots__ = ("coeffs", "bank")

    def __init__(self, coeffs: Optional[torch.Tensor], bank: torch.Tensor, *, spatial: Optional[torch.Tensor] = None,
                 in_channel: Optional[torch.Tensor] = None, out_channel: Optional[torch.Tensor] = None) -> None:
        super().__init__(spatial, in_channel, out_channel)
        if coeffs is None and bank.shape[0] != 1:
            raise ValueError(f"MixedKernels without coefficients takes a bank of one kernel, got {bank.shape[0]}")
        self.coeffs, self.bank = coeffs, bank

    @property
    def is_static(self) -> bool:
        """One kernel for every sample, with no factor per tap: an ordinary convolution."""
        return self.coeffs is None and self.spatial is None


class WarehouseCells(_Factors):
    """KernelWarehouse's per-sample kernels (Li & Yao, ICML 2024): each kernel is a grid of ``m`` cells,
    ``O`` output blocks x ``I`` input blocks at every one of the ``kh * kw`` taps, and cell ``j`` of sample
    ``b`` is ``attention[b * m + j] @ warehouse``, a mixture of the warehouse's ``n`` cells.

    Mixture ``j = (tap * O + o) * I + i`` fills output block ``o``, input block ``i`` at that tap (the
    official layout, which official checkpoints need).

    Args:
        attention: ``(B * m, n)`` cell weights, sample-major.
        bank: the warehouse, ``(n, cell_out, cell_in, 1, ...)``.
        cells_shape: ``(n, cell_out, cell_in)`` as integers (under FX the bank's shape is traced).
        blocks: ``(O, I)``.
        kernel_size: ``(kh, kw)``.
    """

    __slots__ = ("attention", "bank", "cells_shape", "blocks", "kernel_size")

    def __init__(self, attention: torch.Tensor, bank: torch.Tensor, cells_shape: Tuple[int, int, int],
                 blocks: Tuple[int, int], kernel_size: Sequence[int]) -> None:
        super().__init__(None, None, None)
        self.attention, self.bank, self.cells_shape = attention, bank, tuple(cells_shape)
        self.blocks, self.kernel_size = tuple(blocks), tuple(kernel_size)

    @property
    def num_mixtures(self) -> int:
        return self.blocks[0] * self.blocks[1] * self.kernel_size[0] * self.kernel_size[1]

    def assemble(self) -> torch.Tensor:
        """The kernels ``(B, O * cell_out, I * cell_in, kh, kw)``."""
        (n, c_out, c_in), (n_out, n_in) = self.cells_shape, self.blocks
        cells = self.attention @ self.bank.reshape(n, -1)
        batch = self.attention.shape[0] // self.num_mixtures
        taps = self.kernel_size[0] * self.kernel_size[1]
        cells = cells.reshape(batch, taps, n_out, n_in, c_out, c_in).permute(0, 2, 4, 3, 5, 1)
        return cells.reshape(batch, n_out * c_out, n_in * c_in, *self.kernel_size)

    def rows(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(rows, bank)``: the cells are ``rows @ bank``, ``rows`` ``(m * B, n)`` mixture-major."""
        batch = self.attention.shape[0] // self.num_mixtures
        rows = self.attention.reshape(batch, self.num_mixtures, -1).transpose(0, 1)
        return rows.reshape(-1, self.attention.shape[1]), self.bank

    def mixed(self) -> torch.Tensor:
        """The cells ``(m, B, cell_out, cell_in)``, mixture-major."""
        rows, bank = self.rows()
        batch = self.attention.shape[0] // self.num_mixtures
        return mix_kernels(rows, bank).reshape(self.num_mixtures, batch, bank.shape[1], bank.shape[2])


KernelDescription = (Kernels, MixedKernels, WarehouseCells)
