"""IC-Conv against a tap-by-tap reference, its official parameter layout, pattern files and placement."""
from __future__ import annotations

import json
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dynconv
from dynconv.ops.icconv import IMPLS, InceptionConv2d
from dynconv.patterns import (
    default_patterns,
    dilation_grid,
    load_patterns,
    official_pattern_names,
    official_pattern_path,
    save_patterns,
)
from dynconv.surgery.icconv import convert_icconv
from dynconv.surgery.sites import conv_sites, detect_backbone


def reference(layer: InceptionConv2d, x: torch.Tensor) -> torch.Tensor:
    """Definition, one tap at a time: output pixel ``u`` of channel ``c`` is centred where the replaced
    conv's kernel centre falls (``stride * u - padding + dilation * (k - 1) / 2``) and its tap ``t``
    reads the input ``t * d_c`` away from there, ``d_c`` the channel's dilation; channel ``c`` reads the
    inputs of its group."""
    (kh, kw), (sh, sw), (p0, p1), (b0, b1) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    n, _, h, w = x.shape
    ho = (h + 2 * p0 - b0 * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * p1 - b1 * (kw - 1) - 1) // sw + 1
    big = 64
    xp = F.pad(x, (big,) * 4)
    unit_out, unit_in = layer.out_channels // layer.groups, layer.in_channels // layer.groups
    weight = torch.cat([c.weight for c in layer.conv_list])
    channels = []
    c = 0
    for (dh, dw), count in layer.pattern.items():
        for _ in range(count):
            g = c // unit_out
            xs = xp[:, g * unit_in:(g + 1) * unit_in]
            acc = x.new_zeros(n, ho, wo)
            for i in range(kh):
                for j in range(kw):
                    r0 = big - p0 + b0 * (kh - 1) // 2 + (i - (kh - 1) // 2) * dh
                    c0 = big - p1 + b1 * (kw - 1) // 2 + (j - (kw - 1) // 2) * dw
                    patch = xs[:, :, r0:r0 + sh * (ho - 1) + 1:sh, c0:c0 + sw * (wo - 1) + 1:sw]
                    acc = acc + torch.einsum("nchw,c->nhw", patch, weight[c, :, i, j])
            channels.append(acc)
            c += 1
    out = torch.stack(channels, 1)
    return out + layer.bias.view(1, -1, 1, 1) if layer.bias is not None else out


# (in, out, kernel, stride, padding, dilation, groups, bias, pattern, input h, w)
CASES = {
    "dense_stride2": (5, 12, 3, 2, 1, 1, 1, False, {(1, 1): 4, (1, 2): 3, (2, 1): 2, (3, 3): 2, (1, 4): 1}, 13, 11),
    "dense_k5": (4, 7, 5, 1, 2, 1, 1, True, {(2, 1): 3, (1, 1): 2, (1, 3): 2}, 12, 14),
    "valid_base_dilation2": (3, 6, 3, 1, 0, 2, 1, False, {(2, 2): 2, (3, 2): 2, (4, 4): 2}, 15, 13),
    "depthwise_bias": (8, 8, 3, 2, 1, 1, 8, True, {(1, 1): 3, (2, 2): 1, (1, 3): 2, (4, 1): 2}, 12, 13),
    "depthwise_k7": (6, 6, 7, 1, 3, 1, 6, True, {(1, 1): 2, (2, 1): 1, (1, 2): 2, (3, 2): 1}, 16, 15),
    "grouped": (6, 12, 3, 1, 1, 1, 2, False, {(1, 1): 2, (2, 2): 4, (1, 2): 6}, 10, 9),
}


