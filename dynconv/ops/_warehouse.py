"""KernelWarehouse's warehouses: the cell banks a network's KW layers share, and the cell arithmetic.

Li, Yao, "KernelWarehouse: Rethinking the Design of Dynamic Convolution", ICML 2024, arXiv:2308.08361;
the official ``Warehouse_Manager`` of OSVAI/KernelWarehouse (``modules/kernel_warehouse.py``). A warehouse's
cell shape comes from the gcd of its layers' channel counts times the in/out ratios, and it holds
``n = int(cell_num_ratio * sum m)`` cells (:func:`cells_taken`); layers take contiguous cell slices in
``model.modules()`` order, each kaiming(fan_out) initialised, and each fixes the binary ``beta`` of its
attention (:func:`cell_assignment`). The layer itself, :class:`~dynconv.ops.kernelwarehouse.KWConv2d`, and its
attention live in :mod:`dynconv.ops.kernelwarehouse`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..schedules import warehouse_mixing

Ratio = Union[float, Sequence[float]]

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

    def reserve(self, layer: nn.Module, warehouse_name: str) -> int:
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

    def layers(self, network: nn.Module) -> List[nn.Module]:
        """The KW layers of ``network`` that joined this manager (:meth:`reserve`), in ``modules()`` order."""
        return [m for m in network.modules() if getattr(m, "warehouse_manager_ref", None) is self]

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
        for layer in self.layers(network):
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
        layers = self.layers(network)
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
