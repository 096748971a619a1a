"""timm's own model tests (``tests/test_models.py`` of huggingface/pytorch-image-models) on dynconv's models.

The file is not in the timm wheel; ``make test`` extracts it from the timm sdist of the pinned version
into ``.cache/timm_tests/timm_test_models.py`` (Makefile target ``$(TIMM_TESTS)``). Its test functions
take a model name and build it with ``timm.create_model``, so they run unchanged on the names dynconv
registers: every family on ResNet18 and on one non-ResNet backbone (MobileNetV2 0.5; KernelWarehouse
1/2x there, whose classifier is a KW layer). The timm file is imported, never edited.

Not run, as timm's own lists exclude them for dynconv's layers (see the README, "timm"):
``test_model_forward_torchscript`` (dynconv's dynamic layers are not scriptable) and the pretrained-weight
tests (dynconv hosts no weights).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import dynconv  # noqa: F401  (registers the models with timm)

TIMM_TESTS = Path(__file__).resolve().parents[1] / ".cache" / "timm_tests" / "timm_test_models.py"

RESNET = ["se_resnet18", "condconv8x_resnet18", "dyconv4x_resnet18", "dcd_resnet18", "odconv4x_resnet18",
          "kw1x_resnet18", "dgc_resnet18", "ic_resnet18", "fdconv_resnet18"]
OTHER = ["se_mobilenetv2_050", "condconv8x_mobilenetv2_050", "dyconv4x_mobilenetv2_050", "dcd_mobilenetv2_050",
         "odconv4x_mobilenetv2_050", "kw1d2x_mobilenetv2_050", "dgc_mobilenetv2_050", "fdconv_mobilenetv2_050"]
MODELS = RESNET + [pytest.param(name, marks=pytest.mark.slow) for name in OTHER]


def _load_timm_tests():
    if not TIMM_TESTS.exists():
        return None
    spec = importlib.util.spec_from_file_location("timm_test_models", TIMM_TESTS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


T = _load_timm_tests()


@pytest.fixture
def timm_tests():
    if T is None:
        pytest.fail(f"{TIMM_TESTS} is missing: run `make test` (or `make {TIMM_TESTS.relative_to(TIMM_TESTS.parents[2])}`), "
                    "which extracts timm's tests/test_models.py from the timm sdist")
    return T


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward(timm_tests, model_name):
    timm_tests.test_model_forward(model_name, 1)


@pytest.mark.parametrize("model_name", MODELS)
def test_model_backward(timm_tests, model_name):
    timm_tests.test_model_backward(model_name, 2)


@pytest.mark.parametrize("model_name", MODELS)
def test_model_default_cfgs(timm_tests, model_name):
    timm_tests.test_model_default_cfgs(model_name, 1, "meta" if timm_tests._HAS_DEVICE_CONTEXT else "cpu")


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_features(timm_tests, model_name):
    timm_tests.test_model_forward_features(model_name, 1)


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_intermediates_features(timm_tests, model_name):
    timm_tests.test_model_forward_intermediates_features(model_name, 1)


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_intermediates(timm_tests, model_name):
    timm_tests.test_model_forward_intermediates(model_name, 1)


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_fx(timm_tests, model_name):
    timm_tests.test_model_forward_fx(model_name, 1)


@pytest.mark.parametrize("model_name", MODELS)
def test_model_backward_fx(timm_tests, model_name):
    timm_tests.test_model_backward_fx(model_name, 2)


@pytest.mark.parametrize("model_name", MODELS)
def test_prune_intermediate_layers_params_used(timm_tests, model_name):
    timm_tests.test_prune_intermediate_layers_params_used(model_name)


def test_suite_covers_every_family():
    """Every non-static family has a ResNet18 and a non-ResNet model above (IC-Conv exists on ResNets only)."""
    from dynconv.registry import get_variant, list_convs, variant_from_timm_prefix

    def family(name: str) -> str:
        return variant_from_timm_prefix(name.split("_")[0]).family

    families = {get_variant(c).family for c in list_convs()} - {"static"}
    assert {family(n) for n in RESNET} == families
    assert {family(n) for n in OTHER} == families - {"icconv"}
