"""Training memory as live tensor bytes, and the floor a conv variant's training step cannot go below.

:func:`live_training_memory` counts the bytes of every tensor storage alive during training steps, the
number a CUDA run's ``torch.cuda.max_memory_allocated`` reports up to allocator rounding, but measured the
same way on any device (process RSS, by contrast, holds the allocator's free lists and the libraries).
:func:`training_memory_floor` is what a variant must hold beyond the static network: the static step's
measured peak, plus the variant's extra parameters, their gradients and optimizer state, plus the
activations its attention branches keep for the backward at the batch size. The benchmark compares the
two (:func:`memory_rows`).
"""
from __future__ import annotations

import weakref
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .benchmark import BenchSettings, _prepare, training_step

__all__ = ["LiveTensorTracker", "live_training_memory", "training_memory_floor", "attention_activation_bytes",
           "peak_holders", "memory_rows", "FLOOR_TARGET"]


def _storage(t: torch.Tensor) -> Optional[torch.UntypedStorage]:
    if t.is_meta or t.is_sparse or t.layout != torch.strided:
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # wrapper subclasses without a real storage
        return None


class LiveTensorTracker(TorchDispatchMode):
    """Counts the bytes of the tensor storages alive while it is active, and their peak.

    Every op's outputs are seen (forward, backward, optimizer), and each storage is counted once whatever
    number of views or autograd's saved copies share it, from the op that allocates it until it is freed
    (a ``weakref`` finalizer on the storage, whose Python object torch keeps as long as the storage).
    Tensors that exist before the tracker (parameters, inputs) are added with :meth:`add`. Not seen:
    scratch memory an op allocates and frees inside its own kernel (a convolution algorithm's workspace),
    which depends on the device and the algorithm rather than on the model.

    With ``holders=True`` the live set is copied at every new peak, labelled by the module (forward), the
    module of the autograd node (backward) and the op that allocated each storage: :meth:`top_holders`.
    """

    def __init__(self, device: Optional[torch.device] = None, holders: bool = False) -> None:
        super().__init__()
        self.device = torch.device(device) if device is not None else None
        self.holders = holders
        self.current = 0
        self.peak = 0
        self._live: Dict[int, Tuple[int, str]] = {}
        self._finalizers: Dict[int, weakref.finalize] = {}
        self._peak_live: Dict[int, Tuple[int, str]] = {}
        self._modules: List[str] = []
        self._hooks: list = []

    # --- counting -------------------------------------------------------------------------------
    def add(self, tensors: Iterable[torch.Tensor], label: str) -> None:
        """Count tensors made before the tracker started (parameters, buffers, inputs, optimizer state)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._see(t, label)
        self._update_peak()

    def _see(self, t: torch.Tensor, label: str) -> None:
        if self.device is not None and t.device.type != self.device.type:
            return
        storage = _storage(t)
        if storage is None:
            return
        key, nbytes = storage._cdata, storage.nbytes()
        known = self._live.get(key)
        if known is None:
            if nbytes == 0:
                return
            self._live[key] = (nbytes, label)
            self.current += nbytes
            self._finalizers[key] = weakref.finalize(storage, self._free, key)
        elif known[0] != nbytes:  # resized in place (``out=`` ops)
            self.current += nbytes - known[0]
            self._live[key] = (nbytes, known[1])

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        self._finalizers.pop(key, None)
        if entry is not None:
            self.current -= entry[0]

    def _update_peak(self) -> None:
        if self.current > self.peak:
            self.peak = self.current
            if self.holders:
                self._peak_live = dict(self._live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        label = self._label(func) if self.holders else ""
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._see(t, label)
        self._update_peak()
        return out

    # --- attribution ----------------------------------------------------------------------------
    def _label(self, func) -> str:
        op = func.__name__ if hasattr(func, "__name__") else str(func)
        node = torch._C._current_autograd_node()
        if node is not None:
            module = node.metadata.get("dynconv_module", "?") if hasattr(node, "metadata") else "?"
            return f"backward {module}: {node.name()} -> {op}"
        if self._modules:
            return f"forward {self._modules[-1]}: {op}"
        return f"step: {op}"

    def watch(self, model: nn.Module) -> None:
        """Label forward ops by ``model``'s module names and tag their autograd nodes with them, so that
        the backward ops are labelled too (only with ``holders=True``)."""
        if not self.holders:
            return
        names = {id(m): name or type(model).__name__ for name, m in model.named_modules()}

        def pre(module, args):
            if id(module) in names:
                self._modules.append(names[id(module)])

        def post(module, args, output):
            if id(module) in names:
                self._modules.pop()
                # tag the nodes this module made (inner modules tagged theirs first): walk back from its
                # outputs to nodes already tagged
                todo = [t.grad_fn for t in tree_flatten(output)[0]
                        if isinstance(t, torch.Tensor) and t.grad_fn is not None]
                while todo:
                    node = todo.pop()
                    if node is None or "dynconv_module" in node.metadata:
                        continue
                    node.metadata["dynconv_module"] = names[id(module)]
                    todo += [n for n, _ in node.next_functions]

        self._hooks += [nn.modules.module.register_module_forward_pre_hook(pre),
                        nn.modules.module.register_module_forward_hook(post)]

    def top_holders(self, n: int = 10) -> List[Tuple[str, int]]:
        """The ``n`` labels holding the most bytes at the peak (``holders=True``), largest first."""
        total: Dict[str, int] = defaultdict(int)
        for nbytes, label in self._peak_live.values():
            total[label] += nbytes
        return sorted(total.items(), key=lambda kv: -kv[1])[:n]

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for fin in list(self._finalizers.values()):
            fin.detach()
        self._finalizers.clear()
        return super().__exit__(*exc)


def _closure_tensors(fn: Callable) -> List[torch.Tensor]:
    """The tensors a closure holds (the input batch of :func:`training_step`) and its optimizer's state."""
    found: List[torch.Tensor] = []
    for cell in fn.__closure__ or ():
        value = cell.cell_contents
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, torch.optim.Optimizer):
            found += [t for state in value.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    return found


def _measure(model: nn.Module, settings: BenchSettings, steps: int, holders: bool) -> LiveTensorTracker:
    device = _prepare(settings)
    step = training_step(model.to(device), settings)
    tracker = LiveTensorTracker(device, holders=holders)
    tracker.add([p for p in model.parameters()], "parameter")
    tracker.add([p.grad for p in model.parameters() if p.grad is not None], "gradient")
    tracker.add(list(model.buffers()), "buffer")
    tracker.add(_closure_tensors(step), "input / optimizer state")
    with tracker:
        tracker.watch(model)
        for _ in range(steps):
            step()
    return tracker


def live_training_memory(model: nn.Module, settings: BenchSettings, steps: int = 2) -> int:
    """Peak live tensor bytes over ``steps`` training steps of ``model`` (forward, backward, SGD step with
    momentum: :func:`dynconv.benchmark.training_step`) at ``settings.batch`` and ``settings.image_size``.

    Counted: parameters, buffers and the input batch (alive throughout), gradients, optimizer state
    (momentum, from the first step on), activations autograd saves for the backward, and every temporary
    an op returns, each storage once however many views share it. This is what a CUDA run's
    ``torch.cuda.max_memory_allocated`` sees, up to the caching allocator's rounding (512 B blocks) and
    the workspace of convolution algorithms; on CPU it is independent of ``malloc``'s free lists, of the
    thread count and of other processes. Deterministic: it does not depend on timing.
    """
    return _measure(model, settings, steps, holders=False).peak


def peak_holders(model: nn.Module, settings: BenchSettings, steps: int = 2, n: int = 12) -> List[Tuple[str, int]]:
    """What holds the peak of :func:`live_training_memory`: the ``n`` largest (label, bytes), labelled
    ``forward <module>: <op>``, ``backward <module>: <autograd node> -> <op>`` or ``step: <op>``."""
    return _measure(model, settings, steps, holders=True).top_holders(n)


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def attention_activation_bytes(model: nn.Module, settings: BenchSettings) -> int:
    """Bytes of the activations the attention branches of ``model``'s dynamic layers keep for the backward
    at ``settings.batch``: the input of every module inside each layer's ``attention_children`` (pooled
    input, hidden activations, normalised and activated features: what their backward reads) and the
    attention each branch returns (read by the product that applies it); each storage once, the layer's
    own input excluded (the static network keeps it too). Read from the shapes of one forward at batch 2
    (no autograd), scaled to the batch: every attention tensor holds one row per sample.
    """
    from .ops._base import DynamicConv2dBase

    branches: List[nn.Module] = []
    for layer in model.modules():
        if isinstance(layer, DynamicConv2dBase):
            branches += [getattr(layer, name) for name in layer.attention_children
                         if isinstance(getattr(layer, name, None), nn.Module)]
    members = {id(m) for branch in branches for m in branch.modules()}
    roots = {id(b) for b in branches}
    if not members:
        return 0
    kept: Dict[int, torch.Tensor] = {}  # by storage; held until the end so no address is reused
    excluded: set = set()

    def hook(module, args, output):
        if id(module) not in members:
            return
        inputs = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)]
        if id(module) in roots:
            # the layer's input is kept by the convolution (counted in the static peak); the attention the
            # branch returns is kept by the product that applies it
            excluded.update(t.untyped_storage().data_ptr() for t in inputs)
            kept_tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
        else:  # what a module's backward may read is its input (an output that nothing reads is not kept)
            kept_tensors = inputs
        for t in kept_tensors:
            kept.setdefault(t.untyped_storage().data_ptr(), t)

    param = next(model.parameters())
    handle = nn.modules.module.register_module_forward_hook(hook)
    was_training = model.training
    probe = 2
    try:
        model.train()
        # the probe forward must not move the running statistics
        state = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
        with torch.no_grad():
            model(torch.zeros(probe, 3, settings.image_size, settings.image_size, device=param.device,
                              dtype=param.dtype))
        model.load_state_dict(state, strict=False)
    finally:
        handle.remove()
        model.train(was_training)
    per_sample = sum(t.untyped_storage().nbytes() for ptr, t in kept.items() if ptr not in excluded) / probe
    return int(per_sample * settings.batch)


