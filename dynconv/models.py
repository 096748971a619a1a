"""``create_model``: a timm backbone with a conv variant applied the way its paper applied it."""
from __future__ import annotations

import logging
import os
from typing import Any, List, Mapping, Optional, Union

from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import ResNet
from torch import nn

from .archs import ARCHS, DROP_PATH_MODES, create_backbone, list_archs, set_uniform_drop_path
from .fresh_statistics import FRESH_ATTR, use_batch_statistics_until_trained
from .registry import get_family, get_variant
from .schedules import drive_schedules
from .surgery.convert import convert
from .surgery.sites import set_submodule

__all__ = ["ARCHS", "DROP_PATH_MODES", "DynamicHeadMixin", "FRESH_ATTR", "create_model", "family_option_names",
           "list_archs", "set_uniform_drop_path", "use_batch_statistics_until_trained", "use_dynamic_head"]

_logger = logging.getLogger(__name__)


def family_option_names(family: str) -> set:
    """Option names a family accepts (everything else in ``create_model`` goes to timm)."""
    return get_family(family).option_names()


# -- heads that stay dynamic ---------------------------------------------------------------------------------

HEAD_ATTR = "dynconv_head"  # the name of the family whose head this is (see Family.rebuild_classifier)


def _classifier_path(model: nn.Module) -> str:
    classifier = model.get_classifier()
    for name, module in model.named_modules():
        if module is classifier:
            return name
    raise RuntimeError(f"{type(model).__name__}.get_classifier() is not a submodule")


class DynamicHeadMixin:
    """``reset_classifier`` / ``prune_intermediate_layers`` for backbones whose head or shared weights are
    dynconv's own (timm's versions would put back a plain ``nn.Linear`` or leave unused weights behind).

    The new classifier is the family's own again where it has one (:attr:`dynconv.Family.rebuild_classifier`:
    DCD's dynamic classifier, a KernelWarehouse classifier), and KernelWarehouse warehouses that no layer of the
    model uses any more (the old classifier's, the pruned stages') are dropped, so every parameter takes part in
    the forward (DDP without ``find_unused_parameters``).
    """

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, **kwargs: Any) -> None:
        path = _classifier_path(self)
        super().reset_classifier(num_classes, global_pool, **kwargs)
        new = self.get_submodule(path) if path else None
        family = get_family(getattr(self, HEAD_ATTR))
        if isinstance(new, nn.Linear) and family.rebuild_classifier is not None:
            layer = family.rebuild_classifier(self, new)
            if layer is not None:
                set_submodule(self, path, layer.train(new.training).requires_grad_(new.weight.requires_grad))
        self._drop_unused_warehouses()

    def prune_intermediate_layers(self, *args: Any, **kwargs: Any) -> List[int]:
        taken = super().prune_intermediate_layers(*args, **kwargs)
        self._drop_unused_warehouses()
        return taken

    def _drop_unused_warehouses(self) -> None:
        manager = getattr(self, "warehouse_manager", None)
        if manager is not None:
            manager.drop_unused(self)


def _dynamic_head_class(base: type) -> type:
    cls = type(base.__name__, (DynamicHeadMixin, base), {"__module__": __name__})
    cls.__qualname__ = f"_Dynconv{base.__name__}"
    globals()[cls.__qualname__] = cls  # so pickle finds the class by module and qualname
    return cls


_HEAD_CLASSES: Dict[type, type] = {base: _dynamic_head_class(base) for base in (ResNet, EfficientNet, ConvNeXt)}


def use_dynamic_head(model: nn.Module, family: str) -> bool:
    """Give a timm ResNet, MobileNetV2 or ConvNeXt the :class:`DynamicHeadMixin` methods for ``family`` (same
    class name, same state dict); False for other models."""
    if type(model) not in _HEAD_CLASSES:
        return False
    model.__class__ = _HEAD_CLASSES[type(model)]
    setattr(model, HEAD_ATTR, family)
    return True


def create_model(arch: str, conv: str = "static", num_classes: int = 1000,
                 pretrained: Union[None, bool, str, "os.PathLike[str]", Mapping[str, Any]] = None,
                 **overrides: Any) -> nn.Module:
    """Build ``arch`` from timm and apply ``conv`` with the official per-backbone rules.

    Args:
        arch: one of :func:`list_archs`.
        conv: one of :func:`dynconv.list_convs`.
        num_classes: classifier width.
        pretrained: start from the static ``arch``'s weights: a checkpoint path (timm or torchvision state dict,
            or a dynconv ``conv=static`` checkpoint), a state dict, or ``True`` for timm's own weights (needs
            network access). The dynamic layers are initialised from the static kernels so the network starts
            at the static function where the method allows (see :func:`dynconv.pretrained.init_from_static`;
            its report is kept as ``model.pretrained_report``). ``None`` / ``False``: fresh weights.
        **overrides: family options (``kernel_num``, ``reduction``, ``temperature_epochs``,
            ``cell_num_ratio``, ...) override the variant; ``drop_path_mode`` (``"linear"``, timm's ramp
            over the blocks, or ``"uniform"``, every block at ``drop_path_rate``: see
            :func:`set_uniform_drop_path`); ``schedule_steps_per_epoch`` (training batches per epoch: the
            model advances its own schedules, for loops that never call :func:`dynconv.set_progress`; see
            :func:`dynconv.drive_schedules`); anything else goes to ``timm.create_model`` (``drop_rate``,
            ``drop_path_rate``, ``in_chans``, ...).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    drop_path_mode = overrides.pop("drop_path_mode", "linear")
    steps_per_epoch = overrides.pop("schedule_steps_per_epoch", None)
    if drop_path_mode not in DROP_PATH_MODES:
        raise ValueError(f"drop_path_mode={drop_path_mode!r}; choose one of: {', '.join(DROP_PATH_MODES)}")
    variant = get_variant(conv)
    family = get_family(variant.family)
    conv_names = family.option_names()
    conv_options = {k: v for k, v in overrides.items() if k in conv_names}
    timm_kwargs = {k: v for k, v in overrides.items() if k not in conv_names}
    model = create_backbone(arch, num_classes, dynamic=not family.is_identity, drop_path_mode=drop_path_mode,
                            **timm_kwargs)
    if not family.is_identity:
        options = {**family.arch_options(variant, arch), **conv_options}
        convert(model, conv, **options)
        if family.prepare is not None:
            family.prepare(model, options)
    if pretrained is not None and pretrained is not False:
        from .pretrained import init_from_static

        model.pretrained_report = init_from_static(model, pretrained, arch=arch)
        _logger.info("%s", model.pretrained_report)
    if steps_per_epoch is not None:
        drive_schedules(model, steps_per_epoch)
    return model