def make(case, impl, dtype=torch.float64):
    cin, cout, k, s, p, d, g, bias, pattern, _, _ = CASES[case]
    layer = InceptionConv2d(cin, cout, k, s, p, d, g, bias, pattern=pattern, impl=impl).to(dtype)
    if bias:
        nn.init.uniform_(layer.bias, -1, 1)
    return layer


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_every_path_matches_the_tap_reference(case, impl, batch):
    layer = make(case, impl)
    h, w = CASES[case][-2:]
    x = torch.randn(batch, layer.in_channels, h, w, dtype=torch.float64, requires_grad=True)
    y, y_ref = layer(x), reference(layer, x)
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y)
    params = list(layer.parameters())
    for a, b in zip(torch.autograd.grad(y, [x, *params], grad), torch.autograd.grad(y_ref, [x, *params], grad)):
        torch.testing.assert_close(a, b)


def test_union_packs_members_into_one_conv():
    layer = make("dense_stride2", "union")
    packs = layer.plan(torch.empty(1, 5, 13, 11, dtype=torch.float64))
    assert [p.members for p in packs] == [(0, 1, 2, 3, 4)]
    assert packs[0].taps == (7, 9)  # dilations 1..3 rows, 1..4 columns of a 3x3 kernel


def test_auto_packs_narrow_members_on_a_real_layer_and_caches_them():
    """ic_resnet50 layer 0 (detection pattern, 64 channels at 56x56): the wide (1,1) member runs alone,
    the narrow ones share convs; the result equals the loop, with and without autograd."""
    pattern = load_patterns("detection_ic_resnet50_k9")[0]
    auto = InceptionConv2d(64, 64, 3, 1, 1, pattern=pattern)
    loop = InceptionConv2d(64, 64, 3, 1, 1, pattern=pattern, impl="loop")
    loop.load_state_dict(auto.state_dict())
    x = torch.randn(1, 64, 56, 56)
    with torch.no_grad():
        packs = auto.plan(x)
        assert (0,) in [p.members for p in packs] and len(packs) < len(auto.members)
        torch.testing.assert_close(auto(x), loop(x), rtol=1e-4, atol=1e-4)
        first = [auto._pack_weight(p) for p in packs]
        assert all(a is b for a, b in zip(first, [auto._pack_weight(p) for p in packs]))  # reused
        auto.conv_list[1].weight.add_(1.0)  # a parameter update invalidates the cached kernels
        loop.conv_list[1].weight.add_(1.0)
        torch.testing.assert_close(auto(x), loop(x), rtol=1e-4, atol=1e-4)


def test_official_parameter_layout_and_init():
    pattern = {(1, 1): 64, (2, 3): 8, (4, 4): 0, (1, 2): 4}
    layer = InceptionConv2d(32, 76, 3, padding=1, pattern=pattern)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"conv_list.0.weight": (64, 32, 3, 3), "conv_list.1.weight": (8, 32, 3, 3),
                      "conv_list.2.weight": (4, 32, 3, 3)}
    assert [(c.dilation, c.padding) for c in layer.conv_list] == [((1, 1), (1, 1)), ((2, 3), (2, 3)), ((1, 2), (1, 2))]
    # official: normal(0, sqrt(2 / (k * k * out_channels))) per member conv
    std = layer.conv_list[0].weight.std().item()
    assert abs(std / (2 / (9 * 64)) ** 0.5 - 1) < 0.05
    assert InceptionConv2d(4, 4, 3, padding=1).pattern == {(1, 1): 4}


def test_bad_layers_are_refused():
    with pytest.raises(ValueError, match="pattern has 10 channels, the layer has 12"):
        InceptionConv2d(4, 12, 3, pattern={(1, 1): 6, (2, 2): 4})
    with pytest.raises(ValueError, match="straddle"):
        InceptionConv2d(4, 8, 3, groups=2, pattern={(1, 1): 3, (2, 2): 5})
    with pytest.raises(ValueError, match="odd kernel"):
        InceptionConv2d(4, 8, 2, pattern={(1, 1): 8})
    with pytest.raises(ValueError, match="not a dilation"):
        InceptionConv2d(4, 8, 3, pattern={(0, 1): 8})


def _official_entries(path):
    """The file read independently: [{(a + 1, b + 1): count}] including zeros."""
    out = []
    for entry in json.loads(path.read_text()):
        out.append({tuple(int(v) + 1 for v in re.findall(r"\d+", k)): n for k, n in entry.items()})
    return out


