"""Per-sample kernels rebuilt in the backward pass instead of kept from the forward.

A dynamic layer's per-sample kernels hold ``B`` times the layer's weights; autograd would keep them (and
their spatially scaled copies) alive from the forward until the backward. They are cheap to rebuild from
what autograd keeps anyway (the attention and the kernel bank, one matmul), so the convolution's saved
copies are replaced by a recipe: the same idea as activation checkpointing, applied to kernels only.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from .._compat import autocast_dtype, autocast_enabled, is_compiling, is_exporting

Recipe = Callable[[], torch.Tensor]


def tracing() -> bool:
    """Whether a compiler or exporter is tracing this call: eager-only machinery (storage-keyed recipes,
    custom autograd Functions with in-place loops) steps aside, and the compiler plans its own."""
    return is_compiling() or is_exporting()


class KernelRecipes:
    """Recipes by tensor storage. Holds no tensor: autograd keeps the saved-tensor hooks (and what they
    reach) as long as the graph, so a strong reference here would keep every kernel alive anyway."""

    def __init__(self, wanted: bool = True) -> None:
        # off when the caller has nothing to rebuild (no hooks on its ops at all), without autograd, and
        # while compiling or exporting: traced tensors have no storage, and a compiler plans its own
        # recomputation
        self.enabled = wanted and torch.is_grad_enabled() and not tracing()
        self._by_storage: Dict[int, Recipe] = {}

    def add(self, tensor: torch.Tensor, recipe: Recipe) -> None:
        if self.enabled:
            self._by_storage[tensor.untyped_storage().data_ptr()] = recipe

    def get(self, tensor: torch.Tensor) -> Optional[Recipe]:
        if not self.enabled:  # also keeps a compiler from tracing ``data_ptr``, which it cannot
            return None
        return self._by_storage.get(tensor.untyped_storage().data_ptr())


@contextlib.contextmanager
def rebuilt_in_backward(recipes: KernelRecipes, device: torch.device) -> Iterator[None]:
    """Within the block, autograd saves no tensor that shares storage with a tensor of ``recipes`` (which
    may be added inside the block, before an op saves them); the backward calls the recipe (without
    autograd, under the forward's autocast state on ``device``) and reads the saved view from its result.

    A recipe must rebuild its tensor exactly (the same ops on the same inputs), or gradients are wrong.
    Tensors must stay alive while the block runs (their storage address identifies them). Does nothing
    where ``recipes`` is disabled (no autograd, compiling, exporting).
    """
    if not recipes.enabled or device.type == "meta":  # meta tensors (timm's default-cfg test): nothing to keep
        yield
        return
    device_type = device.type
    autocast = autocast_enabled(device_type), autocast_dtype(device_type)

    def pack(saved: torch.Tensor):
        recipe = recipes.get(saved) if saved.device.type == device_type else None
        if recipe is None:
            return saved
        return _Rebuild(recipe, saved.size(), saved.stride(), saved.storage_offset(), saved.dtype)

    def unpack(packed):
        if not isinstance(packed, _Rebuild):
            return packed
        with torch.no_grad(), torch.autocast(device_type, dtype=autocast[1], enabled=autocast[0]):
            full = packed.recipe()
        return full.to(packed.dtype).as_strided(packed.size, packed.stride, packed.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class _Rebuild:
    __slots__ = ("recipe", "size", "stride", "offset", "dtype")

    def __init__(self, recipe: Recipe, size: torch.Size, stride: Tuple[int, ...], offset: int,
                 dtype: torch.dtype) -> None:
        self.recipe, self.size, self.stride, self.offset, self.dtype = recipe, size, stride, offset, dtype
