"""KernelWarehouse: kernel cells shared across layers through per-stage warehouses.

Li, Yao, "KernelWarehouse: Rethinking the Design of Dynamic Convolution", ICML 2024,
arXiv:2308.08361. Checked against the official code, OSVAI/KernelWarehouse
(``modules/kernel_warehouse.py`` and ``models/kw_*.py``), whose behaviour this module reproduces:

- every KW layer's static kernel is cut into ``m`` cells of shape ``(c_out, c_in, 1, 1)``; the cell
  shape of a warehouse comes from the gcd of its layers' channel counts times the in/out ratios,
  and the warehouse holds ``n = int(cell_num_ratio * sum m)`` cells (see :func:`cells_taken`);
- the attention (``fc1 -> norm1 -> ReLU -> fc2`` on the pooled input, hidden width
  ``max(int(C_in * reduction), 16)``) gives ``n + 1`` logits per cell of the layer (the last one
  belongs to an implicit zero cell) and the contrasting-driven attention function
  ``(1 - tau) * z / (sum |z| + 1e-3) + tau * beta`` turns them into (possibly negative) weights;
- cells are assembled into the kernel in the official order (spatial position slowest, then output
  block, then input block), which is what official checkpoints need;
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
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_tracing

from .._compat import autocast_enabled, is_compiling, is_exporting
from ..schedules import warehouse_mixing
from ._base import DynamicConv2dBase, IntOrPair, Padding, refuse_scripting
from ._norm import SafeBatchNorm1d
from ._recompute import tracing
from ._routing import TemperatureScheduled, global_pool
from .functional import cell_conv2d, choose_path_for, mix_kernels, per_sample_conv2d

__all__ = [
    "KWAttention",
    "KWConv2d",
    "KWLinear",
    "WarehouseManager",
    "cell_assignment",
    "cells_taken",
]

Ratio = Union[float, Sequence[float]]


def _traced_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Tuple[int, int],
                 padding: Any, dilation: Tuple[int, int], groups: int) -> torch.Tensor:
    """The per-sample convolution as one call in an FX graph (its path choice reads the input's shape)."""
    return per_sample_conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)


# torch.fx keeps calls to this function as graph nodes in every symbolic trace of this module's code.
torch.fx.wrap("_traced_conv")

_NORMS = ("batch", "layer")

