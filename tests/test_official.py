"""Official ODConv / KernelWarehouse checkpoints: names, shapes, strict loading, round trips.

The expected official key lists below are written from the official model definitions
(OSVAI/ODConv ``models/od_resnet.py``, ``models/od_mobilenetv2.py``; OSVAI/KernelWarehouse
``models/kw_resnet.py``, ``models/kw_mobilenetv2.py``), independently of ``dynconv.official``.
"""
from __future__ import annotations

import argparse
import json
from typing import Callable, Dict, Tuple

import pytest
import torch

import dynconv
from dynconv.ops._routing import schedule_state_keys
from dynconv.official import export_official, import_official

Shapes = Dict[str, Tuple[int, ...]]
X = (2, 3, 32, 32)


# ------------------------------------------------------------------ helpers


def _build(arch: str, conv: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = dynconv.create_model(arch, conv, **kw).eval()
    with torch.no_grad():  # non-trivial BN statistics, so buffers are checked too
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
            elif name.endswith("num_batches_tracked"):
                buf.fill_(seed + 7)
    return model


def _state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _logits(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(123)
    x = torch.randn(*X)
    with torch.no_grad():
        return model(x)


def _bn(prefix: str, c: int) -> Shapes:
    out = {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")}
    out[f"{prefix}.num_batches_tracked"] = ()
    return out


def _odconv(prefix: str, cin: int, cout: int, k: int, n: int, groups: int = 1) -> Shapes:
    """Keys of one official ODConv2d (modules/odconv.py)."""
    a = max(int(cin * 0.0625), 16)
    out = {f"{prefix}.weight": (n, cout, cin // groups, k, k), f"{prefix}.attention.fc.weight": (a, cin, 1, 1)}
    out.update(_bn(f"{prefix}.attention.bn", a))
    heads = {"channel_fc": cin}
    if not cin == groups == cout:
        heads["filter_fc"] = cout
    if k > 1:
        heads["spatial_fc"] = k * k
    if n > 1:
        heads["kernel_fc"] = n
    for head, width in heads.items():
        out[f"{prefix}.attention.{head}.weight"] = (width, a, 1, 1)
        out[f"{prefix}.attention.{head}.bias"] = (width,)
    return out


def _resnet18(layer: Callable[[str, int, int], Shapes], head: Shapes) -> Shapes:
    """Keys of an official ResNet18 (torchvision layout) whose block convs are ``layer(prefix, cin, cout)``."""
    out: Shapes = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    inplanes = 64
    for s, planes in enumerate((64, 128, 256, 512)):
        for b in range(2):
            p = f"layer{s + 1}.{b}"
            cin = inplanes if b == 0 else planes
            out.update(layer(f"{p}.conv1", cin, planes))
            out.update(_bn(f"{p}.bn1", planes))
            out.update(layer(f"{p}.conv2", planes, planes))
            out.update(_bn(f"{p}.bn2", planes))
            if b == 0 and s > 0:
                out[f"{p}.downsample.0.weight"] = (planes, inplanes, 1, 1)
                out.update(_bn(f"{p}.downsample.1", planes))
        inplanes = planes
    out.update(head)
    return out


def _od_resnet18(n: int) -> Shapes:
    return _resnet18(lambda p, cin, cout: _odconv(p, cin, cout, 3, n), {"fc.weight": (1000, 512), "fc.bias": (1000,)})


_MBV2_SETTING = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]


def _od_mobilenetv2_100(n: int) -> Shapes:
    """od_mobilenetv2_100: static stem, ODConv in every block conv and the last 1x1, classifier.1."""
    out: Shapes = {"features.0.0.weight": (32, 3, 3, 3), **_bn("features.0.1", 32)}
    cin, idx = 32, 1
    for t, c, reps in _MBV2_SETTING:
        for _ in range(reps):
            p, hidden, j = f"features.{idx}.conv", cin * t, 0
            if t != 1:
                out.update(_odconv(f"{p}.0.0", cin, hidden, 1, n))
                out.update(_bn(f"{p}.0.1", hidden))
                j = 1
            out.update(_odconv(f"{p}.{j}.0", hidden, hidden, 3, n, groups=hidden))
            out.update(_bn(f"{p}.{j}.1", hidden))
            out.update(_odconv(f"{p}.{j + 1}", hidden, c, 1, n))
            out.update(_bn(f"{p}.{j + 2}", c))
            cin, idx = c, idx + 1
    out.update(_odconv(f"features.{idx}.0", cin, 1280, 1, n))
    out.update(_bn(f"features.{idx}.1", 1280))
    out.update({"classifier.1.weight": (1000, 1280), "classifier.1.bias": (1000,)})
    return out


def _shapes(state: Dict[str, torch.Tensor], prefix: str = "") -> Shapes:
    return {k[len(prefix):]: tuple(v.shape) for k, v in state.items()}


def _random_official(shapes: Shapes) -> Dict[str, torch.Tensor]:
    out = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(5)
        elif k.endswith("running_var"):
            out[k] = torch.rand(shape) + 0.5
        else:
            out[k] = torch.randn(shape)
    return out


# ------------------------------------------------------------------ fixtures (models are slow to build)


@pytest.fixture(scope="module")
def od_r18():
    return _build("resnet18", "odconv_4x", seed=1)


@pytest.fixture(scope="module")
def od_mbv2():
    return _build("mobilenetv2_100", "odconv_4x", seed=1)


# ------------------------------------------------------------------ official names and shapes


def test_od_resnet18_layout_matches_official_definition(od_r18):
    ckpt = export_official(od_r18)
    assert list(ckpt) == ["state_dict"]
    got = _shapes(ckpt["state_dict"])
    assert all(k.startswith("module.") for k in got)
    assert got["module.layer1.0.conv1.weight"] == (4, 64, 64, 3, 3)
    assert got["module.layer1.0.conv1.attention.fc.weight"] == (16, 64, 1, 1)
    assert got["module.layer1.0.conv1.attention.kernel_fc.weight"] == (4, 16, 1, 1)
    assert got["module.layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert _shapes(ckpt["state_dict"], "module.") == _od_resnet18(4)


def test_od_mobilenetv2_layout_matches_official_definition(od_mbv2):
    got = _shapes(export_official(od_mbv2)["state_dict"], "module.")
    assert got["features.1.conv.0.0.weight"] == (4, 32, 1, 3, 3)  # expansion-1 block: dw first
    assert got["features.1.conv.1.weight"] == (4, 16, 32, 1, 1)
    assert got["features.18.0.weight"] == (4, 1280, 320, 1, 1)
    assert got["classifier.1.weight"] == (1000, 1280)
    assert got == _od_mobilenetv2_100(4)


def test_import_hand_named_od_mobilenetv2_dict():
    official = _random_official(_od_mobilenetv2_100(4))
    model = _build("mobilenetv2_100", "odconv_4x", seed=2)
    report = import_official(model, {"state_dict": {"module." + k: v for k, v in official.items()}})
    assert report.source_format == "odconv" and report.loaded == len(official)
    pairs = {
        "conv_stem.weight": "features.0.0.weight",
        "bn1.running_var": "features.0.1.running_var",
        "blocks.0.0.conv_dw.weight": "features.1.conv.0.0.weight",
        "blocks.0.0.conv_pw.attention.filter_fc.bias": "features.1.conv.1.attention.filter_fc.bias",
        "blocks.0.0.bn2.weight": "features.1.conv.2.weight",
        "blocks.1.0.conv_pw.weight": "features.2.conv.0.0.weight",
        "blocks.1.0.conv_dw.attention.spatial_fc.weight": "features.2.conv.1.0.attention.spatial_fc.weight",
        "blocks.1.1.conv_pwl.weight": "features.3.conv.2.weight",
        "blocks.6.0.bn3.running_mean": "features.17.conv.3.running_mean",
        "conv_head.attention.kernel_fc.weight": "features.18.0.attention.kernel_fc.weight",
        "bn2.bias": "features.18.1.bias",
        "classifier.weight": "classifier.1.weight",
    }
    state = model.state_dict()
    for ours, theirs in pairs.items():
        assert torch.equal(state[ours], official[theirs]), ours


def test_import_hand_named_od_resnet18_bare_state_dict():
    official = _random_official(_od_resnet18(1))
    model = _build("resnet18", "odconv_1x", seed=2)
    report = import_official(model, official)  # a bare state dict, no prefix
    assert report.source_format == "state_dict" and report.loaded == len(official)
    assert torch.equal(model.state_dict()["layer3.1.conv2.attention.channel_fc.weight"],
                       official["layer3.1.conv2.attention.channel_fc.weight"])


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize(
    "arch,conv",
    [("resnet18", "odconv_4x"), ("resnet18", "odconv_1x"), ("mobilenetv2_100", "odconv_4x")],
)
def test_odconv_round_trip(arch, conv, od_r18, od_mbv2):
    src = {("resnet18", "odconv_4x"): od_r18, ("mobilenetv2_100", "odconv_4x"): od_mbv2}.get((arch, conv))
    src = src if src is not None else _build(arch, conv, seed=1)
    dst = _build(arch, conv, seed=2)
    report = import_official(dst, export_official(src))
    # every tensor of the model but its schedule state (no official file has that: issue 17)
    assert report.layout == "odconv" and report.loaded == len(src.state_dict()) - len(schedule_state_keys(src))
    _assert_same_state(_state(src), _state(dst))
    torch.testing.assert_close(_logits(dst), _logits(src), rtol=0, atol=0)


def test_file_round_trip_odconv(tmp_path, od_r18):
    path = tmp_path / "model_best.pth.tar"
    ckpt = export_official(od_r18)
    ckpt.update(epoch=99, acc=torch.tensor(77.1), best_acc=torch.tensor(77.2))
    torch.save(ckpt, path)
    dst = _build("resnet18", "odconv_4x", seed=2)
    report = import_official(dst, path)
    assert report.source == str(path) and report.source_format == "odconv"
    _assert_same_state(_state(od_r18), _state(dst))


# ------------------------------------------------------------------ strictness


def test_other_arch_raises_naming_key_and_leaves_model_untouched(od_r18):
    ckpt = export_official(_build("resnet50", "odconv_4x", seed=3))
    before = _state(od_r18)
    with pytest.raises(ValueError, match=r"module\.layer1\.0\.conv1\.weight.*\[4, 64, 64, 1, 1\].*\[4, 64, 64, 3, 3\]"):
        import_official(od_r18, ckpt)
    _assert_same_state(before, _state(od_r18))


def test_truncated_or_mismatched_checkpoint_leaves_model_untouched(od_r18):
    good = export_official(_build("resnet18", "odconv_4x", seed=4))["state_dict"]
    before = _state(od_r18)

    truncated = dict(good)
    del truncated["module.fc.bias"]  # the last key: everything before it would fit
    with pytest.raises(ValueError, match=r"missing.*'module\.fc\.bias'"):
        import_official(od_r18, {"state_dict": truncated})

    extra = dict(good, **{"module.layer1.0.conv1.attention.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected key 'module\.layer1\.0\.conv1\.attention\.extra'"):
        import_official(od_r18, {"state_dict": extra})

    one_kernel = export_official(_build("resnet18", "odconv_1x", seed=4))
    with pytest.raises(ValueError, match=r"checkpoint \[1, 64, 64, 3, 3\] vs model \[4, 64, 64, 3, 3\]"):
        import_official(od_r18, one_kernel)
    _assert_same_state(before, _state(od_r18))


def test_unreadable_inputs_raise(od_r18):
    with pytest.raises(ValueError, match="not an official checkpoint"):
        import_official(od_r18, {"epoch": 3})
    with pytest.raises(ValueError, match="model_ema"):
        import_official(od_r18, export_official(od_r18), ema=True)
    with pytest.raises(ValueError, match="unknown official format"):
        export_official(od_r18, format="onnx")


def test_variant_without_official_layout_raises():
    model = dynconv.create_model("resnet18", "dyconv_4x")
    with pytest.raises(ValueError, match="no official checkpoint layout.*dyconv_4x"):
        export_official(model)


# ------------------------------------------------------------------ KernelWarehouse


def _kw(arch: str, conv: str = "kw_1x", seed: int = 1) -> torch.nn.Module:
    """A KernelWarehouse model: a failure to build one fails the test that needs it (never a skip)."""
    return _build(arch, conv, seed=seed)


def test_kw_resnet18_layout_matches_official_definition():
    ckpt = export_official(_kw("resnet18"))
    assert list(ckpt) == ["model"]
    got = _shapes(ckpt["model"])
    assert [got[f"warehouse_manager.weights.{i}"] for i in range(4)] == [
        (56, 64, 64, 1, 1), (47, 128, 128, 1, 1), (47, 256, 256, 1, 1), (27, 512, 512, 1, 1)]
    assert got["layer1.0.conv1.attention.fc1.weight"] == (16, 64)
    assert "layer1.0.conv1.attention.fc1.bias" not in got  # BatchNorm1d follows, no bias
    assert got["layer1.0.conv1.attention.norm1.running_var"] == (16,)
    assert got["layer1.0.conv1.attention.fc2.weight"] == (513, 16)
    assert got["layer1.0.conv1.attention.fc2.bias"] == (513,)
    assert got["layer4.0.conv2.attention.fc2.weight"] == (252, 32)
    assert got["layer2.0.downsample.0.attention.fc1.weight"] == (16, 64)  # strided downsample is KW
    assert got["conv1.weight"] == (64, 3, 7, 7) and got["fc.weight"] == (1000, 512)
    assert not any(k.endswith("conv1.weight") and k.startswith("layer") for k in got)
    assert not any("temp" in k for k in got)  # no temperature or beta in official checkpoints


def test_kw_mobilenetv2_layout_matches_official_definition():
    got = _shapes(export_official(_kw("mobilenetv2_100"))["model"])
    assert got["classifier.weight"] == (1000, 1280)  # kw_mobilenetv2: a bare Linear classifier
    assert "features.0.0.attention.fc1.weight" in got  # the stem is KW too
    assert "features.1.conv.0.0.attention.fc1.weight" in got  # expansion-1 block: dw conv
    assert "features.2.conv.1.0.attention.fc2.weight" in got  # dw conv of an expansion block
    assert "features.18.0.attention.fc1.weight" in got and got["features.18.1.weight"] == (1280,)
    assert got["features.17.conv.3.running_var"] == (320,)
    assert not any(k.startswith(("blocks.", "conv_stem", "conv_head")) for k in got)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2_100"])
def test_kw_round_trip(arch):
    src = _kw(arch, seed=1)
    dst = _build(arch, "kw_1x", seed=2)
    report = import_official(dst, export_official(src))
    assert report.source_format == "kw" and report.layout == "kw"
    _assert_same_state(_state(src), _state(dst))
    torch.testing.assert_close(_logits(dst), _logits(src), rtol=0, atol=0)


def test_kw_file_with_args_and_ema(tmp_path):
    model, ema = _kw("resnet18", seed=1), _kw("resnet18", seed=3)
    path = tmp_path / "checkpoint-best.pth"
    torch.save({
        "model": export_official(model)["model"],
        "model_ema": export_official(ema)["model"],
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 299,
        "scaler": {"scale": 65536.0},
        "args": argparse.Namespace(model="kw_resnet18", cell_num_ratio=1.0, sharing_range="layer_conv"),
    }, path)
    dst = _build("resnet18", "kw_1x", seed=2)
    assert import_official(dst, path).source_format == "kw"
    _assert_same_state(_state(model), _state(dst))
    assert import_official(dst, path, ema=True).source_format == "kw_ema"
    _assert_same_state(_state(ema), _state(dst))


def test_kw_checkpoint_into_odconv_model_raises(od_r18):
    ckpt = export_official(_kw("resnet18"))
    before = _state(od_r18)
    with pytest.raises(ValueError, match="does not fit this odconv_4x resnet18 model"):
        import_official(od_r18, ckpt)
    _assert_same_state(before, _state(od_r18))


@pytest.mark.slow
@pytest.mark.parametrize("conv", ["static", "kw_1x"])
def test_convnext_round_trip(conv):
    src = _kw("convnext_tiny", conv, seed=1)
    ckpt = export_official(src)
    got = _shapes(ckpt["model"])
    dynamic = conv != "static"
    assert got["stages.0.0.gamma"] == ((1, 96, 1, 1) if dynamic else (96,))
    assert got["downsample_layers.1.0.weight"] == (96,) and "norm.weight" in got and "head.weight" in got
    if dynamic:
        assert "stages.0.0.pwconv1.attention.fc1.bias" in got  # LayerNorm attention: fc1 has a bias
    else:
        assert got["stages.0.0.pwconv1.weight"] == (384, 96) and got["downsample_layers.0.0.weight"] == (96, 3, 4, 4)
    dst = _build("convnext_tiny", conv, seed=2)
    import_official(dst, ckpt)
    _assert_same_state(_state(src), _state(dst))
    torch.testing.assert_close(_logits(dst), _logits(src), rtol=0, atol=0)


# ------------------------------------------------------------------ DCD (liyunsheng13/dcd)


def _dcd_layer(prefix: str, cin: int, cout: int, k: int, pool: int) -> Shapes:
    """Keys of one official conv_dy / conv_basic_dy (models/imagenet/resnet_dcd.py)."""
    dim = int((cin * pool * pool) ** 0.5)
    squeeze = max(max(cin * pool * pool, dim * dim) // 16, 4)
    out = {f"{prefix}.conv.weight": (cout, cin, k, k), f"{prefix}.q.weight": (dim, cin, 1, 1),
           f"{prefix}.p.weight": (cout, dim, 1, 1), f"{prefix}.fc.0.weight": (squeeze, cin * pool * pool),
           f"{prefix}.fc.1.fc.0.weight": (squeeze, squeeze), f"{prefix}.fc_phi.weight": (dim * dim, squeeze),
           f"{prefix}.fc_scale.weight": (cout, squeeze)}
    out.update(_bn(f"{prefix}.bn1", dim))
    out.update(_bn(f"{prefix}.bn2", dim))
    return out


def _dcd_resnet18() -> Shapes:
    c = "classifier.0"  # DYCls(512, 1000)
    head = {f"{c}.cls.weight": (1000, 512), f"{c}.cls.bias": (1000,), f"{c}.cls_q.weight": (32, 512),
            f"{c}.cls_p.weight": (1000, 32), f"{c}.fc.0.weight": (32, 512), f"{c}.fc.1.fc.0.weight": (32, 32),
            f"{c}.fc_phi.weight": (1024, 32), f"{c}.fc_scale.weight": (1000, 32),
            **_bn(f"{c}.bn1", 32), **_bn(f"{c}.bn2", 32)}
    return _resnet18(lambda p, cin, cout: _dcd_layer(p, cin, cout, 3, pool=2), head)


def test_dcd_resnet18_layout_matches_official_definition():
    ckpt = export_official(_build("resnet18", "dcd"))
    assert list(ckpt) == ["state_dict"]
    assert _shapes(ckpt["state_dict"]) == _dcd_resnet18()


def test_dcd_mobilenetv2_names_follow_the_official_model():
    got = _shapes(export_official(_build("mobilenetv2_100", "dcd"))["state_dict"])
    assert got["features.1.conv.0.weight"] == (32, 1, 3, 3)  # first block: dw, bn, relu6, pw, bn
    assert got["features.1.conv.3.weight"] == (16, 32, 1, 1) and "features.1.conv.4.running_var" in got
    assert got["features.2.conv.0.conv.weight"] == (96, 16, 1, 1)  # DYModule(16, 96): L = 8, S = 8
    assert got["features.2.conv.0.conv_q.weight"] == (8, 16, 1, 1)
    assert got["features.2.conv.0.conv_p.weight"] == (96, 8, 1, 1)
    assert got["features.2.conv.0.fc.0.weight"] == (8, 64)
    assert got["features.2.conv.3.weight"] == (96, 1, 3, 3) and got["features.2.conv.7.weight"] == (24,)
    assert got["features.2.conv.6.fc_phi.weight"][0] == got["features.2.conv.6.bn2.weight"][0] ** 2
    assert got["conv.0.weight"] == (1280, 320, 1, 1) and got["conv.1.weight"] == (1280,)
    assert got["classifier.0.cls.weight"] == (1000, 1280)
    assert not any(k.startswith(("blocks.", "conv_stem", "conv_head", "bn")) for k in got)


def _calibrated(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm statistics of random images: a fresh DCD net's un-normalised Phi(x) blows up in eval
    mode under unit running statistics (as the official one would)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2_100"])
def test_dcd_round_trip(arch, tmp_path):
    src, dst = _calibrated(_build(arch, "dcd", seed=1)), _build(arch, "dcd", seed=2)
    assert torch.isfinite(_logits(src)).all()
    path = tmp_path / "dcd.pth.tar"
    torch.save(export_official(src), path)
    report = import_official(dst, path)
    assert report.layout == "dcd" and report.loaded == len(src.state_dict())
    _assert_same_state(_state(src), _state(dst))
    torch.testing.assert_close(_logits(dst), _logits(src), rtol=0, atol=0)


# ------------------------------------------------------------------ DGC (zhuogege1943/dgc)


def _dgc_layer(prefix: str, cin: int, cout: int, k: int, heads: int = 4) -> Shapes:
    """Keys of one official DynamicMultiHeadConv (layers.py): pre-BN, buffer, per-head conv and saliency FCs."""
    hidden = cin // (16 if cin >= 80 else 8)
    out = {**_bn(f"{prefix}.norm", cin), f"{prefix}._inactive_channels": (1,)}
    for h in range(heads):
        p = f"{prefix}.headconv_{h}"
        out.update({f"{p}.conv.weight": (cout // heads, cin, k, k), f"{p}.fc1.weight": (hidden, cin),
                    f"{p}.fc2.weight": (cin, hidden), f"{p}.fc2.bias": (cin,)})
    return out


def _dgc_resnet18() -> Shapes:
    """dyresnet18 (models/dynamic_resnet.py): DGC block convs and downsample, whose BN is wrapped in
    ``Norm_after_downsample`` (``downsample.1.norm``)."""
    out = _resnet18(lambda p, cin, cout: _dgc_layer(p, cin, cout, 3), {"fc.weight": (1000, 512), "fc.bias": (1000,)})
    for key in [k for k in out if ".downsample." in k]:
        del out[key]
    for s, planes in ((1, 128), (2, 256), (3, 512)):
        p = f"layer{s + 1}.0.downsample"
        out.update(_dgc_layer(f"{p}.0", planes // 2, planes, 1))
        out.update(_bn(f"{p}.1.norm", planes))
    return out


def test_dgc_resnet18_layout_matches_official_definition():
    ckpt = export_official(_build("resnet18", "dgc"))
    assert list(ckpt) == ["state_dict"]
    assert all(k.startswith("module.") for k in ckpt["state_dict"])  # DataParallel
    assert _shapes(ckpt["state_dict"], "module.") == _dgc_resnet18()


def test_dgc_file_round_trip(tmp_path):
    src, dst = _build("resnet18", "dgc", seed=1), _build("resnet18", "dgc", seed=2)
    dynconv.set_progress(src, 40.0)  # mid-ramp: the buffer carries the pruning state
    _calibrated(src)  # saliencies scale with un-normalised inputs: a fresh net overflows in eval mode
    assert torch.isfinite(_logits(src)).all()
    path = tmp_path / "dgc_resnet18.pth.tar"
    official = export_official(src)
    torch.save({"epoch": 120, "best_prec1": 68.78, "optimizer": {"state": {}, "param_groups": []}, **official}, path)
    report = import_official(dst, path, final_schedule=False)
    assert (report.source_format, report.layout, report.loaded) == ("dgc", "dgc", len(src.state_dict()))
    _assert_same_state(_state(src), _state(dst))
    assert dst.layer4[1].conv2.inactive_channels == src.layer4[1].conv2.inactive_channels < round(512 * 0.55)
    torch.testing.assert_close(_logits(dst), _logits(src), rtol=0, atol=0)
    import_official(dst, path)  # by default, evaluation happens at the end of the schedule
    assert dst.layer4[1].conv2.inactive_channels == round(512 * 0.55)


def test_dgc_without_official_model_raises():
    with pytest.raises(ValueError, match="no mobilenetv2 model"):
        export_official(dynconv.create_model("mobilenetv2_100", "dgc"))


# ------------------------------------------------------------------ IC-Conv (yifan123/IC-Conv)


def _ic_resnet50_keys(patterns) -> Shapes:
    """ic_resnet50: torchvision Bottleneck names; each conv2 is ``conv_list.{j}`` over the patterns
    with a non-zero count, in file order (yifan123/IC-Conv model/ic_resnet.py and model/ic_conv2d.py)."""
    out: Shapes = {}
    i, inplanes = 0, 64
    for s, (planes, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
        for b in range(blocks):
            cin = inplanes if b == 0 else planes * 4
            j = 0
            for count in patterns[i].values():
                if count:
                    out[f"layer{s + 1}.{b}.conv2.conv_list.{j}.weight"] = (count, planes, 3, 3)
                    j += 1
            out[f"layer{s + 1}.{b}.conv1.weight"] = (planes, cin, 1, 1)
            i += 1
        inplanes = planes * 4
    return out


def test_ic_resnet50_layout_matches_official_definition():
    from dynconv.patterns import load_patterns, official_pattern_path

    raw = json.loads(official_pattern_path("detection_ic_resnet50_k9").read_text())
    state = export_official(_build("resnet50", "icconv"))
    assert "fc.weight" in state and "layer1.0.conv2.weight" not in state  # a bare state dict
    expected = _ic_resnet50_keys(raw)
    assert len(load_patterns(official_pattern_path("detection_ic_resnet50_k9"))) == 16
    got = _shapes(state)
    assert {k: got[k] for k in expected} == expected
    assert sum(1 for k in got if ".conv_list." in k) == sum(1 for p in raw for c in p.values() if c)


def test_icconv_round_trip_and_a_checkpoint_of_other_patterns(tmp_path):
    src, dst = _build("resnet50", "icconv", seed=1), _build("resnet50", "icconv", seed=2)
    path = tmp_path / "ic_resnet50.pth"
    torch.save(export_official(src), path)
    report = import_official(dst, path)
    assert (report.source_format, report.layout, report.loaded) == ("state_dict", "icconv", len(src.state_dict()))
    _assert_same_state(_state(src), _state(dst))
    torch.testing.assert_close(_logits(dst), _logits(src), rtol=0, atol=0)
    other = dynconv.create_model("resnet50", "icconv", patterns="segmentation_ic_resnet50_k9")
    with pytest.raises(ValueError, match="does not fit this icconv"):
        import_official(other, path)
