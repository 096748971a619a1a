"""Registers every (conv variant, arch) pair as a timm model, e.g. ``odconv4x_resnet18``.

Each name gets its own pretrained config in timm's registry (``timm.get_pretrained_cfg(name)``): the
backbone's geometry (input size, mean/std, pool size) under the dynconv name, with no weights, and
``first_conv`` / ``classifier`` naming parameters the converted model really has (a KernelWarehouse
stem keeps its cells in a shared bank, DCD's classifier is a dynamic layer). A model carries that
config as ``pretrained_cfg`` / ``default_cfg``, so ``timm.models.save_for_hf`` then
``timm.create_model("local-dir:...", pretrained=True)`` rebuilds the same model with its weights.

``features_only=True`` honours ``feature_cls`` as timm does. The default, ``"getter"``, is timm's
``FeatureGetterNet`` over ``forward_intermediates``, which keeps the whole model (and so the shared
KernelWarehouse banks at its root); ``"list"`` / ``"dict"`` / ``"hook"`` re-assemble the backbone's
children, and the KernelWarehouse manager is carried into them so the banks stay parameters of the
feature model; ``"fx"`` traces the model with dynconv's layers as leaves (see :func:`register_fx_leaves`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import timm
from timm.layers import register_notrace_module
from timm.models import register_model
from timm.models._builder import load_pretrained, pretrained_cfg_for_features, resolve_pretrained_cfg
from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet, FeatureListNet
from timm.models._features_fx import FeatureGraphNet
from timm.models._pretrained import PretrainedCfg
from timm.models._registry import generate_default_cfgs
from torch import nn

from .models import ARCHS, create_model
from .registry import Family, family_with_layer, get_family, get_variant, on_register, registered_families
from .schedules import drive_schedules

_FEATURE_ARGS = ("out_indices", "feature_cls", "output_fmt", "flatten_sequential", "feature_cfg", "no_rewrite")
# PretrainedCfg fields taken from the backbone's timm config: geometry and normalisation, not weights
# or a training recipe (dynconv hosts no weights).
_ARCH_FIELDS = ("input_size", "fixed_input_size", "mean", "std", "num_classes", "pool_size", "first_conv", "classifier")


def timm_name(conv: str, arch: str) -> str:
    return f"{get_variant(conv).timm_prefix}_{arch}"


# -- config names of real parameters ------------------------------------------------------------------------

Names = Union[str, Tuple[str, ...]]


def _default_layer_names(conv: str, arch: str, base: PretrainedCfg) -> Tuple[Names, Names]:
    """``(first_conv, classifier)`` of ``timm_name(conv, arch)`` built with the variant's defaults.

    Must agree with :func:`model_layer_names` on the built model (``tests/test_timm_contract.py`` checks
    every registered name): a KernelWarehouse stem (MobileNetV2, ConvNeXt) has no ``weight``, the input
    reaches its attention's ``fc1`` (its cells sit in ``warehouse_manager.weights``); the KW 1/2x
    MobileNetV2 classifier's per-class parameters are its attention's ``fc2`` (and the bank); DCD's
    dynamic classifier has three ``num_classes``-wide layers.
    """
    variant = get_variant(conv)
    family = get_family(variant.family)
    if family.timm_names is None:
        return base.first_conv, base.classifier
    return family.timm_names(variant, arch, base.first_conv, base.classifier)


def _resolve_layer(model: nn.Module, path: str) -> Names:
    """``path`` itself when it is a plain layer, else the layers of a dynamic one that carry its width
    (:attr:`dynconv.Family.width_layers`)."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return path
    family = family_with_layer(type(module))
    for cls, names in (family.width_layers.items() if family is not None else ()):
        if isinstance(module, cls):
            return names(path)
    return path


def model_layer_names(model: nn.Module, first_conv: Names, classifier: Names) -> Tuple[Names, Names]:
    """``(first_conv, classifier)`` of a built model, from the backbone's timm names."""

    def resolve(names: Names) -> Names:
        if isinstance(names, str):
            return _resolve_layer(model, names)
        out: List[str] = []
        for name in names:
            resolved = _resolve_layer(model, name)
            out.extend([resolved] if isinstance(resolved, str) else resolved)
        return tuple(out)

    return resolve(first_conv), resolve(classifier)


def default_cfg(conv: str, arch: str) -> PretrainedCfg:
    """The registry config of ``timm_name(conv, arch)``."""
    base = timm.get_pretrained_cfg(arch)
    fields = {k: getattr(base, k) for k in _ARCH_FIELDS}
    fields["first_conv"], fields["classifier"] = _default_layer_names(conv, arch, base)
    return PretrainedCfg(**fields, architecture=timm_name(conv, arch))


# -- features ----------------------------------------------------------------------------------------------

_FEATURE_CLASSES = {"list": FeatureListNet, "dict": FeatureDictNet, "fx": FeatureGraphNet, "getter": FeatureGetterNet}


def _feature_class(value: Any) -> type:
    if isinstance(value, type):
        return value
    name = str(value).lower()
    if "hook" in name:
        return FeatureHookNet
    if name not in _FEATURE_CLASSES:
        raise ValueError(f"unknown feature_cls {value!r}; choose one of: {', '.join(_FEATURE_CLASSES)}, hook")
    return _FEATURE_CLASSES[name]