def _static_param_bytes(model: nn.Module) -> int:
    """Parameter bytes of the static network ``model`` was made from (a model of :func:`dynconv.create_model`,
    which records its timm architecture), built on the meta device."""
    from . import create_model

    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if arch is None:
        raise ValueError("the static network is unknown for this model (not made by dynconv.create_model): "
                         "give static_model or static_param_bytes")
    with torch.device("meta"):
        static = create_model(arch, "static", num_classes=getattr(model, "num_classes", 1000))
    return _param_bytes(static)


def training_memory_floor(model: nn.Module, static_peak: int, settings: BenchSettings,
                          static_model: Optional[nn.Module] = None, static_param_bytes: Optional[int] = None
                          ) -> Dict[str, int]:
    """The least live memory a training step of ``model`` can peak at, given the static network's
    measured peak ``static_peak`` (:func:`live_training_memory` of the static model, same settings).

    Components (bytes): ``static_peak``; ``extra_params`` (the variant's trainable parameters beyond the
    static network's: ``static_param_bytes``, else ``static_model``'s, else those of the static model of
    the architecture ``model`` was created for); ``extra_grads`` (their gradients); ``extra_optimizer``
    (their SGD momentum, one buffer per parameter as in :func:`~dynconv.benchmark.training_step`);
    ``attention`` (:func:`attention_activation_bytes`); ``floor``, the sum. What the floor leaves out on
    purpose: per-sample kernels (``B`` x a layer's weights), which can be rebuilt and consumed a slice at
    a time, and any copy of a feature map the static network does not make.
    """
    if static_param_bytes is None:
        static_param_bytes = _param_bytes(static_model) if static_model is not None else _static_param_bytes(model)
    extra = max(_param_bytes(model) - static_param_bytes, 0)
    parts = {"static_peak": int(static_peak), "extra_params": extra, "extra_grads": extra,
             "extra_optimizer": extra, "attention": attention_activation_bytes(model, settings)}
    parts["floor"] = sum(parts.values())
    return parts


