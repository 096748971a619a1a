"""dynconv's models behave like timm's: configs under dynconv's names, heads, features, FX, fresh eval.

Each test fails on the behaviour the issue reported (timm-config architecture ``resnet18``, plain Linear
after ``reset_classifier``, unused warehouses, NaN in a fresh model's eval, KW banks missing from FX).
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.models import get_notrace_functions, get_notrace_modules

import dynconv
from dynconv._timm import REGISTERED, default_cfg
from dynconv.models import FRESH_ATTR
from dynconv.ops.dcd import DCDLinear
from dynconv.ops.kernelwarehouse import KWLinear


def test_registry_configs_carry_dynconv_names():
    for name in REGISTERED:
        cfg = timm.get_pretrained_cfg(name)
        assert cfg is not None and cfg.architecture == name and not cfg.has_weights


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2_050", "convnext_tiny"])
def test_first_conv_and_classifier_name_parameters(arch):
    """timm's default_cfgs test: ``first_conv`` / ``classifier`` + ``.weight`` are state-dict keys; the registry
    config says what the built model says."""
    for conv in dynconv.list_convs():
        if conv == "static":
            continue
        name = dynconv._timm.timm_name(conv, arch)
        if name == "ic_convnext_tiny" or name.startswith("ic_mobilenetv2"):
            continue  # IC-Conv is built on ResNets only (checked by tests/ops/test_icconv.py)
        model = timm.create_model(name, device="meta")
        keys = model.state_dict().keys()
        cfg = model.pretrained_cfg
        assert cfg["architecture"] == name
        for key in ("first_conv", "classifier"):
            names = (cfg[key],) if isinstance(cfg[key], str) else cfg[key]
            assert all(f"{n}.weight" in keys for n in names), (name, key, names)
            assert cfg[key] == getattr(default_cfg(conv, arch), key), (name, key)


@pytest.mark.parametrize("name", ["odconv4x_resnet18", "kw1d2x_mobilenetv2_050"])
def test_save_for_hf_round_trip(tmp_path, name):
    from timm.models import save_for_hf

    model = timm.create_model(name, num_classes=7).eval()
    save_for_hf(model, tmp_path)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert loaded.pretrained_cfg["architecture"] == name
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("feature_cls", ["getter", "list", "dict", "hook", "fx"])
def test_features_only_cfg_and_feature_cls(feature_cls):
    from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet, FeatureListNet
    from timm.models._features_fx import FeatureGraphNet

    expected = {"getter": FeatureGetterNet, "list": FeatureListNet, "dict": FeatureDictNet, "hook": FeatureHookNet,
                "fx": FeatureGraphNet}[feature_cls]
    model = timm.create_model("kw1x_resnet18", features_only=True, feature_cls=feature_cls).eval()
    assert isinstance(model, expected)
    assert resolve_data_config(model=model)["input_size"] == (3, 224, 224)
    banks = [n for n, _ in model.named_parameters() if "warehouse_manager.weights" in n]
    # the shared KW banks stay parameters of the feature model
    assert len(banks) == len(timm.create_model("kw1x_resnet18").warehouse_manager.weights) == 4, banks
    out = model(torch.randn(1, 3, 64, 64))
    assert len(out) == 5


@pytest.mark.parametrize("name", ["kw1d2x_mobilenetv2_100", "dcd_resnet18", "kw1x_resnet18", "dgc_resnet18"])
def test_num_classes_zero(name):
    model = timm.create_model(name, num_classes=0).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, model.num_features)


def test_dcd_reset_classifier_stays_dynamic():
    model = timm.create_model("dcd_resnet18")
    assert isinstance(model.fc, DCDLinear)
    model.reset_classifier(5)
    assert isinstance(model.fc, DCDLinear) and model.fc.out_features == 5
    model.reset_classifier(0)
    assert isinstance(model.fc, torch.nn.Identity)
    plain = timm.create_model("dcd_resnet18", dynamic_classifier=False)
    plain.reset_classifier(5)
    assert type(plain.fc) is torch.nn.Linear


def _all_params_get_grad(model, x):
    model.train()
    out = model(x)
    (out if torch.is_tensor(out) else sum(o.sum() for o in out)).sum().backward()
    return [n for n, p in model.named_parameters() if p.grad is None]


def test_kw_reset_classifier_keeps_every_param_used():
    """The KW 1/2x classifier's warehouse goes with it; a new KW classifier gets its own cells."""
    model = timm.create_model("kw1d2x_mobilenetv2_050")
    banks = len(model.warehouse_manager.weights)
    model.reset_classifier(0)
    assert len(model.warehouse_manager.weights) == banks - 1
    assert not _all_params_get_grad(model, torch.randn(2, 3, 64, 64))
    model.reset_classifier(5)
    assert isinstance(model.classifier, KWLinear) and model.classifier.out_features == 5
    model.zero_grad()
    assert not _all_params_get_grad(model, torch.randn(2, 3, 64, 64))


def test_kw_stage_pruning_drops_unused_warehouses():
    model = timm.create_model("kw1x_resnet18")
    model.prune_intermediate_layers([2])  # up to layer2: the layer3 / layer4 warehouses lose every layer
    assert not _all_params_get_grad(model, torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("name", ["dcd_resnet18", "dgc_resnet18", "dcd_resnet50"])
def test_fresh_model_eval_is_finite(name):
    model = timm.create_model(name).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 224, 224))).all()


def test_loaded_or_trained_norms_use_running_statistics():
    model = timm.create_model("dgc_resnet18")
    other = timm.create_model("dgc_resnet18")
    other.load_state_dict(model.state_dict())
    norms = [m for m in other.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(getattr(m, FRESH_ATTR) for m in norms)
    model.train()
    model(torch.randn(2, 3, 64, 64))
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert not any(getattr(m, FRESH_ATTR) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_fx_feature_extractor_keeps_kw_banks():
    from torchvision.models.feature_extraction import create_feature_extractor

    model = timm.create_model("kw1x_resnet18").eval()
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    fx = create_feature_extractor(copy.deepcopy(model), return_nodes=["layer3", "fc"], tracer_kwargs=tracer_kwargs)
    names = {n for n, _ in fx.named_parameters()}
    assert {f"warehouse_manager.weights.{i}" for i in range(len(model.warehouse_manager.weights))} <= names
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fx(x)["fc"], model(x))
