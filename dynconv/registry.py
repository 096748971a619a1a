"""Conv families and the variants users name on the command line (``conv=odconv_4x``).

A :class:`Family` is everything dynconv knows about one method, declared in one place (for the built-in
methods, one file of :mod:`dynconv.families`): its layer classes, which convolutions of each backbone it makes
dynamic, the named variants it offers, how option names translate into schedules, per-arch defaults of the
official configs, and, where the method has them, its official checkpoint layout and how its layers start from
a static kernel. ``create_model``, ``convert``, the timm registration, the Hydra ``conv`` group, checkpoint import
and the results tables ask this registry; none of them names a family.

A researcher's own method registers the same way (``examples/custom_family/``)::

    register_family(Family("weightnet", layers=(WeightNetConv2d,), variants=(Variant("weightnet", {"m": 4}),)))
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import nn

# A replacement rule: does this site (a ``dynconv.surgery.sites.ConvSite``) become dynamic?
SiteRule = Callable[[Any], bool]
# A placement: ``(model, sites, backbone, options) -> [(module path, new type name)]``.
Converter = Callable[[nn.Module, List[Any], str, Dict[str, Any]], List[Tuple[str, str]]]


@dataclass(frozen=True)
class ConvVariant:
    """A named configuration of one conv family.

    Attributes:
        name: the public name, e.g. ``odconv_4x``.
        options: the family options that define the variant (overridable per call).
        summary: one line for listings.
        timm_name: prefix of its timm model names when not the name without underscores.
        family: the family's name (filled in by :func:`register_family`).
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""
    timm_name: str = ""
    family: str = ""

    @property
    def timm_prefix(self) -> str:
        """Prefix of the timm model names: ``odconv_4x`` -> ``odconv4x`` (``odconv4x_resnet18``);
        ``icconv`` -> ``ic`` (``ic_resnet50``, the official IC-Conv model names)."""
        return self.timm_name or self.name.replace("_", "")


Variant = ConvVariant


