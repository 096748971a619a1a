"""FDConv (Chen et al., CVPR 2025; official code Linwei-Chen/FDConv ``FDConv_detection/mmdet_custom/FDConv.py``).

The reference below is written from the paper's method section (FDW, KSM, FBM) with the official code's constants, in
float64, without ``torch.fft``: explicit DFT sums, per-sample loops, the ECA 1-D conv as a sum over taps.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynconv
from dynconv.ops.fdconv import FDConv2d, eca_kernel_size, spectral_groups

# -- the slow reference --------------------------------------------------------------------------------------


def _freq(n: int) -> torch.Tensor:
    """numpy/torch ``fftfreq`` by its definition: ``k / n`` for ``k < (n + 1) // 2``, else ``k / n - 1``."""
    k = torch.arange(n, dtype=torch.float64)
    return torch.where(k < (n + 1) // 2, k / n, k / n - 1)


def _inverse_real_dft(spectrum: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``irfft2`` by its sum (unnormalised forward, ``1 / (H W)`` back): ``m[y, x] = 1/(HW) Re sum_u sum_v c_v
    X[u, v] e^{2 pi i (u y / H + v x / W)}`` with ``c_v = 2`` except the zero (and, ``W`` even, Nyquist) column,
    ``c_v = 1``: the half spectrum stands for its Hermitian mirror. ``spectrum`` ``(..., H, W // 2 + 1)`` complex."""
    u, y = torch.arange(height, dtype=torch.float64), torch.arange(height, dtype=torch.float64)
    v, x = torch.arange(width // 2 + 1, dtype=torch.float64), torch.arange(width, dtype=torch.float64)
    rows = torch.exp(2j * math.pi * torch.outer(y, u) / height)  # (H, H)
    cols = torch.exp(2j * math.pi * torch.outer(v, x) / width)  # (Wr, W)
    c = torch.full((width // 2 + 1,), 2.0, dtype=torch.float64)
    c[0] = 1.0
    if width % 2 == 0:
        c[-1] = 1.0
    return (rows @ (spectrum * c.to(spectrum.dtype)) @ cols).real / (height * width)


def _forward_real_dft(signal: torch.Tensor) -> torch.Tensor:
    """``rfft2`` by its sum: ``X[u, v] = sum_y sum_x s[y, x] e^{-2 pi i (u y / H + v x / W)}``, ``v <= W // 2``."""
    height, width = signal.shape[-2:]
    u, y = torch.arange(height, dtype=torch.float64), torch.arange(height, dtype=torch.float64)
    v, x = torch.arange(width // 2 + 1, dtype=torch.float64), torch.arange(width, dtype=torch.float64)
    rows = torch.exp(-2j * math.pi * torch.outer(u, y) / height)
    cols = torch.exp(-2j * math.pi * torch.outer(x, v) / width)
    return rows @ signal.to(torch.complex128) @ cols


def _band_mask(k: int, height: int, width: int) -> torch.Tensor:
    """FBM's mask for divisor ``k`` on an ``height x width`` map: ``max(|f_u|, |f_v|) < 0.5 / k + 1e-8`` on a
    64 x 64 grid (official ``_precompute_masks``), picked by nearest-neighbour index ``floor(i * in / out)``. The
    official comparison is in float32, where ``0.5 / k + 1e-8`` is ``0.5 / k`` for k = 2 (the bin at 1/4 is out)
    but not for k = 4, 8 (1e-8 is more than half a float32 step at 1/8 and 1/16: those bins are in)."""
    grid = torch.maximum(_freq(64).abs()[:, None], (torch.arange(33, dtype=torch.float64) / 64)[None, :])
    mask = grid.float() < torch.tensor(0.5 / k + 1e-8, dtype=torch.float32)
    rows = torch.tensor([i * 64 // height for i in range(height)])
    cols = torch.tensor([j * 33 // (width // 2 + 1) for j in range(width // 2 + 1)])
    return mask[rows][:, cols].to(torch.float64)


def reference_fdconv(layer: FDConv2d, x: torch.Tensor) -> torch.Tensor:
    """FDConv's output by the paper's equations, sample by sample, from ``layer``'s parameters (train-mode
    BatchNorm statistics when ``layer.training``)."""
    B, c_in, height, width = x.shape
    c_out, k = layer.out_channels, layer.kernel_size[0]
    g = layer.KSM_Global
    pooled = x.mean((2, 3))  # (B, C_in)
    # KSM global (with the official heads): 1x1 conv, BatchNorm, StarReLU, heads
    z = pooled @ g.fc.weight.flatten(1).T
    if layer.training:
        mean, var = z.mean(0), z.var(0, unbiased=False)
    else:
        mean, var = g.bn.running_mean, g.bn.running_var
    z = (z - mean) / torch.sqrt(var + g.bn.eps) * g.bn.weight + g.bn.bias
    h = g.relu.scale * torch.clamp(z, min=0) ** 2 + g.relu.bias

    def head(conv: nn.Conv2d) -> torch.Tensor:
        return h @ conv.weight.flatten(1).T + conv.bias

    channel = 2 * torch.sigmoid(head(g.channel_fc))  # att_multi 2, temperature 1
    filt = 2 * torch.sigmoid(head(g.filter_fc))
    spatial = 2 * torch.sigmoid(head(g.spatial_fc)).reshape(B, k, k) if k > 1 else torch.ones(B, k, k)
    kernel_att = 2 / layer.kernel_num * torch.sigmoid(head(g.kernel_fc))
    # KSM local: LayerNorm over the pooled channels, ECA 1-D conv with C_out k^2 filters
    loc = layer.KSM_Local
    normed = (pooled - pooled.mean(1, keepdim=True)) / torch.sqrt(pooled.var(1, unbiased=False, keepdim=True)
                                                                  + loc.norm.eps) * loc.norm.weight + loc.norm.bias
    taps = loc.conv.weight[:, 0]  # (C_out k^2, size)
    size = taps.shape[1]
    padded = F.pad(normed, ((size - 1) // 2, (size - 1) // 2))
    logits = sum(taps[None, :, t, None] * padded[:, None, t:t + c_in] for t in range(size))  # (B, C_out k^2, C_in)
    local = 2 * torch.sigmoid(logits.reshape(B, c_out, k, k, c_in).permute(0, 1, 4, 2, 3))
    # FDW: group g's bins of the spectrum, weighted by the kernel attention, inverse real DFT
    spectrum = torch.view_as_complex(layer.dft_weight[0].contiguous()) * layer.alpha
    rows, cols = c_out * k, c_in * k
    outputs = []
    for b in range(B):
        weighted = spectrum * kernel_att[b][layer.groups_of_bins]
        matrix = _inverse_real_dft(weighted, rows, cols)
        kernel = matrix.reshape(c_out, k, c_in, k).permute(0, 2, 1, 3)
        kernel = kernel * local[b] * spatial[b] * channel[b][None, :, None, None] * filt[b][:, None, None, None]
        xb = x[b]
        if layer.FBM is not None:  # FBM: bands between successive low-passes, each scaled by a map
            spec = _forward_real_dft(xb)
            out, previous = torch.zeros_like(xb), xb
            for kk, conv in zip((2, 4, 8), layer.FBM.freq_weight_conv_list):
                low = _inverse_real_dft(spec * _band_mask(kk, height, width), height, width)
                amap = 2 * torch.sigmoid(F.conv2d(xb[None], conv.weight, conv.bias, padding=1)[0])
                out = out + amap * (previous - low)
                previous = low
            xb = out + previous
        outputs.append(F.conv2d(xb[None], kernel, layer.bias, layer.stride, layer.padding))
    return torch.cat(outputs)


def _randomised(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter moved off its (near-constant) initialisation, so each attention varies."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2 * (p.abs().mean() + 0.05))
    return layer


@pytest.mark.parametrize("c_in,c_out,k,stride,hw", [(24, 32, 3, 1, (9, 10)), (32, 20, 1, 1, (6, 5)),
                                                  (20, 24, 3, 2, (8, 7))])
@pytest.mark.parametrize("training", [True, False])
def test_matches_the_equations_in_float64_outputs_and_gradients(c_in, c_out, k, stride, hw, training):
    torch.manual_seed(0)
    layer = FDConv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=True, kernel_num=8).double()
    _randomised(layer).train(training)
    if not training:
        with torch.no_grad():
            layer.KSM_Global.bn.running_mean.normal_()
            layer.KSM_Global.bn.running_var.uniform_(0.5, 2)
    assert (layer.FBM is not None) == (k == 3)
    x = torch.randn(3, c_in, *hw, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y_ref = reference_fdconv(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad((y * y_ref.detach().cos()).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * y_ref.detach().cos()).sum(), params, allow_unused=True)
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, g, g_ref in zip(names, grads, grads_ref):
        if g_ref is None:  # the BatchNorm affine in eval mode reaches the output: never None here
            g_ref = torch.zeros_like(g)
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10, msg=name)


def test_spectral_groups_are_runs_of_the_distance_order():
    """Disjoint groups of equal size, group g's bins no farther from the zero frequency than group g+1's (the paper's
    'frequency-disjoint' groups; the official split into ``kernel_num`` equal runs of the sorted bins)."""
    rows, cols, n = 192, 96, 64
    groups = spectral_groups(rows, cols, n)
    dist = torch.sqrt(_freq(rows)[:, None] ** 2 + (torch.arange(cols // 2 + 1) / cols)[None, :] ** 2)
    sizes = torch.bincount(groups.flatten(), minlength=n)
    assert sizes.min() == sizes.max() == rows * (cols // 2 + 1) // n
    for gi in range(n - 1):
        assert dist[groups == gi].max() <= dist[groups == gi + 1].min() + 1e-7
    # not dividing: near-equal runs
    sizes = torch.bincount(spectral_groups(30, 10, 7).flatten(), minlength=7)
    assert sizes.sum() == 30 * 6 and sizes.max() - sizes.min() <= 1


def test_eca_kernel_size_is_the_official_formula():
    """``round(log2(C) / 2 + 0.5) // 2 * 2 + 1`` with Python's round-half-to-even: C=64 -> log2 6 ->
    round(3.5)=4 -> 5."""
    assert [eca_kernel_size(c) for c in (64, 128, 256, 512, 2048)] == [5, 5, 5, 5, 7]


def test_initial_kernel_is_the_converted_kernel():
    """With the official init the heads' weights are normal(0, 1e-6) (channel, spatial, kernel, local, FBM), so
    the kernel attention is 1/n per group and alpha * (1/n) * rfft2(M) / (min(C) // 2) = rfft2(M): every sample
    starts at ``static_kernel()``, the converted static kernel (official ``convert2dftweight``)."""
    conv = nn.Conv2d(64, 48, 3, padding=1, bias=False).double()
    layer = FDConv2d.from_conv(conv)
    torch.testing.assert_close(layer.static_kernel(), conv.weight, rtol=0, atol=1e-12)
    a_k = torch.full((2, layer.kernel_num), 1.0 / layer.kernel_num, dtype=torch.float64)
    torch.testing.assert_close(layer.fdw_kernels(a_k), conv.weight.expand(2, -1, -1, -1, -1), rtol=0, atol=1e-12)


# -- the official ResNet-50 detection backbone ------------------------------------------------------------------

# Parameters of the official FDConv ResNet-50 backbone (no fc), counted by building the official ``ResNet_FDConv``
# layer set from Linwei-Chen/FDConv ``FDConv_detection/mmdet_custom/FDConv.py`` (class ``FDConv`` with the
# ``faster_rcnn_r50_fpn_1x_coco_FDConv.py`` conv_cfg) on torchvision's ResNet-50: the stem conv and every
# Bottleneck conv built through ``conv_cfg`` (``resnet.py``), the downsample convs plain. 27,155,152 against
# 23,508,032 static: +3,647,120, the README's "+3.6M".
OFFICIAL_BACKBONE_PARAMS = 27_155_152
STATIC_BACKBONE_PARAMS = 23_508_032


@pytest.fixture(scope="module")
def resnet50():
    return dynconv.create_model("resnet50", "fdconv").eval()


def test_resnet50_parameters_equal_the_official_backbone(resnet50):
    model = resnet50
    static = dynconv.create_model("resnet50", "static")
    fc = sum(p.numel() for p in model.fc.parameters())
    assert dynconv.count_params(static) - fc == STATIC_BACKBONE_PARAMS
    assert dynconv.count_params(model) - fc == OFFICIAL_BACKBONE_PARAMS
    layers = {n for n, m in model.named_modules() if isinstance(m, FDConv2d)}
    # every Bottleneck conv (stride-2 3x3s included: use_fdconv_if_stride_in is never read); stem, downsample static
    assert layers == {f"layer{s}.{b}.conv{i}" for s, n in zip((1, 2, 3, 4), (3, 4, 6, 3)) for b in range(n)
                      for i in (1, 2, 3)}
    assert sum(m.FBM is not None for m in model.modules() if isinstance(m, FDConv2d)) == 16  # the 3x3s only


def test_size_rule_keeps_narrow_and_grouped_convs_static():
    """``min(C_in, C_out) > 16`` and k in {1, 3} (official ``use_fdconv_if_c_gt`` / ``use_fdconv_if_k_in``), and
    groups 1: MobileNetV2 0.5's 16-channel and depthwise convs stay static."""
    model = dynconv.create_model("mobilenetv2_050", "fdconv")
    converted = 0
    for name, m in model.named_modules():
        if ".KSM_" in name or ".FBM" in name:  # FDConv's own attention convs
            continue
        qualifies = min(m.in_channels, m.out_channels) > 16 and m.kernel_size[0] in (1, 3) and m.groups == 1 \
            if isinstance(m, (nn.Conv2d, FDConv2d)) else None
        if isinstance(m, FDConv2d):
            assert qualifies, name
            converted += 1
        elif isinstance(m, nn.Conv2d):
            assert not qualifies, name
    assert converted > 0
    with pytest.raises(ValueError, match="groups=1"):
        FDConv2d(32, 32, 3, groups=32)


def test_macs_keep_the_static_convolutions_and_count_the_attention_convs():
    """The per-sample convolutions cost what the static ones do (an identity: FDConv changes the kernel, not the
    conv), and the attention branches count what their convs compute, by formula: KSM global ``C_in h +
    h (C_in + C_out + k^2 + n)``, KSM local ``C_out k^2 size C_in``, FBM three 3x3 convs to one channel on the input
    map. (The FDConv README's +1.8G FLOPs for Faster R-CNN at 1333 x 800 is from mmcv's
    ``get_model_complexity_info``, which sees the same convs and BatchNorms but no FFT or elementwise work:
    ``attention`` here is 1.21G MACs at that size; the FFTs and products, ``aggregation`` + ``scaling``, 7.8G.)"""
    from dynconv.accounting import macs_breakdown

    size = (1, 3, 64, 64)
    model = dynconv.create_model("resnet18", "fdconv")
    static = dynconv.create_model("resnet18", "static")
    got = macs_breakdown(model, size)
    assert got["static"] + got["dynamic_conv"] == dynconv.count_macs(static, size)
    expected, maps = 0, {}
    hooks = [m.register_forward_hook(lambda mod, i, o: maps.__setitem__(mod, i[0].shape[-2:]))
             for m in model.modules() if isinstance(m, FDConv2d)]
    with torch.no_grad():
        model.eval()(torch.randn(size))
    for h in hooks:
        h.remove()
    for m, (height, width) in maps.items():
        g, k = m.KSM_Global, m.kernel_size[0]
        hidden = g.fc.out_channels
        expected += m.in_channels * hidden + hidden * (m.in_channels + m.out_channels + k * k * (k > 1) + m.kernel_num)
        expected += m.out_channels * k * k * eca_kernel_size(m.in_channels) * m.in_channels
        if m.FBM is not None:
            expected += 3 * m.in_channels * 9 * height * width
    assert got["attention"] == expected
    assert got["aggregation"] > 0 and got["scaling"] > 0


def test_conversion_from_a_static_conv_is_exact_and_the_official_one_is_not():
    """``dynconv.pretrained`` maps a static kernel exactly (heads at 0: every factor 1). The official conversion
    (``tools/convert_to_fdconv.py``: ``dft_weight`` only) keeps the random kaiming filter head, so the layer
    starts at ``2 sigmoid(z)`` times the static output per channel, not at the static output."""
    from dynconv.families.fdconv import from_static as _map_fdconv
    from dynconv.pretrained import PretrainedReport

    torch.manual_seed(0)
    conv = nn.Conv2d(32, 48, 3, padding=1, bias=True).double()
    x = torch.randn(2, 32, 12, 12, dtype=torch.float64)
    official = FDConv2d.from_conv(conv).eval()
    with torch.no_grad():
        deviation = (official(x) - conv(x)).abs().max() / conv(x).abs().max()
        assert deviation > 1e-3  # 1.7% here: the filter head's 2 sigmoid(z) is input-dependent
        layer = FDConv2d.from_conv(conv)
        _map_fdconv(layer, "conv", conv.weight, conv.bias, PretrainedReport(source="test", arch="test"))
        for mode in (True, False):
            torch.testing.assert_close(layer.train(mode)(x), conv(x), rtol=0, atol=1e-12)


# -- official checkpoints -----------------------------------------------------------------------------------------

OFFICIAL_KEYS = Path(__file__).parent / "data" / "fdconv_resnet50_official_keys.txt"


def _official_key_shapes() -> dict:
    out = {}
    for line in OFFICIAL_KEYS.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, dims = line.partition(" ")
            out[key] = tuple(int(d) for d in dims.split(",") if d)
    return out


@pytest.fixture(scope="module")
def resnet18_pair():
    """Two ResNet18s of different weights (the ResNet layout is the same at every depth)."""
    torch.manual_seed(1)
    src = dynconv.create_model("resnet18", "fdconv", num_classes=10)
    torch.manual_seed(2)
    dst = dynconv.create_model("resnet18", "fdconv", num_classes=10)
    return src.eval(), dst.eval()


def test_export_has_the_official_backbone_keys(resnet50):
    """Names and shapes of the official ``ResNet_FDConv`` state dict (recorded from the official module, see the
    fixture file's header), plus the classifier: the bare ``state_dict`` format; ``fdconv``: the mmdet detector
    checkpoint's ``backbone.*`` part."""
    model = resnet50
    official = _official_key_shapes()
    assert len(official) == 1262
    bare = dynconv.export_official(model, "state_dict")
    assert {k: tuple(v.shape) for k, v in bare.items() if not k.startswith("fc.")} == official
    detector = dynconv.export_official(model)["state_dict"]
    assert {k: tuple(v.shape) for k, v in detector.items()} == {"backbone." + k: s for k, s in official.items()}


def test_detector_checkpoint_round_trip(resnet18_pair, tmp_path):
    """An mmdet detector checkpoint (``backbone.*`` plus neck and heads) loads strictly into the backbone; the
    classifier, which the detector has not, stays as it was. Same outputs as the source model."""
    src, dst = resnet18_pair
    ckpt = dynconv.export_official(src)
    ckpt["state_dict"]["neck.lateral_convs.0.conv.weight"] = torch.zeros(256, 256, 1, 1)
    ckpt["meta"] = {"epoch": 12}
    torch.save(ckpt, tmp_path / "epoch_12.pth")
    fc_before = dst.fc.weight.detach().clone()
    report = dynconv.import_official(dst, tmp_path / "epoch_12.pth")
    assert (report.source_format, report.layout, report.loaded) == ("fdconv", "fdconv", len(ckpt["state_dict"]) - 1)
    assert torch.equal(dst.fc.weight, fc_before)
    dst.fc.load_state_dict(src.fc.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = src(x)
        assert want.isfinite().all() and want.abs().max() > 0
        torch.testing.assert_close(dst(x), want, rtol=0, atol=0)
    # a backbone tensor missing is an error, and the model is untouched
    del ckpt["state_dict"]["backbone.layer2.0.conv2.dft_weight"]
    with pytest.raises(ValueError, match="1 missing.*layer2.0.conv2.dft_weight"):
        dynconv.import_official(dynconv.create_model("resnet18", "fdconv", num_classes=10), ckpt)


def test_bare_state_dict_round_trip_and_other_backbones(resnet18_pair):
    src, dst = resnet18_pair
    report = dynconv.import_official(dst, dynconv.export_official(src, "state_dict"))
    assert (report.source_format, report.loaded) == ("state_dict", len(src.state_dict()))
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
    with pytest.raises(ValueError, match="no mobilenetv2 model"):
        dynconv.export_official(dynconv.create_model("mobilenetv2_050", "fdconv"))
