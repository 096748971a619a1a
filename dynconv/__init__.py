"""dynconv: dynamic convolutions (CondConv, DY-Conv, ODConv, KernelWarehouse, ...) as drop-in layers
on timm backbones, with the papers' layer rules, schedules and parameter counts.

Importing the package registers every (variant, arch) pair with timm (``odconv4x_resnet18``).
"""
from .registry import (ConvVariant, Family, Variant, get_family, get_variant, list_convs, list_families,
                       load_family_module, register_family)
from . import families  # noqa: F401,E402  (registers the built-in conv families, in table order)
from . import _timm  # noqa: F401,E402  (registers the timm entrypoints)
from .auxiliary import auxiliary_loss
from .deploy import deploy
from .accounting import count_macs, count_params, macs_breakdown
from .models import ARCHS, create_model, list_archs
from .official import ImportReport, export_official, import_official
from .pretrained import PretrainedReport, init_from_static
from .schedules import UndrivenScheduleWarning, drive_schedules, set_progress
from .surgery import ConvertReport, convert

from ._version import __version__  # noqa: E402

__all__ = [
    "ARCHS",
    "ConvVariant",
    "ConvertReport",
    "Family",
    "ImportReport",
    "PretrainedReport",
    "UndrivenScheduleWarning",
    "Variant",
    "auxiliary_loss",
    "convert",
    "count_macs",
    "count_params",
    "create_model",
    "deploy",
    "drive_schedules",
    "export_official",
    "get_family",
    "get_variant",
    "import_official",
    "init_from_static",
    "list_archs",
    "list_convs",
    "list_families",
    "load_family_module",
    "macs_breakdown",
    "register_family",
    "set_progress",
]