def features_model(model: nn.Module, cfg: Dict[str, Any], feature_kwargs: Dict[str, Any]) -> nn.Module:
    """Wrap ``model`` as ``timm``'s ``build_model_with_cfg`` does for ``features_only=True``."""
    feature_cfg = dict(feature_kwargs.pop("feature_cfg", None) or {})
    feature_cfg.update(feature_kwargs)
    feature_cls = _feature_class(feature_cfg.pop("feature_cls", "getter"))
    feature_cfg.setdefault("out_indices", tuple(range(len(model.feature_info))))
    if not issubclass(feature_cls, (FeatureDictNet, FeatureHookNet)):
        feature_cfg.pop("flatten_sequential", None)
    if not issubclass(feature_cls, FeatureHookNet):
        feature_cfg.pop("no_rewrite", None)
    if feature_cls is FeatureGraphNet:
        register_fx_leaves()
    manager = getattr(model, "warehouse_manager", None)
    features = feature_cls(model, **feature_cfg)
    if manager is not None and not any(p is manager.weights[0] for p in features.parameters()) and len(manager.weights):
        # list / dict / hook re-assemble the backbone's children up to the last tap; the manager holding the
        # shared KernelWarehouse banks sits after them (an identity when called), so it is added back.
        features.add_module("warehouse_manager", manager)
    features.pretrained_cfg = features.default_cfg = pretrained_cfg_for_features(cfg)
    return features


# -- FX ----------------------------------------------------------------------------------------------------

_FX_REGISTERED = False


def register_fx_leaves() -> None:
    """Register dynconv's layers as leaf modules for timm's FX feature extraction.

    Their forward passes branch on the input (per-sample paths, batch-1 safe norms, top-k gating), so
    ``torch.fx`` keeps them as calls. ``KWConv2d`` is the exception: its cells are parameters of the
    model root (``warehouse_manager.weights``), which a leaf would hide from the traced module, so it is
    traced through (its forward reads the bank as a root parameter, see
    :mod:`dynconv.ops.kernelwarehouse`) while its attention and norms stay leaves.
    """
    global _FX_REGISTERED
    if _FX_REGISTERED:
        return
    from .ops._norm import SafeBatchNorm1d, SafeBatchNorm2d

    # (the SE / CBAM / ECA baselines are timm modules, traceable as they are)
    leaves = [cls for family in registered_families() for cls in family.leaves] + [SafeBatchNorm1d, SafeBatchNorm2d]
    for cls in leaves:
        register_notrace_module(cls)
    _FX_REGISTERED = True


# -- entrypoints -------------------------------------------------------------------------------------------


def _entrypoint(conv: str, arch: str) -> Callable[..., nn.Module]:
    name = timm_name(conv, arch)

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        cfg = resolve_pretrained_cfg(name, kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None))
        cache_dir = kwargs.pop("cache_dir", None)
        kwargs.pop("pretrained_model_args", None)  # the saved arguments are already merged into kwargs
        if pretrained and not cfg.has_weights:
            raise ValueError(
                f"dynconv hosts no weights for {name}; pass checkpoint_path=... to timm.create_model, create it "
                "from a folder written by timm.models.save_for_hf ('local-dir:...'), or load an official "
                "checkpoint with dynconv.import_official"
            )
        features_only = kwargs.pop("features_only", False)
        feature_kwargs = {k: kwargs.pop(k) for k in _FEATURE_ARGS if k in kwargs}
        steps_per_epoch = kwargs.pop("schedule_steps_per_epoch", None)  # the clock goes on the model returned
        model = create_model(arch, conv, **kwargs)
        cfg_dict = cfg.to_dict()
        cfg_dict["first_conv"], cfg_dict["classifier"] = model_layer_names(model, *_base_names(arch))
        model.pretrained_cfg = model.default_cfg = cfg_dict
        if pretrained:
            load_pretrained(model, pretrained_cfg=cfg_dict, num_classes=model.num_classes,
                            in_chans=kwargs.get("in_chans", 3), cache_dir=cache_dir)
        if features_only:
            model = features_model(model, cfg_dict, feature_kwargs)
        return drive_schedules(model, steps_per_epoch) if steps_per_epoch is not None else model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{arch} with {conv} (dynconv.create_model({arch!r}, {conv!r}))."
    return entrypoint


def _base_names(arch: str) -> Tuple[Names, Names]:
    base = timm.get_pretrained_cfg(arch)
    return base.first_conv, base.classifier


def _registered_pairs(families: Optional[List[Family]] = None) -> List[Tuple[str, str]]:
    families = registered_families() if families is None else families
    return [(v.name, arch) for family in families if not family.is_identity for v in family.variants for arch in ARCHS]


# register_model reads the entrypoint module's ``default_cfgs`` (timm's convention for model files).
default_cfgs = generate_default_cfgs({timm_name(c, a): default_cfg(c, a) for c, a in _registered_pairs()})


def register_all(families: Optional[List[Family]] = None) -> List[str]:
    """Register every (variant, arch) of ``families`` (default: every registered one) with timm, the unmodified
    ``static`` backbones excepted; returns the names."""
    pairs = _registered_pairs(families)
    if families is not None:  # registered after import: their configs join timm's registry the same way
        default_cfgs.update(generate_default_cfgs({timm_name(c, a): default_cfg(c, a) for c, a in pairs}))
    names = []
    for conv, arch in pairs:
        fn = _entrypoint(conv, arch)
        globals()[fn.__name__] = fn
        register_model(fn)
        names.append(fn.__name__)
    return names


def _register_new_family(family: Family) -> None:
    REGISTERED.extend(register_all([family]))
    for cls in family.leaves if _FX_REGISTERED else ():
        register_notrace_module(cls)


REGISTERED = register_all()
register_fx_leaves()
on_register(_register_new_family)
