"""Starting dynamic models from static weights (``create_model(..., pretrained=...)``).

The reference is always the static model itself: a dynamic layer initialised from a static kernel must
compute what the static layer computes wherever the mapping is exact (an identity of the layer's formula:
softmax weights summing to 1, ``sigmoid(0) = 1/2``, ``hsigmoid(0) = 1``, KernelWarehouse's ``alpha = beta``
at ``tau = 1``), so the whole network's eval-mode logits equal the static ones. float64 makes "to rounding"
mean ~1e-12, far below any real difference.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynconv
from dynconv.checkpoint import CheckpointError
from dynconv.ops._scheduled import schedule_state_keys
from dynconv.ops.icconv import InceptionConv2d
from dynconv.ops.kernelwarehouse import KWConv2d
from dynconv.ops.odconv import ODConv2d
from dynconv.pretrained import init_from_static
from dynconv.surgery import convert

CLASSES = 10


def _randomise_norms(model: nn.Module, seed: int) -> nn.Module:
    """Trained-looking BatchNorms (a fresh model's mean 0 / var 1 / weight 1 would hide scale errors)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.num_batches_tracked.fill_(100)
    return model


@pytest.fixture(scope="module")
def static_files(tmp_path_factory) -> dict:
    """``arch -> (path of the static state dict, the static model in float64 eval mode)``."""
    out = {}
    root = tmp_path_factory.mktemp("static")
    for i, arch in enumerate(("resnet18", "mobilenetv2_050", "convnext_tiny")):
        torch.manual_seed(i)
        static = _randomise_norms(dynconv.create_model(arch, "static", num_classes=CLASSES), i)
        path = root / f"{arch}.pth"
        torch.save(static.state_dict(), path)
        out[arch] = (path, static.double().eval())
    return out


def _converted(arch: str, conv: str, path: Path, **options) -> nn.Module:
    torch.manual_seed(1)
    model = dynconv.create_model(arch, conv, num_classes=CLASSES, **options).double()
    model.report = init_from_static(model, path)
    return model.eval()


def _input(arch: str) -> torch.Tensor:
    size = 32 if arch == "convnext_tiny" else 48
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


EXACT = [
    ("resnet18", "static"),
    ("resnet18", "dyconv_4x"),
    ("resnet18", "condconv_8x"),
    ("resnet18", "odconv_1x"),
    ("resnet18", "odconv_4x"),
    ("resnet18", "dcd"),
    ("resnet18", "dgc"),
    ("resnet18", "kw_1x"),
    ("resnet18", "kw_4x"),
    ("resnet18", "fdconv"),
    ("mobilenetv2_050", "dyconv_4x"),
    ("mobilenetv2_050", "odconv_4x"),
    ("mobilenetv2_050", "dcd"),
    ("mobilenetv2_050", "kw_1x"),
    ("mobilenetv2_050", "fdconv"),
    ("convnext_tiny", "kw_1x"),
]


@pytest.mark.parametrize("arch,conv", EXACT)
def test_exact_families_reproduce_static_logits(static_files, arch, conv):
    path, static = static_files[arch]
    model = _converted(arch, conv, path)
    x = _input(arch)
    with torch.no_grad():
        expected, got = static(x), model(x)
    assert model.report.exactness in ("exact", "exact to rounding", "eval mode only"), str(model.report)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
    assert expected.abs().max() > 0.1  # the comparison is not between two near-zero outputs


def test_odconv_exact_at_every_temperature(static_files):
    """sigmoid(0 / T) = 1/2 for every T, and identical kernels make the softmax weights irrelevant."""
    path, static = static_files["resnet18"]
    model = _converted("resnet18", "odconv_4x", path)
    x = _input("resnet18")
    for epoch in (0.0, 3.0, 100.0):
        dynconv.set_progress(model, epoch)
        with torch.no_grad():
            torch.testing.assert_close(model(x), static(x), rtol=0, atol=1e-9)


@pytest.mark.parametrize("conv,options", [("kw_1x", {}), ("kw_4x", {}), ("kw_1x", {"nonlocal_basis_ratio": 0.5})])
def test_kw_keeps_the_static_kernels_along_the_tau_ramp(static_files, conv, options):
    """The converted attention starts at logits ``c beta`` for every input (``pretrained.KW_START_LOGIT``), so
    each layer assembles ``W ((1 - tau) c / (c + 1e-3) + tau)`` at every tau: exact at tau = 1 (progress 0),
    within 1e-4 relative at tau = 0. With the official random attention init, a converted model fell to chance
    by tau = 0.9 (results/finetune_static_demo.md)."""
    from dynconv.families.kernelwarehouse import KW_START_LOGIT as c

    path, static = static_files["resnet18"]
    model = _converted("resnet18", conv, path, **options)
    assert any(m.fc3 is not None for m in model.modules() if hasattr(m, "fc3")) == bool(options)
    for epoch, tau in ((0.0, 1.0), (10.0, 0.5), (1000.0, 0.0)):  # the 20-epoch tau schedule
        dynconv.set_progress(model, epoch)
        factor = (1 - tau) * c / (c + 1e-3) + tau
        for name in ("layer1.0.conv1", "layer3.1.conv2", "layer4.0.downsample.0"):
            layer = model.get_submodule(name)
            want = static.get_submodule(name).weight
            with torch.no_grad():
                x = torch.randn(2, layer.in_channels, 8, 8, dtype=torch.float64)
                kernels = layer.kernel(layer.attention(x))
            for kernel in kernels:
                torch.testing.assert_close(kernel, want * factor, rtol=1e-12, atol=1e-15)
    x = _input("resnet18")
    with torch.no_grad():  # tau = 0: the network is still the static one to well within a logit's rounding of 1e-3
        assert (model(x) - static(x)).abs().max() < 1e-2


def test_kw_below_1x_keeps_the_owned_blocks(static_files):
    """Budget 1/2x: at tau = 1 each layer's kernel is the static kernel on the blocks whose mixture owns a
    cell and zero on the others (official ``Warehouse_Manager.allocate`` assignment); reported as such."""
    path, static = static_files["resnet18"]
    model = _converted("resnet18", "kw_1d2x", path)
    assert model.report.exactness == "not preserved"
    assert any("zero cell" in note for note in model.report.notes)
    layer = model.get_submodule("layer2.0.conv1")
    assert isinstance(layer, KWConv2d)
    want = static.get_submodule("layer2.0.conv1").weight
    with torch.no_grad():
        kernel = layer.kernel(layer.attention(torch.randn(1, layer.in_channels, 8, 8, dtype=torch.float64)))[0]
    kept = kernel != 0
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(kernel[kept], want[kept], rtol=0, atol=0)


def test_icconv_exact_on_static_dilation_channels(static_files):
    """A 3x3 kernel maps exactly only to the output channels that keep dilation 1."""
    path, static = static_files["resnet18"]
    model = _converted("resnet18", "icconv", path)
    assert model.report.exactness == "not preserved"
    name, layer = next((n, m) for n, m in model.named_modules()
                       if isinstance(m, InceptionConv2d) and (1, 1) in m.dilations and len(m.members) > 1)
    conv = static.get_submodule(name)
    x = torch.randn(2, layer.in_channels, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        got, want = layer(x), conv(x)
    for member in layer.members:
        rows = slice(member.start, member.stop)
        if member.dilation == (1, 1):
            torch.testing.assert_close(got[:, rows], want[:, rows], rtol=0, atol=1e-12)
        else:
            assert (got[:, rows] - want[:, rows]).abs().max() > 1e-6


def test_attention_baselines_not_preserved_but_backbone_copied(static_files):
    path, static = static_files["resnet18"]
    model = _converted("resnet18", "se", path)
    report = model.report
    assert report.exactness == "not preserved"
    assert set(report.copied) == set(static.state_dict())
    assert report.new and set(report.new) == set(model.state_dict()) - set(static.state_dict())


def test_report_accounts_for_every_tensor(static_files):
    """copied / mapped / adjusted / new (+ schedule state) partition the model's state dict, and the copied
    keys are exactly the static keys outside the layers that surgery replaced."""
    path, static = static_files["resnet18"]
    model = _converted("resnet18", "odconv_4x", path)
    report = model.report
    reference = dynconv.create_model("resnet18", "static", num_classes=CLASSES)
    replaced = [name for name, _ in convert(reference, "odconv_4x").replaced]
    outside = {k for k in static.state_dict() if not any(k.startswith(p + ".") for p in replaced)}
    assert set(report.copied) == outside
    parts = [set(report.copied), set(report.mapped), set(report.adjusted), set(report.new),
             schedule_state_keys(model)]
    assert sum(len(p) for p in parts) == len(set().union(*parts))
    assert set().union(*parts) == set(model.state_dict())
    odconv = [m for m in model.modules() if isinstance(m, ODConv2d)]
    assert len(odconv) == len(replaced)
    heads = sum((m.attention.channel_fc is not None) + (m.attention.filter_fc is not None)
                + (m.attention.spatial_fc is not None) for m in odconv)
    assert len(report.adjusted) == 2 * heads
    assert "copied" in str(report) and "exact" in str(report)


def test_condconv_experts_differ_and_routing_learns(static_files):
    """The zero-sum perturbation breaks the experts' symmetry while their 1/2-weighted sum stays W."""
    path, static = static_files["resnet18"]
    model = _converted("resnet18", "condconv_8x", path)
    layer = model.get_submodule("layer1.0.conv1")
    assert (layer.weight[0] - layer.weight[1]).abs().max() > 0
    torch.testing.assert_close(0.5 * layer.weight.sum(0), static.get_submodule("layer1.0.conv1").weight,
                               rtol=0, atol=1e-12)
    model.train()
    model(_input("resnet18")[:, :, :32, :32]).sum().backward()
    grad = layer.routing.weight.grad
    assert grad is not None and (grad[0] - grad[1]).abs().max() > 0


def test_classifier_of_another_width_left_fresh(static_files):
    path, static = static_files["resnet18"]
    torch.manual_seed(0)
    model = dynconv.create_model("resnet18", "dyconv_4x", num_classes=5).double()
    report = init_from_static(model, path)
    assert sorted(report.dropped) == ["fc.bias", "fc.weight"]
    assert {"fc.weight", "fc.bias"} <= set(report.new)
    x = _input("resnet18")
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(x), static.forward_features(x), rtol=0, atol=1e-9)


def test_create_model_pretrained_float32(static_files):
    path, static = static_files["resnet18"]
    model = dynconv.create_model("resnet18", "dcd", num_classes=CLASSES, pretrained=str(path)).eval()
    assert "copied" in str(model.pretrained_report)
    x = _input("resnet18")
    with torch.no_grad():
        torch.testing.assert_close(model(x.float()).double(), static(x), rtol=0, atol=1e-4)


def test_torchvision_resnet18_state_dict(tmp_path):
    """A torchvision file (same module names as dynconv's ResNets); the reference is torchvision's forward."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(3)
    tv = _randomise_norms(torchvision.models.resnet18(num_classes=CLASSES), 3).eval()
    path = tmp_path / "tv_resnet18.pth"
    torch.save(tv.state_dict(), path)
    model = dynconv.create_model("resnet18", "odconv_4x", num_classes=CLASSES, pretrained=path).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x), rtol=1e-4, atol=1e-4)


def test_another_arch_refused(static_files):
    path, _ = static_files["resnet18"]
    model = dynconv.create_model("mobilenetv2_050", "odconv_4x", num_classes=CLASSES)
    with pytest.raises(CheckpointError, match=r"(?s)does not fit mobilenetv2_050 conv=static.*bn1.weight: "
                                              r"checkpoint \[64\] vs model \[16\]") as info:
        init_from_static(model, path)
    assert str(path) in str(info.value)


def test_trained_dynamic_checkpoint_refused(tmp_path, static_files):
    """A dynconv checkpoint of a dynamic run is not a static checkpoint (its meta says so)."""
    state = dynconv.create_model("resnet18", "odconv_1x", num_classes=CLASSES).state_dict()
    path = tmp_path / "run.pt"
    torch.save({"model": state, "meta": {"arch": "resnet18", "conv": "odconv_1x", "num_classes": CLASSES}}, path)
    with pytest.raises(CheckpointError, match="conv"):
        dynconv.create_model("resnet18", "odconv_1x", num_classes=CLASSES, pretrained=path)


def test_pretrained_true_offline_message(monkeypatch):
    """``pretrained=True`` is timm's own weights; where they cannot be fetched the error says what to do."""
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    model = dynconv.create_model("resnet18", "dyconv_4x", num_classes=CLASSES)
    with pytest.raises(RuntimeError, match=r"pretrained=True.*resnet18.*OSError.*pretrained=PATH"):
        init_from_static(model, True)


def test_dgc_train_mode_departs(static_files):
    """DGC's own pre-activation BatchNorm normalises with batch statistics in training mode, which the
    static ResNet does not do: eval-mode exactness only (documented)."""
    path, static = static_files["resnet18"]
    model = _converted("resnet18", "dgc", path)
    assert model.report.exactness == "eval mode only"
    layer = model.get_submodule("layer1.0.conv1")
    x = F.relu(torch.randn(4, layer.in_channels, 8, 8, dtype=torch.float64)) * 3 + 1
    conv = static.get_submodule("layer1.0.conv1")
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), conv(x), rtol=0, atol=1e-9)
        assert (layer.train()(x) - conv(x)).abs().max() > 1e-3


