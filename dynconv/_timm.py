"""Registers every (conv variant, arch) pair as a timm model, e.g. ``odconv4x_resnet18``.

``timm.create_model(name, features_only=True)`` works for all of them: the features come from
timm's ``FeatureGetterNet`` over ``forward_intermediates``, which keeps the whole model (and so the
shared KernelWarehouse banks at its root) instead of re-assembling its children.
"""
from __future__ import annotations

from typing import Any, Callable, List

from timm.models import register_model
from timm.models._features import FeatureGetterNet
from torch import nn

from .models import ARCHS, create_model
from .registry import get_variant, list_convs

_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
_FEATURE_ARGS = ("out_indices", "feature_cls", "output_fmt", "flatten_sequential", "feature_cfg")


def timm_name(conv: str, arch: str) -> str:
    return f"{get_variant(conv).timm_prefix}_{arch}"


def _entrypoint(conv: str, arch: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise ValueError(
                f"dynconv hosts no weights for {timm_name(conv, arch)}; pass checkpoint_path=... to "
                "timm.create_model, or load an official checkpoint with dynconv.import_official"
            )
        for key in _TIMM_ONLY:
            kwargs.pop(key, None)
        features_only = kwargs.pop("features_only", False)
        feature_kwargs = {k: kwargs.pop(k) for k in _FEATURE_ARGS if k in kwargs}
        model = create_model(arch, conv, **kwargs)
        if not features_only:
            return model
        out_indices = feature_kwargs.get("out_indices", tuple(range(len(model.feature_info))))
        return FeatureGetterNet(model, out_indices=out_indices, output_fmt=feature_kwargs.get("output_fmt", "NCHW"))

    entrypoint.__name__ = entrypoint.__qualname__ = timm_name(conv, arch)
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{arch} with {conv} (dynconv.create_model({arch!r}, {conv!r}))."
    return entrypoint


def register_all() -> List[str]:
    """Register every non-static (variant, arch) with timm; returns the names."""
    names = []
    for conv in list_convs():
        if conv == "static":
            continue
        for arch in ARCHS:
            fn = _entrypoint(conv, arch)
            globals()[fn.__name__] = fn
            register_model(fn)
            names.append(fn.__name__)
    return names


REGISTERED = register_all()