def _sharing_tuple(value: Union[None, str, Sequence[str]]) -> Tuple[str, ...]:
    """``"layer_conv"`` (the official JSON configs' spelling) and ``("layer", "conv")`` mean the same."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(part for part in value.split("_") if part)
    return tuple(value)


def _per_warehouse(value: Any, count: int, option: str) -> List[Any]:
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            return list(value) * count
        if len(value) == count:
            return list(value)
        raise ValueError(f"KernelWarehouse option {option!r} has {len(value)} entries for {count} warehouses")
    return [value] * count


def cell_assignment(num_mixtures: int, cell_num_ratio: float) -> List[Optional[int]]:
    """The cell (offset in the layer's slice) each mixture equals at ``tau = 1``; ``None``: the zero cell.

    Budget ``r >= 1`` (an integer): mixture ``j`` owns cell ``j * r``. Budget ``r < 1`` (``k = int(1 / r)``
    mixtures per cell): mixture ``j`` owns the next fresh cell when ``j % k == (j // k) % k``, else the
    zero cell (official ``Warehouse_Manager.allocate``).
    """
    if cell_num_ratio >= 1.0:
        if cell_num_ratio != int(cell_num_ratio):
            raise ValueError(f"cell_num_ratio must be an integer or 1/integer, got {cell_num_ratio}")
        return [j * int(cell_num_ratio) for j in range(num_mixtures)]
    per_cell = int(round(1.0 / cell_num_ratio))
    offsets: List[Optional[int]] = []
    taken = 0
    for j in range(num_mixtures):
        if j % per_cell == (j // per_cell) % per_cell:
            offsets.append(taken)
            taken += 1
        else:
            offsets.append(None)
    return offsets


def cells_taken(num_mixtures: int, cell_num_ratio: float) -> int:
    """Length of the slice :func:`cell_assignment` gives a layer of ``num_mixtures`` mixtures.

    For every official model this sums to ``int(cell_num_ratio * sum m)`` over a warehouse (the
    official allocate asserts it). Where ``m`` is not a multiple of ``1 / r`` (e.g. the 3-channel
    MobileNetV2 stem at 1/4x, which the official code never builds) the rule hands out one more cell
    than ``int(r * m)``; dynconv sizes the warehouse by this count instead of failing.
    """
    if cell_num_ratio >= 1.0:
        return num_mixtures * int(cell_num_ratio)
    return sum(o is not None for o in cell_assignment(num_mixtures, cell_num_ratio))


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


class WarehouseManager(nn.Module):
    """Creates the warehouses of a network and hands their cells to the KW layers.

    Use: build the KW layers with ``warehouse_manager=manager`` and a ``warehouse_name``
    (``"stage{S}_layer{L}_conv{C}"``; names equal after :meth:`fuse_name` share a warehouse), register
    the manager once on the network (``network.warehouse_manager = manager``), then call
    :meth:`store` and :meth:`allocate`. The cell banks are ``self.weights[i]``
    (``warehouse_manager.weights.{i}`` in the state dict, as in the official checkpoints).

    Every ratio option is a scalar or a tuple with one entry per warehouse in creation order.

    Args:
        reduction: attention hidden width ratio (1/16).
        cell_num_ratio: cells in a warehouse / cells its layers are cut into (the budget ``b``).
        cell_inplane_ratio, cell_outplane_ratio: cell channels / gcd of the layers' channels.
        sharing_range: name parts that are fused (``("layer", "conv")``: one warehouse per stage).
        nonlocal_basis_ratio: below 1, enables the attention's non-local basis.
        attention_norm: ``"batch"`` or ``"layer"``.
        mixing_epochs: epochs over which tau goes 1 -> 0.
    """

    def __init__(
        self,
        reduction: Ratio = 0.0625,
        cell_num_ratio: Ratio = 1,
        cell_inplane_ratio: Ratio = 1,
        cell_outplane_ratio: Ratio = 1,
        sharing_range: Union[None, str, Sequence[str]] = (),
        nonlocal_basis_ratio: Ratio = 1.0,
        attention_norm: str = "batch",
        mixing_epochs: float = 20.0,
    ) -> None:
        super().__init__()
        if attention_norm not in _NORMS:
            raise ValueError(f"attention_norm must be one of {_NORMS}, got {attention_norm!r}")
        self.reduction = reduction
        self.cell_num_ratio = cell_num_ratio
        self.cell_inplane_ratio = cell_inplane_ratio
        self.cell_outplane_ratio = cell_outplane_ratio
        self.sharing_range = _sharing_tuple(sharing_range)
        self.nonlocal_basis_ratio = nonlocal_basis_ratio
        self.attention_norm = attention_norm
        self.mixing_epochs = mixing_epochs
        # fused name -> [(C_out, C_in / groups, kernel dims, device, dtype)], in reservation order.
        self._reserved: Dict[str, List[tuple]] = {}
        self.cell_shapes: List[Tuple[int, int]] = []
        self.weights = nn.ParameterList()
        self.allocated = False

    @property
    def warehouse_names(self) -> List[str]:
        return list(self._reserved)

    def fuse_name(self, name: str) -> str:
        """``stage2_layer1_conv0`` -> ``stage2_layer_conv`` for ``sharing_range=("layer", "conv")``."""
        parts = []
        for part in name.split("_"):
            for shared in self.sharing_range:
                if part.startswith(shared):
                    part = shared
            parts.append(part)
        return "_".join(parts)

    def reserve(self, layer: "KWConv2d", warehouse_name: str) -> int:
        """Record ``layer``'s kernel shape under its (fused) warehouse; returns the warehouse index."""
        if len(self.weights):
            raise RuntimeError("WarehouseManager.store() already ran; layers must be reserved before it")
        name = self.fuse_name(warehouse_name)
        shape = (layer.out_channels, layer.in_channels // layer.groups, tuple(layer.kernel_size))
        self._reserved.setdefault(name, []).append(shape + (layer.cell_ndim, layer._factory))
        return list(self._reserved).index(name)

    def store(self) -> None:
        """Create one cell bank per warehouse (cell shape from gcds, size from the budget)."""
        if len(self.weights):
            raise RuntimeError("WarehouseManager.store() already ran")
        count = len(self._reserved)
        ratios = {
            key: _per_warehouse(getattr(self, key), count, key)
            for key in ("cell_num_ratio", "cell_inplane_ratio", "cell_outplane_ratio")
        }
        for idx, (name, layers) in enumerate(self._reserved.items()):
            gcd_out = gcd_in = 0
            for c_out, c_in, *_ in layers:
                gcd_out, gcd_in = math.gcd(gcd_out, c_out), math.gcd(gcd_in, c_in)
            cell_out = max(int(gcd_out * ratios["cell_outplane_ratio"][idx]), 1)
            cell_in = max(int(gcd_in * ratios["cell_inplane_ratio"][idx]), 1)
            cells = 0
            for c_out, c_in, kernel, *_ in layers:
                if c_out % cell_out or c_in % cell_in:
                    raise ValueError(
                        f"warehouse {name!r}: cell {cell_out}x{cell_in} does not tile a {c_out}x{c_in} kernel; "
                        "use cell_inplane_ratio / cell_outplane_ratio that divide the channel gcd"
                    )
                layer_mixtures = (c_out // cell_out) * (c_in // cell_in) * math.prod(kernel)
                cells += cells_taken(layer_mixtures, ratios["cell_num_ratio"][idx])
            # Equals the official int(cell_num_ratio * mixtures) for every official model (see cells_taken).
            ndim, (device, dtype) = layers[0][3], layers[0][4]
            # Every cell is initialised by allocate() (its coverage check guarantees it), so no randn here.
            bank = torch.empty(cells, cell_out, cell_in, *([1] * ndim), device=device, dtype=dtype)
            self.weights.append(nn.Parameter(bank))
            self.cell_shapes.append((cell_out, cell_in))

    def take_cell(self, idx: int) -> torch.Tensor:
        """The cell bank of warehouse ``idx``, ``(n, c_out, c_in, 1, ...)``."""
        return self.weights[idx]

    @torch.no_grad()
    def allocate(self, network: nn.Module) -> None:
        """Give each KW layer of ``network`` (in ``network.modules()`` order) a contiguous slice of its
        warehouse, build its attention and initialise its cells (kaiming fan_out on the slice)."""
        if not len(self.weights) and self._reserved:
            raise RuntimeError("call WarehouseManager.store() before allocate()")
        count = len(self.weights)
        per = {
            key: _per_warehouse(getattr(self, key), count, key)
            for key in ("reduction", "cell_num_ratio", "nonlocal_basis_ratio")
        }
        ends = [0] * count
        for layer in network.modules():
            if isinstance(layer, KWConv2d) and layer.warehouse_manager_ref is self:
                idx = layer.warehouse_id
                start = ends[idx]
                end = layer._attach(
                    self.weights[idx],
                    start,
                    reduction=per["reduction"][idx],
                    cell_num_ratio=per["cell_num_ratio"][idx],
                    nonlocal_basis_ratio=per["nonlocal_basis_ratio"][idx],
                    norm=self.attention_norm,
                    schedule=warehouse_mixing(self.mixing_epochs),
                )
                bank = self.weights[idx]
                if end > bank.shape[0]:
                    raise RuntimeError(f"warehouse {self.warehouse_names[idx]!r} has {bank.shape[0]} cells, "
                                       f"its layers need more ({end} so far)")
                if end > start:
                    nn.init.kaiming_normal_(bank[start:end].view(-1, *bank.shape[2:]), mode="fan_out",
                                            nonlinearity="relu")
                ends[idx] = end
        for idx, end in enumerate(ends):
            if end != self.weights[idx].shape[0]:
                raise RuntimeError(
                    f"warehouse {self.warehouse_names[idx]!r}: its layers in this network take {end} cells but it "
                    f"holds {self.weights[idx].shape[0]} (is every reserved layer part of the network? cell_num_ratio "
                    "must be an integer or 1/integer)"
                )
        self.allocated = True

    def drop_unused(self, network: nn.Module) -> List[str]:
        """Remove the warehouses no KW layer of ``network`` uses any more (after ``reset_classifier`` or
        ``prune_intermediate_layers`` took their layers away) and renumber the rest; returns their names.

        A warehouse with at least one layer keeps all its cells: every layer's attention weighs every
        cell of its warehouse, so each cell still gets a gradient. A warehouse without layers would
        hold parameters without gradients, which DDP refuses unless ``find_unused_parameters=True``.
        """
        layers = [m for m in network.modules() if isinstance(m, KWConv2d) and m.warehouse_manager_ref is self]
        used = sorted({m.warehouse_id for m in layers})
        count = len(self.weights)
        if len(used) == count:
            return []
        names = self.warehouse_names
        for key in ("reduction", "cell_num_ratio", "cell_inplane_ratio", "cell_outplane_ratio",
                    "nonlocal_basis_ratio"):
            value = getattr(self, key)
            if isinstance(value, (tuple, list)) and len(value) == count > 1:
                setattr(self, key, type(value)(value[i] for i in used))
        self.weights = nn.ParameterList([self.weights[i] for i in used])
        self._reserved = {names[i]: self._reserved[names[i]] for i in used}
        self.cell_shapes = [self.cell_shapes[i] for i in used]
        renumber = {old: new for new, old in enumerate(used)}
        for layer in layers:
            layer.warehouse_id = renumber[layer.warehouse_id]
        return [name for i, name in enumerate(names) if i not in renumber]

    def forward(self, x: Any) -> Any:
        """Identity: the manager only holds cells, but as the last child of an ``nn.Sequential``
        model it is called with the model's output and must hand it on unchanged."""
        return x

    def extra_repr(self) -> str:
        rows = [f"{name}: {tuple(w.shape)}" for name, w in zip(self.warehouse_names, self.weights)]
        return "\n".join(rows)


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

    def kernel(self, attention: torch.Tensor) -> torch.Tensor:
        """Per-sample kernels ``(B, C_out, C_in / g, kh, kw)`` from ``(B * m, n)`` attention.

        Mixture ``j = s * (G_out * G_in) + o * G_in + i`` fills output block ``o``, input block ``i``
        at spatial tap ``s`` (the official layout).
        """
        bank = self.warehouse_manager_ref.take_cell(self.warehouse_id)
        # mix_kernels, with the cell shape from the manager (under FX the bank's shape is traced)
        c_out, c_in = self.warehouse_manager_ref.cell_shapes[self.warehouse_id]
        cells = attention @ bank.reshape(self.attention.num_cells, -1)
        batch = attention.shape[0] // self.num_mixtures
        cells = cells.reshape(batch, self.blocks_spatial, self.blocks_out, self.blocks_in, c_out, c_in)
        cells = cells.permute(0, 2, 4, 3, 5, 1)
        return cells.reshape(batch, self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attention is None:
            raise RuntimeError(
                "KWConv2d has no cells yet: its WarehouseManager must run store() and allocate(model) "
                "(dynconv.convert does this)"
            )
        if not torch.is_grad_enabled() and not is_fx_tracing() and not is_exporting() and x.shape[0] == 1:
            return self._forward_one(x)
        attention = self.attention(x)
        if is_fx_tracing():
            # Traced through rather than a leaf: the bank is read here as a parameter of the model root
            # (``warehouse_manager.weights.N``), which keeps it in the traced module's parameters.
            return _traced_conv(x, self.kernel(attention), self.bias, self.stride, self.padding, self.dilation,
                                self.groups)
        if self._contracts_cells(x):
            # the cells as (rows, bank): in training, mixed a few at a time, never all B x the weights at once
            out = cell_conv2d(x, None, (self.blocks_out, self.blocks_in), self.kernel_size, self.stride,
                              self.padding, self.dilation, mixing=self.mixture_rows(attention))
            return out + self.bias.reshape(1, -1, 1, 1) if self.bias is not None else out
        weight = self.kernel(attention)
        return per_sample_conv2d(x, weight, self.bias, **self._conv_kwargs(), rebuild=lambda: self.kernel(attention))

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
        rows, bank = self.mixture_rows(attention)
        batch = attention.shape[0] // self.num_mixtures
        return mix_kernels(rows, bank).reshape(self.num_mixtures, batch, bank.shape[1], bank.shape[2])

    def mixture_rows(self, attention: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(rows, bank)``: the cells of :meth:`mixture_cells` are ``rows @ bank``, ``rows`` ``(m * B, n)``
        mixture-major, ``bank`` the warehouse ``(n, cell_out, cell_in)``."""
        bank = self.warehouse_manager_ref.take_cell(self.warehouse_id)
        batch = attention.shape[0] // self.num_mixtures
        rows = attention.reshape(batch, self.num_mixtures, -1).transpose(0, 1).reshape(-1, attention.shape[1])
        return rows, bank

    def _contracts_cells(self, x: torch.Tensor) -> bool:
        """Whether this call convolves with the cells directly (:func:`cell_conv2d`): on the matmul path
        with several taps, in plain fp32 eager mode (no autocast, compile or export), without groups."""
        if (self.groups != 1 or self.blocks_spatial == 1 or isinstance(self.padding, str) or x.is_meta
                or autocast_enabled(x.device.type) or tracing()):
            return False
        return choose_path_for(x, self.kernel_size, self.stride, self.padding, self.groups) == "matmul"

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