def test_hydra_model_pretrained(static_files, tmp_path):
    """``train.py model.pretrained=PATH``: composed, validated, and built by the engine's build_model."""
    from test_configs import load

    from dynconv.engine.builders import build_model
    from dynconv.engine.config import validate

    path, static = static_files["resnet18"]
    cfg = load(["model=resnet18", "conv=odconv_1x", f"model.pretrained={path}"])
    validate(cfg)
    model = build_model(cfg.model, cfg.conv, num_classes=CLASSES).eval()
    x = _input("resnet18").float()
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), static(x.double()), rtol=0, atol=1e-4)
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(ValueError, match=f"^model.pretrained={missing}: no such file"):
        validate(load([f"model.pretrained={missing}"]))


@pytest.mark.parametrize("conv", ["odconv_4x", "dcd", "kw_1x", "fdconv"])
def test_exact_in_training_mode_too(static_files, conv):
    """The attention BatchNorms only feed heads that start constant (or, for KW at tau = 1, are not read),
    so batch-statistics BatchNorms give the same training-mode output as the static network."""
    import copy

    path, static = static_files["resnet18"]
    static = copy.deepcopy(static).train()  # the fixture's model is shared: its statistics must not move
    model = _converted("resnet18", conv, path).train()
    x = _input("resnet18")[:, :, :32, :32]
    with torch.no_grad():
        torch.testing.assert_close(model(x), static(x), rtol=0, atol=1e-9)


