"""Per-sample kernels rebuilt in the backward pass instead of kept from the forward.

A dynamic layer's per-sample kernels hold ``B`` times the layer's weights; autograd would keep them (and
their spatially scaled copies) alive from the forward until the backward. They are cheap to rebuild from
what autograd keeps anyway (the attention and the kernel bank, one matmul), so the convolution's saved
copies are replaced by a recipe: the same idea as activation checkpointing, applied to kernels only.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Tuple

import torch


@contextlib.contextmanager
def rebuilt_in_backward(recipes: Dict[torch.Tensor, Callable[[], torch.Tensor]],
                        device: torch.device) -> Iterator[None]:
    """Within the block, autograd saves no tensor that shares storage with a key of ``recipes`` (keys
    may be added inside the block); the
    backward calls the key's recipe (without autograd, under the forward's autocast state) and reads
    the saved view from its result.

    A recipe must rebuild its tensor exactly (the same ops on the same inputs), or gradients are wrong.
    ``device``: where the tensors live (its autocast state is replayed). Does nothing while compiling (the compiler plans its own recomputation) or without autograd.
    """
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        yield
        return
    device = device.type
    autocast = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)

    def pack(saved: torch.Tensor):
        # looked up per call: the block may register tensors it creates (before an op saves them)
        storage = saved.untyped_storage().data_ptr()
        for owner, recipe in recipes.items():
            if owner.untyped_storage().data_ptr() == storage and saved.device.type == device:
                return _Rebuild(recipe, saved.size(), saved.stride(), saved.storage_offset(), saved.dtype)
        return saved

    def unpack(packed):
        if not isinstance(packed, _Rebuild):
            return packed
        with torch.no_grad(), torch.autocast(device, dtype=autocast[1], enabled=autocast[0]):
            full = packed.recipe()
        return full.to(packed.dtype).as_strided(packed.size, packed.stride, packed.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class _Rebuild:
    __slots__ = ("recipe", "size", "stride", "offset", "dtype")

    def __init__(self, recipe: Callable[[], torch.Tensor], size: torch.Size, stride: Tuple[int, ...], offset: int,
                 dtype: torch.dtype) -> None:
        self.recipe, self.size, self.stride, self.offset, self.dtype = recipe, size, stride, offset, dtype
