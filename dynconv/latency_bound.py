"""The batch-1 latency a dynamic-convolution method cannot beat on a given machine.

At batch 1 a dynamic layer does what its static conv does, plus what its method adds:

- **bytes**: the input is read once by the attention's global pool; a kernel bank (CondConv / DY-Conv /
  ODConv experts, the KernelWarehouse warehouse whose every cell the layer's attention weighs) is read once;
  the per-sample kernel is written once and read once by the convolution. Where a method needs no mixed
  kernel (ODConv with one 1x1 kernel, the residual attentions SE / CBAM / ECA, DCD's output scale) the
  smaller of the per-sample kernel and the feature maps it scales is written and read once. DGC gathers the
  kept kernel rows of each head (read once, written and read once) after its pre-activation, which reads
  and writes the input once.
- **mixing MACs**: mixing is a matmul; KernelWarehouse's ``m x n`` cell weights make it compute-bound where
  ``m`` is large, so a layer's bytes and mixing MACs meet in a roofline, ``max(bytes / bandwidth,
  mixing MACs / matmul rate)``.
- **convolution MACs** beyond the static conv's (DCD's ``Q``, ``P`` and ``Phi``; negative for DGC's pruned
  channels) at the static network's own MAC rate.
- **attention MACs** (the routing / attention branches' FCs and small convs) at the measured MAC rate of
  such batch-1 products.

The bound is the static network's measured time plus these. The machine's rates are inputs
(:class:`MachineRates`, measured by :func:`measure_rates`, or by timing :func:`rate_probes` among the
models, as ``dynconv.benchmark.latency_vs_bound`` does), never constants here; the byte and MAC counts
come from the model's own modules and one batch-1 forward (:func:`method_costs`). The static conv's time
already includes reading its kernel once, so counting the mixed kernel's read again (as above) makes the
bound an upper estimate by one kernel read per layer: what a fused kernel could still save.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .ops._base import DynamicConv2dBase
from .ops.condconv import CondConv2d
from .ops.dcd import DCDConv2d
from .ops.dgc import DGCConv2d
from .ops.dyconv import DynamicConv2d
from .ops.functional import forced_path
from .ops.icconv import InceptionConv2d
from .ops.kernelwarehouse import KWConv2d
from .ops.odconv import ODConv2d

__all__ = ["LayerCost", "MachineRates", "MethodCost", "count_aten_ops", "dispatch_probe", "latency_bound",
           "measure_rates", "method_costs", "rate_probes", "rates_from_seconds"]


@dataclass(frozen=True)
class MachineRates:
    """Measured rates of one machine (see :func:`measure_rates`).

    Attributes:
        bandwidth: bytes per second moved by a large copy, counting bytes read plus bytes written.
        matmul_macs_per_s: MAC rate of a large float32 matmul (the kernel-mixing roofline).
        small_macs_per_s: MAC rate of batch-1 matrix-vector products of attention shapes.
    """

    bandwidth: float
    matmul_macs_per_s: float
    small_macs_per_s: float


@dataclass
class LayerCost:
    """What one dynamic layer (or residual attention module) adds at batch 1."""

    name: str
    kind: str
    bank_bytes: int = 0  # parameters read once (expert kernels, warehouse cells, gathered kernel rows)
    kernel_bytes: int = 0  # per-sample state written once and read once (mixed kernel or scaled maps)
    map_bytes: int = 0  # feature-map traffic the method adds (pool read, pre-activation read and write)
    mixing_macs: int = 0  # the kernel-mixing matmul
    conv_macs: int = 0  # convolution MACs beyond the static conv's (negative: fewer)
    attention_macs: int = 0

    @property
    def bytes(self) -> int:
        """Bytes that must move: the bank read once, the per-sample state written and read once, the maps."""
        return self.bank_bytes + 2 * self.kernel_bytes + self.map_bytes

    def seconds(self, rates: MachineRates, static_macs_per_s: float) -> float:
        memory = max(self.bytes / rates.bandwidth, self.mixing_macs / rates.matmul_macs_per_s)
        return memory + self.conv_macs / static_macs_per_s + self.attention_macs / rates.small_macs_per_s


@dataclass
class MethodCost:
    """Every :class:`LayerCost` of a model, plus the static network's MACs for the static MAC rate."""

    layers: List[LayerCost] = field(default_factory=list)

    def total(self, key: str) -> int:
        return sum(getattr(layer, key) for layer in self.layers)


def latency_bound(cost: MethodCost, static_seconds: float, static_macs: int, rates: MachineRates) -> float:
    """Seconds per batch-1 forward the method cannot beat: the static network's measured time plus each
    layer's :meth:`LayerCost.seconds` (convolution MACs at the static network's own rate,
    ``static_macs / static_seconds``)."""
    static_rate = static_macs / static_seconds
    return static_seconds + sum(layer.seconds(rates, static_rate) for layer in cost.layers)


