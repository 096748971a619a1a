"""KernelWarehouse: kernel cells shared across layers through per-stage warehouses.

Li, Yao, "KernelWarehouse: Rethinking the Design of Dynamic Convolution", ICML 2024,
arXiv:2308.08361. Checked against the official code, OSVAI/KernelWarehouse
(``modules/kernel_warehouse.py`` and ``models/kw_*.py``), whose behaviour this module reproduces:

- every KW layer's static kernel is cut into ``m`` cells of shape ``(c_out, c_in, 1, 1)``; the cell
  shape of a warehouse comes from the gcd of its layers' channel counts times the in/out ratios,
  and the warehouse holds ``n = int(cell_num_ratio * sum m)`` cells (:mod:`dynconv.ops._warehouse`);
- the attention (``fc1 -> norm1 -> ReLU -> fc2`` on the pooled input, hidden width
  ``max(int(C_in * reduction), 16)``) gives ``n + 1`` logits per cell of the layer (the last one
  belongs to an implicit zero cell) and the contrasting-driven attention function
  ``(1 - tau) * z / (sum |z| + 1e-3) + tau * beta`` turns them into (possibly negative) weights;
- cells are assembled into the kernel in the official order (spatial position slowest, then output
  block, then input block), which is what official checkpoints need
  (:class:`~dynconv.ops.kernels.WarehouseCells`, the layer's kernel description);
- layers take contiguous cell slices of their warehouse in ``model.modules()`` order; each slice is
  kaiming(fan_out) initialised and fixes the binary ``beta`` that makes the network at ``tau = 1``
  an ordinary static CNN (``tau`` goes 1 -> 0 over the first epochs, see
  :func:`dynconv.schedules.warehouse_mixing`; a fresh model evaluates with ``tau = 0``);
- which layers are KW and which warehouse each one uses (hand-over of a stage's first block to the
  previous warehouse, strided-only ResNet downsample, the hand-built 1/2x MobileNetV2) follow the
  official model files, see :func:`dynconv.surgery.kernelwarehouse.convert_kernelwarehouse`.

Departures, none of which changes parameters, state-dict keys or outputs: ``sharing_range`` given
as a string (``"layer_conv"``) is read as the tuple it means (the official manager iterates its
characters, which happens to give the same grouping); beta is a non-persistent buffer rather than
a plain tensor; the attention BatchNorm is batch-1 safe; layers hold their manager in a one-element
list (as the official code does) while the manager is registered once, at the model root.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_tracing

from .._compat import is_compiling, is_exporting
from ..schedules import warehouse_mixing
from ._base import DynamicConv2dBase, IntOrPair, Padding, refuse_scripting
from ._norm import SafeBatchNorm1d
from ._routing import TemperatureScheduled, global_pool
from ._warehouse import _NORMS, WarehouseManager, _per_warehouse, cell_assignment, cells_taken  # noqa: F401 (re-exported)
from .functional import contracts_cells, per_sample_conv2d
from .kernels import WarehouseCells

__all__ = [
    "KWAttention",
    "KWConv2d",
    "KWLinear",
    "WarehouseManager",
    "cell_assignment",
    "cells_taken",
]

def _traced_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Tuple[int, int],
                 padding: Any, dilation: Tuple[int, int], groups: int) -> torch.Tensor:
    """The per-sample convolution as one call in an FX graph (its path choice reads the input's shape)."""
    return per_sample_conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)


# torch.fx keeps calls to this function as graph nodes in every symbolic trace of this module's code.
torch.fx.wrap("_traced_conv")