@dataclass(frozen=True)
class Family:
    """One conv method, as every part of dynconv sees it.

    Attributes:
        name: the family name (``odconv``).
        layers: the module classes the family puts into a model; the first is the one ``convert`` builds with
            ``from_conv`` when no ``placement`` is given. Their constructor arguments beyond ``nn.Conv2d``'s are
            the family's options.
        variants: the named configurations users pick (``conv=<name>``), in table order.
        rules: per backbone kind (``resnet``, ``mobilenetv2``, ``convnext``, ``generic``), which sites become
            dynamic (see :mod:`dynconv.surgery.rules`). A backbone without a rule is left static.
        placement: replaces the per-site rule when a family places its layers itself (KernelWarehouse's
            warehouse plans, DCD's per-layer shapes, residual attention).
        options: option names the placement takes on top of the layer constructor's.
        layer_options: whether the first layer's constructor arguments (beyond ``nn.Conv2d``'s) are options too
            (False where the placement builds the layers from its own options, as KernelWarehouse's does).
        schedules: ``{option: (layer argument, schedule factory)}``: an option given in epochs becomes the
            layer's schedule, e.g. ``temperature_epochs -> temperature=attention_temperature(epochs)``.
        arch_defaults: ``((variant name or "*", arch prefix, options), ...)``: what the official configs set
            for that backbone (family-wide entries first, then the variant's).
        prepare: called as ``prepare(model, options)`` after :func:`dynconv.create_model` converted the model
            (dynamic classifier heads, fresh BatchNorm statistics).
        rebuild_classifier: ``(model, new_linear) -> module or None``: the family's classifier for a model whose
            ``reset_classifier`` just put a plain Linear (None keeps the Linear).
        official_layout: ``(model, backbone) -> dynconv.official.Layout``: how the official code names this
            family's checkpoints; None if there is no official code to exchange checkpoints with.
        official_repo: where that code lives, for messages (``OSVAI/ODConv``).
        from_static: ``{layer class: mapper}``: how a layer starts from a static kernel
            (see :func:`dynconv.pretrained.init_from_static`).
        timm_names: ``(variant, arch, first_conv, classifier) -> (first_conv, classifier)``: timm config names
            of the converted model's stem and classifier when the family changes which parameters carry them.
        width_layers: ``{layer class: path -> names}``: the parameters that carry a built layer's width, for the
            same timm config names.
        fx_leaves: classes kept whole by ``torch.fx`` (default: ``layers``).
        task_defaults: ``(arch, task) -> options``: what the official models of a downstream task (``detection``,
            ``segmentation``) set on ``arch`` (IC-Conv's per-task pattern files).
        paper: the citation, for listings.
    """

    name: str
    layers: Tuple[type, ...] = ()
    variants: Tuple[ConvVariant, ...] = ()
    rules: Mapping[str, SiteRule] = field(default_factory=dict)
    placement: Optional[Converter] = None
    options: Tuple[str, ...] = ()
    layer_options: bool = True
    schedules: Mapping[str, Tuple[str, Callable[[float], Any]]] = field(default_factory=dict)
    arch_defaults: Tuple[Tuple[str, str, Mapping[str, Any]], ...] = ()
    prepare: Optional[Callable[[nn.Module, Dict[str, Any]], None]] = None
    rebuild_classifier: Optional[Callable[[nn.Module, nn.Linear], Optional[nn.Module]]] = None
    official_layout: Optional[Callable[[nn.Module, str], Any]] = None
    official_repo: str = ""
    from_static: Mapping[type, Callable[..., None]] = field(default_factory=dict)
    timm_names: Optional[Callable[[ConvVariant, str, Any, Any], Tuple[Any, Any]]] = None
    width_layers: Mapping[type, Callable[[str], Any]] = field(default_factory=dict)
    fx_leaves: Optional[Tuple[type, ...]] = None
    task_defaults: Optional[Callable[[str, str], Dict[str, Any]]] = None
    paper: str = ""

    def option_names(self) -> set:
        """Option names the family accepts (everything else in ``create_model`` goes to timm)."""
        conv_args = set(inspect.signature(nn.Conv2d.__init__).parameters)
        names = set(self.options) | set(self.schedules)
        if self.layer_options:
            for layer in self.layers[:1]:
                names |= set(inspect.signature(layer.__init__).parameters) - conv_args
        return names

    def arch_options(self, variant: ConvVariant, arch: str) -> Dict[str, Any]:
        """The official configs' defaults of ``variant`` on ``arch``."""
        out: Dict[str, Any] = {}
        for key in ("*", variant.name):
            for name, prefix, options in self.arch_defaults:
                if name == key and arch.startswith(prefix):
                    out.update(options)
        return out

    def translate_options(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        """``options`` with the epoch-valued ones turned into the schedules the layers take."""
        out = dict(options)
        for option, (argument, factory) in self.schedules.items():
            if option in out:
                out[argument] = factory(out.pop(option))
        return out

    @property
    def is_identity(self) -> bool:
        """The family changes nothing (``static``): no layer and no placement."""
        return not self.layers and self.placement is None

    @property
    def leaves(self) -> Tuple[type, ...]:
        """The classes ``torch.fx`` keeps whole."""
        return self.layers if self.fx_leaves is None else self.fx_leaves


_FAMILIES: Dict[str, Family] = {}
_VARIANTS: Dict[str, ConvVariant] = {}
_LISTENERS: List[Callable[[Family], None]] = []


def register_family(family: Family, *, replace_existing: bool = False) -> Family:
    """Add ``family`` and its variants to the registry; a family's module calls it once, at import.

    Raises if the family or one of its variant names is taken (``replace_existing=True`` re-registers a family
    of the same name, e.g. when a notebook re-runs the cell that defines it). Returns the family as stored, its
    variants carrying its name.
    """
    if not family.name or not family.variants:
        raise ValueError(f"family {family.name!r} needs a name and at least one variant")
    old = _FAMILIES.get(family.name)
    if old is not None and not replace_existing:
        raise ValueError(f"conv family {family.name!r} is already registered; pass replace_existing=True to replace it")
    owned = {v.name for v in old.variants} if old is not None else set()
    variants = tuple(replace(v, family=family.name, options=MappingProxyType(dict(v.options))) for v in family.variants)
    for v in variants:
        if v.name in _VARIANTS and v.name not in owned:
            raise ValueError(f"conv variant {v.name!r} already belongs to family {_VARIANTS[v.name].family!r}")
    family = replace(family, variants=variants)
    for name in owned:
        _VARIANTS.pop(name, None)
    _FAMILIES[family.name] = family
    _VARIANTS.update({v.name: v for v in variants})
    for listener in _LISTENERS:
        listener(family)
    return family


def on_register(listener: Callable[[Family], None]) -> None:
    """Call ``listener(family)`` for every family registered from now on (the timm registration uses it)."""
    _LISTENERS.append(listener)


def list_families() -> List[str]:
    """Names of the registered conv families, in registration (table) order."""
    return list(_FAMILIES)


def get_family(name: str) -> Family:
    """The family called ``name``; an unknown name raises with the registered ones."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown conv family {name!r}; registered: {', '.join(_FAMILIES)}") from None


def list_convs() -> List[str]:
    """Names of every conv variant, in table order."""
    return list(_VARIANTS)


def get_variant(name: str) -> ConvVariant:
    """The variant called ``name``; an unknown name raises with the list of valid ones."""
    try:
        return _VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown conv variant {name!r}; choose one of: {', '.join(_VARIANTS)}") from None


def family_of(conv: str) -> Family:
    """The family of the variant called ``conv``."""
    return _FAMILIES[get_variant(conv).family]


def variant_from_timm_prefix(prefix: str) -> ConvVariant:
    for v in _VARIANTS.values():
        if v.timm_prefix == prefix:
            return v
    raise ValueError(f"no conv variant has the timm prefix {prefix!r}")


def family_with_layer(layer: type) -> Optional[Family]:
    """The family one of whose ``layers`` is ``layer`` or a base class of it."""
    for family in _FAMILIES.values():
        if any(issubclass(layer, cls) for cls in family.layers):
            return family
    return None


def families_with(attribute: str) -> Sequence[Family]:
    """Registered families whose ``attribute`` is set (e.g. ``official_layout``)."""
    return [f for f in _FAMILIES.values() if getattr(f, attribute)]


def registered_families() -> List[Family]:
    """The registered :class:`Family` records, in registration order."""
    return list(_FAMILIES.values())


def load_family_module(spec: str) -> ModuleType:
    """Import the module that registers a family defined outside dynconv: a ``.py`` file path (relative to the
    working directory) or a dotted module name. A file is imported once per process, whatever path names it."""
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"conv.module: no Python file {spec!r} (looked at {path})")
        name = f"dynconv_family_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        if name in sys.modules:
            return sys.modules[name]
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # before running it: pickles of its classes find it by this name
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as err:
        raise ValueError(f"conv.module: cannot import {spec!r} ({err})") from None