def test_official_files_ship_and_round_trip(tmp_path):
    names = official_pattern_names()
    assert {"detection_ic_resnet50_k9", "detection_ic_resnet101_k9", "segmentation_ic_resnet50_k9",
            "human_pose_ic_resnet50_k13", "human_pose_ic_resnet101_k13"} <= set(names)
    for name, layers, keys in (("detection_ic_resnet50_k9", 16, 16), ("human_pose_ic_resnet101_k13", 33, 36)):
        path = official_pattern_path(name)
        patterns = load_patterns(path)
        expected = [{d: n for d, n in e.items() if n} for e in _official_entries(path)]
        assert patterns == expected and len(patterns) == layers
        assert all(list(p) == [d for d in e if e[d]] for p, e in zip(patterns, _official_entries(path)))
        saved = save_patterns(patterns, tmp_path / f"{name}.json")
        original = json.loads(path.read_text())
        again = json.loads(saved.read_text())
        assert again == original and [list(e) for e in again] == [list(e) for e in original]
        assert all(len(e) == keys for e in again)
    assert official_pattern_path("segmentation_ic_resnet101_k9") == official_pattern_path("detection_ic_resnet101_k9")
    with pytest.raises(ValueError, match="no official IC-Conv pattern 'nope'"):
        official_pattern_path("nope")


@pytest.mark.parametrize("entry, message", [
    ({"(0, 0)": 3, "(1)": 2}, r"bad\.json: entry 1 has key '\(1\)'"),
    ({"(0, 0)": 3, "(1, 1)": -2}, r"bad\.json: entry 1, key '\(1, 1\)': count must be a non-negative int"),
    ({"(0, 0)": 3, "(0,0)": 1}, r"bad\.json: entry 1 gives dilation \(1, 1\) twice"),
])
def test_malformed_pattern_files_name_file_and_entry(tmp_path, entry, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"(0, 0)": 4}, entry]))
    with pytest.raises(ValueError, match=message):
        load_patterns(path)
    assert load_patterns([{(2, 1): 3, (1, 1): 0}]) == [{(2, 1): 3}]


def test_default_patterns_follow_the_authors_ratios():
    widths, stages = [64, 128, 256, 512, 10, 96], [0, 1, 2, 3, 3, 0]
    patterns = default_patterns(widths, stages, units=[1, 1, 1, 1, 1, 32])
    assert patterns == default_patterns(widths, stages, units=[1, 1, 1, 1, 1, 32])
    assert [sum(p.values()) for p in patterns] == widths
    assert [p[(1, 1)] for p in patterns] == [32, 64, 179, 358, 7, 64]  # 50% early, 70% later (rounded)
    others = [d for d in dilation_grid("k9") if d != (1, 1)]
    assert [patterns[0].get(d, 0) for d in others] == [3, 3] + [2] * 13  # 32 over 15: 2 each, 2 left over
    assert list(patterns[4]) == [(1, 1), (1, 2), (1, 3), (1, 4)]
    assert all(n % 32 == 0 for n in patterns[5].values())
    k13 = default_patterns([100], [2], grid="k13")[0]
    assert len(k13) == 31 and max(max(d) for d in k13) == 6


@pytest.mark.parametrize("name", ["detection_ic_resnet50_k9", "segmentation_ic_resnet50_k9",
                                  "human_pose_ic_resnet50_k13", "detection_ic_resnet101_k9",
                                  "human_pose_ic_resnet101_k13"])
def test_every_official_pattern_file_builds_its_network(name):
    """Each entry's counts add up to the width of the conv it replaces, in network order."""
    model = dynconv.create_model(name.split("_ic_")[1].rsplit("_", 1)[0], "icconv", num_classes=10, patterns=name)
    layers = [m for m in model.modules() if isinstance(m, InceptionConv2d)]
    assert [layer.pattern for layer in layers] == load_patterns(name)
    assert all(sum(conv.out_channels for conv in layer.conv_list) == layer.out_channels for layer in layers)
    assert [layer.out_channels for layer in layers][:4] == [64, 64, 64, 128]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