# Target of issue 21 (point 3): a variant's peak within this factor of its floor (ResNet18 at batch 16,
# MobileNetV2 1.0 at batch 32, 224 px).
FLOOR_TARGET = 1.2


def memory_rows(arch: str, convs: Sequence[str], settings: BenchSettings, steps: int = 2,
                holders: int = 3) -> List[Dict[str, object]]:
    """One row per conv of ``convs`` on ``arch`` (``static`` first, added when missing): the live training
    peak (:func:`live_training_memory`), its floor and the floor's components (MiB), peak / floor (with
    ``within_target``: at most :data:`FLOOR_TARGET`) and peak / static, and ``holders``: the largest
    holders at the peak besides parameters, momentum and forward activations, i.e. what a step holds
    beyond what the static step holds too ((label, MiB), ``holders`` of them)."""
    from . import create_model

    names = ["static", *[c for c in convs if c != "static"]]
    rows: List[Dict[str, object]] = []
    static_peak = static_params = 0
    mib = 2.0 ** 20
    for conv in names:
        torch.manual_seed(0)
        model = create_model(arch, conv, num_classes=settings.num_classes)
        tracker = _measure(model, settings, steps, holders=holders > 0)
        peak = tracker.peak
        if conv == "static":
            static_peak, static_params = peak, _param_bytes(model)
        floor = training_memory_floor(model, static_peak, settings, static_param_bytes=static_params)
        ratio = peak / floor["floor"]
        row: Dict[str, object] = {"arch": arch, "conv": conv, "batch": settings.batch,
                                  "peak_mib": round(peak / mib, 1), "floor_mib": round(floor["floor"] / mib, 1),
                                  "peak_over_floor": round(ratio, 3), "within_target": ratio <= FLOOR_TARGET,
                                  "peak_over_static": round(peak / static_peak, 3)}
        row.update({f"{k}_mib": round(v / mib, 1) for k, v in floor.items() if k != "floor"})
        if holders:
            others = [(label, b) for label, b in tracker.top_holders(10**6)
                      if not label.startswith(("forward", "parameter", "buffer", "input", "step: clone"))]
            row["holders"] = [(label, round(b / mib, 1)) for label, b in others[:holders]]
        rows.append(row)
    return rows