def _conv_macs(layer: DynamicConv2dBase, out: torch.Tensor) -> int:
    """MACs of the static conv this layer replaces, at this output size (batch 1)."""
    k = layer.kernel_size[0] * layer.kernel_size[1]
    return layer.out_channels * (layer.in_channels // layer.groups) * k * out.shape[-2] * out.shape[-1]


def _kernel_numel(layer: DynamicConv2dBase) -> int:
    return layer.out_channels * (layer.in_channels // layer.groups) * layer.kernel_size[0] * layer.kernel_size[1]


def _residual_attention_kinds() -> Dict[type, str]:
    from timm.layers.cbam import CbamModule
    from timm.layers.eca import EcaModule
    from timm.layers.squeeze_excite import SEModule

    return {SEModule: "se", EcaModule: "eca", CbamModule: "cbam"}


def _layer_cost(name: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor, counted: Dict[str, int],
                es: int) -> Optional[LayerCost]:
    """The bytes and MACs ``module`` adds; ``counted`` are the MACs a FLOP counter saw inside it, split into
    ``conv`` (convolutions), ``matmul`` (other products) and ``attention`` (its attention children)."""
    in_map, out_map = x[0].numel() * es, y[0].numel() * es
    residual = _residual_attention_kinds()
    if type(module) in residual:
        kind = residual[type(module)]
        # pool read, then the scaled map read and written (CBAM: a channel and a spatial pass of each)
        passes = 6 if kind == "cbam" else 3
        return LayerCost(name, kind, map_bytes=passes * in_map,
                         attention_macs=counted["conv"] + counted["matmul"] + counted["attention"])
    if not isinstance(module, DynamicConv2dBase):
        return None
    kernel = _kernel_numel(module) * es
    static_conv = _conv_macs(module, y)
    cost = LayerCost(name, type(module).__name__, attention_macs=counted["attention"],
                     conv_macs=counted["conv"] + counted["matmul"] - static_conv)
    if isinstance(module, (CondConv2d, DynamicConv2d, ODConv2d)):
        bank = module.weight.numel() * es + (module.bias.numel() * es if module.bias is not None and
                                             module.bias.dim() == 2 else 0)
        cost.bank_bytes, cost.map_bytes = bank, in_map  # the attention's pool reads the input
        cost.mixing_macs, cost.conv_macs = counted["matmul"], counted["conv"] - static_conv
        mixes = module.weight.shape[0] > 1
        taps = module.kernel_size != (1, 1)
        if mixes or (isinstance(module, ODConv2d) and taps):
            cost.kernel_bytes = kernel  # the mixed (or spatially scaled) kernel, other attentions folded in
        else:  # ODConv's "pw1x": the channel / filter attentions scale the kernel or the maps, the smaller
            cost.kernel_bytes = min(kernel, in_map + out_map)
    elif isinstance(module, KWConv2d):
        cell_out, cell_in = module.warehouse_manager_ref.cell_shapes[module.warehouse_id]
        cells = module.attention.num_cells
        cost.bank_bytes = cells * cell_out * cell_in * es  # every cell of the warehouse is weighed
        cost.kernel_bytes, cost.map_bytes = kernel, in_map
        cost.mixing_macs = module.num_mixtures * cells * cell_out * cell_in
        cost.conv_macs = counted["conv"] + counted["matmul"] - cost.mixing_macs - static_conv
    elif isinstance(module, DCDConv2d):
        # the pool reads the input; Lambda scales W0's output channels: in the kernel or on the output map
        cost.map_bytes, cost.kernel_bytes = in_map, min(kernel, out_map)
    elif isinstance(module, DGCConv2d):
        kept = (module.in_channels - module.inactive_channels) / module.in_channels
        rows = round(kept * kernel)  # each head's kept input-channel rows
        cost.bank_bytes, cost.kernel_bytes = rows, rows
        # pre-activation ReLU(BN(x)) reads and writes the input, the saliency pool reads it again
        cost.map_bytes = (3 if module.norm is not None else 1) * in_map
        # the sparse path rounds the kept channels up to oneDNN's channel block: work the method does not need
        cost.conv_macs += module.elementwise_macs(x, y).get("dynamic_conv", 0)
    elif isinstance(module, InceptionConv2d):
        # the static conv's MACs and weights at other dilations; the zero taps of packed members are the
        # implementation's choice, not the method's
        cost.conv_macs -= module.wasted_macs(x, y)
    else:  # a family this model does not know: its parameters read once, one per-sample kernel
        cost.bank_bytes = sum(p.numel() for p in module.parameters(recurse=False)) * es
        cost.kernel_bytes, cost.map_bytes = kernel, in_map
    return cost


@torch.no_grad()
def method_costs(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> MethodCost:
    """Walk ``model`` (eval mode, one batch-1 forward) and return what each dynamic layer and residual
    attention adds over the static network (see the module docstring for what is counted)."""
    if input_size[0] != 1:
        raise ValueError(f"the bound is for batch 1, got input_size {tuple(input_size)}")
    residual = tuple(_residual_attention_kinds())
    sites = {name: m for name, m in model.named_modules()
             if isinstance(m, DynamicConv2dBase) or isinstance(m, residual)}
    shapes: Dict[str, tuple] = {}

    def hook(name: str):
        def record(module, inputs, output):
            shapes[name] = (inputs[0], output)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in sites.items()]
    param = next(model.parameters())
    x = torch.randn(*input_size, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
    was_training = model.training
    model.eval()  # (kept until the costs are read: DGC's sparse path, which they describe, is eval-only)
    try:
        # the grouped path shows each per-sample conv to the counter as a convolution, mixing as a matmul
        with FlopCounterMode(display=False) as counter, forced_path("grouped"):
            model(x)
        for h in handles:
            h.remove()
        counts = counter.get_flop_counts()
        root = type(model).__name__
        es = param.element_size()
        cost = MethodCost()
        for name, module in sites.items():
            if name not in shapes:
                continue
            path = f"{root}.{name}" if name else root
            counted = {"conv": 0, "matmul": 0, "attention": 0}
            for op, flops in counts.get(path, {}).items():
                counted["conv" if op is torch.ops.aten.convolution else "matmul"] += flops // 2
            for child in getattr(module, "attention_children", ()):
                for op, flops in counts.get(f"{path}.{child}", {}).items():
                    key = "conv" if op is torch.ops.aten.convolution else "matmul"
                    counted[key] -= flops // 2
                    counted["attention"] += flops // 2
            layer = _layer_cost(name, module, *shapes[name], counted, es)
            if layer is not None:
                cost.layers.append(layer)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return cost


def rate_probes(copy_mb: int = 512) -> Dict[str, Tuple[Callable[[], object], float]]:
    """The calls :func:`rates_from_seconds` turns into :class:`MachineRates`, each with the work it does
    (CPU, float32), to be timed together with the models so that they see the same machine load:

    - ``bandwidth``: ``dst.copy_(src)`` of ``copy_mb`` MB, counted as ``2 * copy_mb`` (read plus write);
    - ``matmul``: a 1024 x 1024 x 1024 matmul;
    - ``small``: 100 times the squeeze and excite products of an attention branch at batch 1,
      ``(1, 512) @ (512, 32)`` then ``(1, 32) @ (32, 512)``, dispatch included (that is what they cost).
    """
    n = copy_mb * 2**20 // 4
    src, dst = torch.ones(n), torch.empty(n)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    v, w1, w2 = torch.randn(1, 512), torch.randn(32, 512), torch.randn(512, 32)

    def small() -> None:
        for _ in range(100):
            F.linear(F.linear(v, w1), w2)

    return {"bandwidth": (lambda: dst.copy_(src), 2.0 * n * 4), "matmul": (lambda: a @ b, 1024.0**3),
            "small": (small, 100.0 * 2 * 512 * 32)}


def rates_from_seconds(probes: Dict[str, Tuple[Callable[[], object], float]],
                       seconds: Dict[str, float]) -> MachineRates:
    """:class:`MachineRates` from the measured seconds per call of each of :func:`rate_probes`."""
    rate = {name: work / seconds[name] for name, (_, work) in probes.items()}
    return MachineRates(rate["bandwidth"], rate["matmul"], rate["small"])


@torch.no_grad()
def measure_rates(copy_mb: int = 512, repeats: int = 10) -> MachineRates:
    """:class:`MachineRates` of this machine now: the median of ``repeats`` calls of each of
    :func:`rate_probes`."""
    probes = rate_probes(copy_mb)
    seconds = {}
    for name, (fn, _) in probes.items():
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times)
    return rates_from_seconds(probes, seconds)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def count_aten_ops(model: nn.Module, x: torch.Tensor) -> int:
    """The aten ops one inference forward of ``model`` on ``x`` dispatches. Eager PyTorch pays a fixed
    dispatch time per op whatever its size, which the byte / MAC bound does not count: at batch 1 a method
    that adds many small ops per layer pays it many times (:func:`dispatch_probe` times one)."""
    counter = _OpCounter()
    with counter:
        model(x)
    return counter.count


def dispatch_probe(ops: int = 100) -> Tuple[Callable[[], object], int]:
    """``(fn, ops)``: ``fn`` dispatches ``ops`` elementwise products of one-element tensors, whose time is the
    eager dispatch cost of an op and nothing else (a lower bound on what a model's small ops cost: their
    Python around the op comes on top)."""
    a = torch.ones(1)

    def run() -> None:
        for _ in range(ops):
            torch.mul(a, a)

    return run, ops