ARCH_LAYERS = {"resnet18": 16, "resnet34": 32, "resnet50": 16, "resnet101": 33, "mobilenetv2_050": 17,
               "mobilenetv2_075": 17, "mobilenetv2_100": 17, "convnext_tiny": 18}


@pytest.mark.parametrize("arch", dynconv.list_archs())
def test_converter_builds_every_arch(arch):
    assert set(ARCH_LAYERS) == set(dynconv.list_archs())
    model = timm.create_model(arch, num_classes=10, **({"conv_mlp": True} if arch.startswith("convnext") else {}))
    backbone = detect_backbone(model)
    stages = {s.name: s.stage for s in conv_sites(model, backbone)}
    replaced = convert_icconv(model, conv_sites(model, backbone), backbone)
    assert len(replaced) == ARCH_LAYERS[arch]
    layers = {name: model.get_submodule(name) for name, _ in replaced}
    if arch in ("resnet50", "resnet101"):
        official = load_patterns(f"detection_ic_resnet{arch[6:]}_k9")
        assert [layer.pattern for layer in layers.values()] == official
    else:  # (1, 1) takes 50% of the channels in stages 0-1, 70% later
        for name, layer in layers.items():
            ratio = 0.5 if stages[name] < 2 else 0.7
            assert layer.pattern[(1, 1)] == int(ratio * layer.out_channels + 0.5), name
    layers = list(layers.values())
    if arch.startswith(("mobilenetv2", "convnext")):
        assert all(layer.groups == layer.out_channels for layer in layers)
    assert not convert_icconv(model, conv_sites(model, backbone), backbone)  # nothing left to replace
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_converter_errors_name_the_layer():
    model = timm.create_model("resnet50", num_classes=10)
    sites = conv_sites(model, "resnet")
    patterns = load_patterns("detection_ic_resnet50_k9")
    patterns[3] = dict(patterns[3])
    patterns[3][(1, 1)] -= 4
    with pytest.raises(ValueError, match=r"pattern 3 \(layer2\.0\.conv2\) has 124 channels, the layer has 128"):
        convert_icconv(model, sites, "resnet", {"patterns": patterns})
    with pytest.raises(ValueError, match="33 patterns for 16 IC-Conv layers"):
        convert_icconv(model, sites, "resnet", {"patterns": "detection_ic_resnet101_k9"})
    with pytest.raises(TypeError, match="no option"):
        convert_icconv(model, sites, "resnet", {"kernel_num": 4})


def test_generic_cnn_replaces_every_odd_kernel_but_the_stem():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 16, 5, 2, 2),
                          nn.Conv2d(16, 16, 3, padding=1, groups=4))
    replaced = convert_icconv(model, conv_sites(model, "generic"), "generic")
    assert [n for n, _ in replaced] == ["3", "4"]
    assert all(n % 4 == 0 for n in model[4].pattern.values())
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 16, 8, 8)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2_050"])
def test_counted_macs_equal_the_static_network_whatever_the_zero_taps(arch):
    """IC-Conv costs exactly what the dense k x k convs it replaces cost: a packed forward shows its
    zero taps to the op counter, reports them, and ``count_macs`` takes them back out."""
    static = timm.create_model(arch, num_classes=10)
    model = timm.create_model(arch, num_classes=10)
    convert_icconv(model, conv_sites(model, detect_backbone(model)), detect_backbone(model), {"impl": "union"})
    wasted = []

    def record(module, inputs, output):
        wasted.append(module.wasted_macs(inputs[0], output))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, InceptionConv2d)]
    counted = dynconv.count_macs(model, (1, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert sum(wasted) > 0
    assert counted == dynconv.count_macs(static, (1, 3, 64, 64))
    layer = next(m for m in model.modules() if isinstance(m, InceptionConv2d))
    x = torch.randn(2, layer.in_channels, 9, 9)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        y = layer(x)
    assert counter.get_total_flops() // 2 == layer.true_macs(x, y) + layer.wasted_macs(x, y)