def test_detection_backbone_from_static_weights(static_files):
    """``DynamicBackbone(arch, conv, pretrained=PATH)`` (the option goes to create_model): the feature levels
    equal the static network's; the checkpoint's 10-class classifier is dropped with the head."""
    from dynconv.detection.backbone import DynamicBackbone

    path, static = static_files["resnet18"]
    backbone = DynamicBackbone("resnet18", "odconv_4x", pretrained=path).eval()
    assert backbone.body.pretrained_report.dropped == ["fc.weight", "fc.bias"]
    x = _input("resnet18")
    with torch.no_grad():
        got = list(backbone(x.float()).values())
        want = static.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=0, atol=1e-4)


def test_detection_task_model_pretrained(static_files):
    """``train.py task=detection model.pretrained=PATH``: the engine's detector gets a backbone from the static file."""
    from test_configs import load

    from dynconv.engine.config import validate
    from dynconv.engine.tasks.detection import build_detector

    path, static = static_files["resnet18"]
    cfg = load(["task=detection", "detector=faster_rcnn", "data=synthetic_coco", "model=resnet18", "conv=odconv_4x",
                f"model.pretrained={path}"])
    validate(cfg)
    body = build_detector(cfg, num_classes=6).backbone.body.body
    assert body.pretrained_report.dropped == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(body.conv1.weight.double(), static.conv1.weight, rtol=0, atol=0)