class KWAttention(TemperatureScheduled):
    """Per-sample attention of one KW layer over the ``n`` cells of its warehouse (plus the zero cell).

    ``forward`` returns ``(B * m, n)``: row ``b * m + j`` weights the cells for mixture ``j`` of
    sample ``b``. The scheduled value is ``tau`` of the contrasting-driven attention function.

    Args:
        in_channels: channels of the layer input.
        num_cells: ``n``, cells in the warehouse.
        num_mixtures: ``m``, cells of this layer's kernel.
        reduction: hidden width ``max(int(in_channels * reduction), 16)``.
        norm: ``"batch"`` (BatchNorm1d, fc1 without bias) or ``"layer"`` (LayerNorm, fc1 with bias; ConvNeXt).
        cell_num_ratio: the warehouse budget; sets how many cells belong to this layer.
        nonlocal_basis_ratio: below 1, logits of the other layers' cells come from a smaller basis.
        start_cell: first cell of this layer's slice in the warehouse.
        schedule: tau as a function of epochs (1 -> 0 over 20 epochs).
    """

    def __init__(
        self,
        in_channels: int,
        num_cells: int,
        num_mixtures: int,
        reduction: float = 0.0625,
        norm: str = "batch",
        cell_num_ratio: float = 1.0,
        nonlocal_basis_ratio: float = 1.0,
        start_cell: int = 0,
        schedule=None,
    ) -> None:
        super().__init__(schedule or warehouse_mixing())
        if norm not in _NORMS:
            raise ValueError(f"attention_norm must be one of {_NORMS}, got {norm!r}")
        hidden = max(int(in_channels * reduction), 16)
        self.num_cells = num_cells
        self.num_mixtures = num_mixtures
        self.start_cell = start_cell
        self.fc1 = nn.Linear(in_channels, hidden, bias=norm != "batch")
        self.norm1 = SafeBatchNorm1d(hidden) if norm == "batch" else nn.LayerNorm(hidden)
        self.act1 = nn.ReLU(inplace=True)
        columns = num_cells + 1
        if nonlocal_basis_ratio >= 1.0:
            self.num_local_cells = self.num_basis = 0
            self.fc2 = nn.Linear(hidden, columns * num_mixtures)
            self.fc3 = None
            self.basis_bias = None
        else:
            self.num_local_cells = int(cell_num_ratio * num_mixtures)
            num_nonlocal = num_cells - self.num_local_cells
            self.num_basis = max(int(num_nonlocal * nonlocal_basis_ratio), 16)
            self.fc2 = nn.Linear(hidden, (self.num_local_cells + self.num_basis + 1) * num_mixtures, bias=False)
            self.fc3 = nn.Linear(self.num_basis, num_nonlocal, bias=False)
            self.basis_bias = nn.Parameter(torch.zeros(columns * num_mixtures))
        # beta: 1 on the cell each mixture equals at tau = 1 (set by assign_cells), in fc2's column layout.
        self.register_buffer("temp_bias", torch.zeros(num_mixtures, columns), persistent=False)
        for m in (self.fc1, self.fc2, self.fc3):
            if m is not None:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.no_grad()
    def assign_cells(self, start: int, cell_num_ratio: float) -> int:
        """Set beta from the layer's slice starting at ``start`` (see :func:`cell_assignment`);
        returns the end of the slice."""
        offsets = cell_assignment(self.num_mixtures, cell_num_ratio)
        columns = [self.num_cells if o is None else start + o for o in offsets]
        self.temp_bias.zero_()
        rows = torch.arange(self.num_mixtures, device=self.temp_bias.device)
        self.temp_bias[rows, torch.tensor(columns, device=self.temp_bias.device)] = 1.0
        return start + cells_taken(self.num_mixtures, cell_num_ratio)

    def _expand_basis(self, logits: torch.Tensor) -> torch.Tensor:
        rows = logits.reshape(-1, self.num_local_cells + self.num_basis + 1)
        local = rows[:, : self.num_local_cells]
        nonlocal_ = self.fc3(rows[:, self.num_local_cells : -1])
        s = self.start_cell
        full = torch.cat([nonlocal_[:, :s], local, nonlocal_[:, s:], rows[:, -1:]], dim=1)
        return full.reshape(logits.shape[0], -1) + self.basis_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.norm1(self.fc1(global_pool(x).flatten(1))))
        logits = self.fc2(h)
        if self.fc3 is not None:
            logits = self._expand_basis(logits)
        z = logits.reshape(-1, self.num_mixtures, self.num_cells + 1)
        z = z / (z.abs().sum(dim=2, keepdim=True) + 1e-3)
        tau = self.temperature
        alpha = (1.0 - tau) * z + tau * self.temp_bias
        return alpha[..., :-1].reshape(-1, self.num_cells)

class KWConv2d(DynamicConv2dBase):
    """Drop-in ``nn.Conv2d`` whose kernel is assembled from warehouse cells with per-sample attention.

    With ``warehouse_manager`` the layer joins that manager's warehouse ``warehouse_name`` and is
    ready once the manager ran ``store()`` and ``allocate(network)``. Without it the layer owns a
    private single-layer warehouse (``self.warehouse_manager``) built from the ratio options below
    and is ready at once.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``
            (the bias is static and starts at zero, as in the official code).
        warehouse_manager: a shared :class:`WarehouseManager`, or ``None`` for a private warehouse.
        warehouse_name: name of the warehouse to join (shared manager only).
        reduction, cell_num_ratio, cell_inplane_ratio, cell_outplane_ratio, nonlocal_basis_ratio,
            attention_norm, mixing_epochs: options of the private warehouse (see :class:`WarehouseManager`).
        device, dtype: as ``nn.Conv2d``.
    """

    cell_ndim = 2  # trailing dims of a cell in the bank; the official banks of linear layers have one

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: Padding = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
        warehouse_manager: Optional[WarehouseManager] = None,
        warehouse_name: str = "default",
        reduction: float = 0.0625,
        cell_num_ratio: float = 1,
        cell_inplane_ratio: float = 1,
        cell_outplane_ratio: float = 1,
        nonlocal_basis_ratio: float = 1.0,
        attention_norm: str = "batch",
        mixing_epochs: float = 20.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self._factory = (device, dtype if dtype is not None else torch.get_default_dtype())
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype)) if bias else None
        self.attention: Optional[KWAttention] = None
        self.cell_range: Tuple[int, int] = (0, 0)
        private = warehouse_manager is None
        if private:
            warehouse_manager = WarehouseManager(
                reduction, cell_num_ratio, cell_inplane_ratio, cell_outplane_ratio, (),
                nonlocal_basis_ratio, attention_norm, mixing_epochs,
            )
        # A list, so the shared manager is not registered (and saved) once per layer.
        self._manager = [warehouse_manager]
        self.warehouse_id = warehouse_manager.reserve(self, warehouse_name)
        if private:
            self.warehouse_manager = warehouse_manager
            warehouse_manager.store()
            warehouse_manager.allocate(self)

    @property
    def warehouse_manager_ref(self) -> WarehouseManager:
        return self._manager[0]

    def _attach(self, bank: torch.Tensor, start: int, *, reduction, cell_num_ratio, nonlocal_basis_ratio,
                norm, schedule) -> int:
        """Build the attention for cells ``[start, end)`` of ``bank``; returns ``end``."""
        cell_out, cell_in = bank.shape[1], bank.shape[2]
        self.blocks_out = self.out_channels // cell_out
        self.blocks_in = self.in_channels // self.groups // cell_in
        self.blocks_spatial = math.prod(self.kernel_size)
        self.num_mixtures = self.blocks_out * self.blocks_in * self.blocks_spatial
        self.attention = KWAttention(
            self.in_channels, bank.shape[0], self.num_mixtures, reduction, norm, cell_num_ratio,
            nonlocal_basis_ratio, start, schedule,
        ).to(device=bank.device, dtype=bank.dtype)
        end = self.attention.assign_cells(start, cell_num_ratio)
        self.cell_range = (start, end)
        return end

    def cells(self, attention: torch.Tensor) -> WarehouseCells:
        """The per-sample kernels from ``(B * m, n)`` attention, as the paper builds them: each of the ``m``
        cells of a kernel is a mixture ``attention @ warehouse`` (:class:`~dynconv.ops.kernels.WarehouseCells`)."""
        manager = self.warehouse_manager_ref
        # the cell shape from the manager (under FX the bank's shape is traced)
        c_out, c_in = manager.cell_shapes[self.warehouse_id]
        return WarehouseCells(attention, manager.take_cell(self.warehouse_id), (self.attention.num_cells, c_out, c_in),
                              (self.blocks_out, self.blocks_in), self.kernel_size)

    def kernel(self, attention: torch.Tensor) -> torch.Tensor:
        """Per-sample kernels ``(B, C_out, C_in / g, kh, kw)`` from ``(B * m, n)`` attention, assembled."""
        return self.cells(attention).assemble()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attention is None:
            raise RuntimeError(
                "KWConv2d has no cells yet: its WarehouseManager must run store() and allocate(model) "
                "(dynconv.convert does this)"
            )
        if self._one_sample(x):
            return self._forward_one(x)
        attention = self.attention(x)
        if is_fx_tracing():
            # Traced through rather than a leaf: the bank is read here as a parameter of the model root
            # (``warehouse_manager.weights.N``), which keeps it in the traced module's parameters.
            return _traced_conv(x, self.kernel(attention), self.bias, self.stride, self.padding, self.dilation,
                                self.groups)
        return per_sample_conv2d(x, self.cells(attention), self.bias, **self._conv_kwargs())

    @staticmethod
    def _one_sample(x: torch.Tensor) -> bool:
        """Batch-1 inference in eager mode, which :meth:`_forward_one` serves."""
        return not torch.is_grad_enabled() and not is_fx_tracing() and not is_exporting() and x.shape[0] == 1

    def _forward_one(self, x: torch.Tensor) -> torch.Tensor:
        """One sample without autograd (batch-1 inference): its kernel is assembled from the mixed cells in one
        pass that also applies a per-output-channel ``out_scale`` where the layer has one (a BatchNorm folded by
        :func:`dynconv.deploy`); the convolution is :func:`per_sample_conv2d`'s plain one."""
        attention = self.attention(x)
        bank = self.warehouse_manager_ref.take_cell(self.warehouse_id)
        c_out, c_in = bank.shape[1], bank.shape[2]
        cells = (attention @ bank.reshape(self.attention.num_cells, -1)).reshape(
            self.blocks_spatial, self.blocks_out, self.blocks_in, c_out, c_in)
        # mixture rows (taps, O, I) of (c_out, c_in) cells -> (O, c_out, I, c_in, taps): the kernel's layout
        cells = cells.permute(1, 3, 2, 4, 0)
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        scale = getattr(self, "out_scale", None)
        scale = scale.reshape(self.blocks_out, c_out, 1, 1, 1) if scale is not None else None
        if is_compiling():  # the compiler fuses the product into the copy (inductor rejects the out= view)
            kernel = (cells if scale is None else cells * scale).reshape(shape)
        else:
            kernel = torch.empty(shape, dtype=cells.dtype, device=cells.device)
            target = kernel.view(cells.shape)
            if scale is None:
                target.copy_(cells)
            else:
                torch.mul(cells, scale, out=target)
        return per_sample_conv2d(x, kernel, self.bias, **self._conv_kwargs())

    def mixture_cells(self, attention: torch.Tensor) -> torch.Tensor:
        """The per-sample cells ``(m, B, cell_out, cell_in)``, mixture-major, for
        :func:`~dynconv.ops.functional.cell_conv2d` (the layout :meth:`kernel` assembles)."""
        return self.cells(attention).mixed()

    def mixture_rows(self, attention: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(rows, bank)``: the cells of :meth:`mixture_cells` are ``rows @ bank``, ``rows`` ``(m * B, n)``
        mixture-major, ``bank`` the warehouse ``(n, cell_out, cell_in)``."""
        return self.cells(attention).rows()

    def _contracts_cells(self, x: torch.Tensor) -> bool:
        """Whether :func:`per_sample_conv2d` convolves with this layer's cells directly
        (:func:`~dynconv.ops.functional.contracts_cells`)."""
        return contracts_cells(x, self.kernel_size, self.stride, self.padding, self.groups)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", warehouse={self.warehouse_id}"
        if self.attention is not None:
            s += f", cells={self.cell_range}, mixtures={self.num_mixtures}"
        return s


class _KWTokenConv(KWConv2d):
    """The pointwise KW layer inside :class:`KWLinear`; its cells are stored 1-D like the official KWConv1d."""

    cell_ndim = 1


class KWLinear(nn.Module):
    """``nn.Linear`` counterpart of :class:`KWConv2d` (the classifier of KW 1/2x MobileNetV2).

    As in the official code the layer runs a pointwise KW conv over the tokens: ``(..., C_in)`` is
    read as ``B`` samples of ``L`` tokens (every dim between the first and the last), the attention
    pools over the tokens. Parameters sit under ``.conv`` (``classifier.conv.attention.fc1.weight``).
    """

    __prepare_scriptable__ = refuse_scripting

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs: Any) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.conv = _KWTokenConv(in_features, out_features, 1, bias=bias, **kwargs)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> "KWLinear":
        w = linear.weight
        return cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                   device=w.device, dtype=w.dtype, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(shape[0], -1, shape[-1]).transpose(1, 2).unsqueeze(-1)  # (B, C_in, L, 1)
        y = self.conv(tokens).squeeze(-1).transpose(1, 2)
        return y.reshape(shape[:-1] + (self.out_features,))  # (not *shape: FX cannot unpack a traced shape)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
