"""DGC against a per-sample, per-head masked reference written from the official layer's description;
the sparse (channel-skipping) path against the dense one; the pruning schedule; the lasso term."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynconv
from dynconv.ops.dgc import DGCConv2d, gate
from dynconv.schedules import dgc_pruning

# (in, out, kernel, stride, padding, dilation, H, W): widths divisible by 4 heads.
SHAPES = {
    "3x3": (8, 12, 3, 1, 1, 1, 7, 9),
    "stride2": (8, 4, 3, 2, 1, 1, 9, 7),
    "dilation2": (12, 8, 3, 1, 2, 2, 8, 8),
    "downsample1x1": (8, 16, 1, 2, 0, 1, 7, 7),
    "k5": (4, 8, 5, 1, 2, 1, 6, 9),
    "wide": (64, 16, 3, 1, 1, 1, 5, 6),  # 29 kept channels, read as 32 on the CPU sparse path
    "large_map": (8, 8, 3, 2, 1, 1, 35, 33),  # 18 x 17 output pixels: the grouped-conv sparse path
}


def make_layer(shape, **kwargs) -> DGCConv2d:
    cin, cout, k, s, p, d, _, _ = shape
    layer = DGCConv2d(cin, cout, k, stride=s, padding=p, dilation=d, **kwargs).double()
    with torch.no_grad():
        layer.norm.running_mean.uniform_(-0.5, 0.5)
        layer.norm.running_var.uniform_(0.5, 2.0)
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.norm.bias.uniform_(-0.2, 0.5)
        for head in layer.head_modules():
            head.fc2.bias.uniform_(-0.5, 1.5)  # some saliencies hit ReLU's zero
    return layer


def inputs(shape, batch):
    cin, _, _, _, _, _, h, w = shape
    return torch.randn(batch, cin, h, w, dtype=torch.float64, requires_grad=True)


def reference(layer: DGCConv2d, x: torch.Tensor) -> torch.Tensor:
    """The official computation, one sample and one head at a time: ReLU(BN(x)), saliency per head,
    zero the ``inactive`` smallest saliencies (and ties with the largest of them), convolve
    ``x * g_h`` with head ``h``'s own kernel, put channel ``j`` of head ``h`` at ``j * heads + h``."""
    norm = layer.norm
    if layer.training:
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    else:
        mean, var = norm.running_mean, norm.running_var
    act = F.relu((x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + norm.eps)
                 * norm.weight[:, None, None] + norm.bias[:, None, None])
    k = layer.inactive_channels
    outs = []
    for b in range(x.shape[0]):
        pooled = act[b].mean((1, 2))
        per_head = []
        for head in layer.head_modules():
            g = F.relu(head.fc2.weight @ F.relu(head.fc1.weight @ pooled) + head.fc2.bias)
            if k > 0:
                threshold = torch.sort(g.detach()).values[k - 1]
                g = torch.where(g.detach() <= threshold, torch.zeros_like(g), g)
            per_head.append(F.conv2d((act[b] * g[:, None, None]).unsqueeze(0), head.conv.weight, None,
                                     layer.stride, layer.padding, layer.dilation))
        stacked = torch.stack(per_head, dim=2)  # (1, C_out/heads, heads, H, W): j-major, then h
        outs.append(stacked.flatten(1, 2))
    return torch.cat(outs)


def grads(out, layer, x, seed=1):
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    params = [x] + [p for p in layer.parameters()]
    return torch.autograd.grad((out * weights).sum(), params, allow_unused=True)


def assert_same_grads(a, b):
    for ga, gb in zip(a, b):
        if ga is None or gb is None:
            assert ga is None and gb is None or (ga if ga is not None else gb).abs().max() == 0
        else:
            torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("training", [False, True])
def test_dense_path_equals_per_head_reference(name, batch, training):
    shape = SHAPES[name]
    layer = make_layer(shape, sparse=False).train(training)
    x = inputs(shape, batch)
    out, ref = layer(x), reference(layer, x)
    torch.testing.assert_close(out, ref)
    assert_same_grads(grads(out, layer, x), grads(ref, layer, x))


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("training", [False, True])
def test_sparse_path_equals_dense_path(name, batch, training):
    shape = SHAPES[name]
    layer = make_layer(shape).train(training)
    x = inputs(shape, batch)
    layer.sparse = False
    dense = layer(x)
    layer.sparse = True
    sparse = layer(x)
    torch.testing.assert_close(sparse, dense)
    assert_same_grads(grads(sparse, layer, x), grads(dense, layer, x))


def test_the_shapes_reach_both_sparse_kernels():
    def uses_matmul(name):
        cin, cout, k, s, p, d, h, w = SHAPES[name]
        layer = make_layer(SHAPES[name])
        return layer.sparse_uses_matmul(layer._out_size(h, 0) * layer._out_size(w, 1))

    assert uses_matmul("3x3") and uses_matmul("downsample1x1") and not uses_matmul("large_map")


def test_eval_uses_the_sparse_path_and_it_does_fewer_macs():
    layer = DGCConv2d(64, 64, 3, padding=1).eval()
    x = torch.randn(2, 64, 8, 8)
    called = []
    layer.forward_sparse = lambda *a: called.append(1) or DGCConv2d.forward_sparse(layer, *a)
    layer(x)
    assert called
    kept = 64 - round(64 * 0.55)
    head_fcs = 4 * 2 * 64 * (64 // 8)  # fc1 + fc2 per head, squeeze 16 halved below 80 channels
    assert dynconv.count_macs(layer, (1, 64, 8, 8)) == 64 * kept * 9 * 64 + head_fcs


def test_sparse_path_sees_weight_updates_without_autograd():
    """The eval path caches a transposed copy of the weights; an in-place update must reach it."""
    layer = make_layer(SHAPES["wide"]).eval()
    x = inputs(SHAPES["wide"], 2).detach()
    with torch.no_grad():
        before = layer(x)
        for head in layer.head_modules():
            head.conv.weight.mul_(2)
        after = layer(x)
        layer.sparse = False
        dense = layer(x)
    torch.testing.assert_close(after, 2 * before)
    torch.testing.assert_close(after, dense)


def test_ties_among_pruned_saliencies_are_pruned_too():
    saliency = torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.5, 0.9, 0.1, 0.7]], dtype=torch.float64)
    assert gate(saliency, 2).tolist() == [[0.0, 0.0, 0.0, 0.5, 0.5, 0.9, 0.1, 0.7]]
    assert gate(saliency, 4).tolist() == [[0.0, 0.0, 0.0, 0.5, 0.5, 0.9, 0.0, 0.7]]
    assert gate(saliency, 5).tolist() == [[0.0, 0.0, 0.0, 0.0, 0.0, 0.9, 0.0, 0.7]]


def official_inactive(channels: int, gate_factor: float, progress: float, previous: int) -> int:
    """zhuogege1943/dgc ``DynamicMultiHeadConv.forward`` (training), verbatim arithmetic."""
    if 1.0 / 12 < progress < 3.0 / 4:
        return round(channels * (1 - gate_factor) * 3.0 / 2 * (progress - 1.0 / 12))
    if progress >= 3.0 / 4:
        return round(channels * (1 - gate_factor))
    return previous


@pytest.mark.parametrize("channels", [64, 128, 256, 512])
def test_pruning_schedule_equals_official_per_iteration_formula(channels):
    layer = DGCConv2d(channels, channels, 1, pruning_rate=0.55)
    epochs, iters = 120, 50
    official = 0
    for it in range(epochs * iters + 1):
        progress = it / (epochs * iters)
        official = official_inactive(channels, 0.45, progress, official)
        dynconv.set_progress(layer, it / iters)
        assert layer.inactive_channels == official, (it, progress)


def test_pruning_schedule_stage_boundaries():
    schedule = dgc_pruning(120)
    assert schedule(0) == schedule(10) == 0.0  # warm-up: 1/12 of 120 epochs
    assert schedule(10.000001) > 0
    assert schedule(50) == pytest.approx(0.5)  # halfway through the 80 pruning epochs
    assert schedule(90) == schedule(120) == schedule(float("inf")) == 1.0
    layer = DGCConv2d(64, 64, 3, padding=1)
    assert layer.inactive_channels == round(64 * 0.55)  # a fresh layer is fully pruned
    dynconv.set_progress(layer, 5)
    assert layer.inactive_channels == 0


def test_inactive_count_survives_a_state_dict_round_trip():
    a, b = DGCConv2d(64, 64, 3, padding=1), DGCConv2d(64, 64, 3, padding=1)
    dynconv.set_progress(a, 40)
    b.load_state_dict(a.state_dict())
    assert b.inactive_channels == a.inactive_channels == round(64 * 0.55 * 1.5 * (40 / 120 - 1 / 12))


def test_lasso_reaches_the_loss_with_a_gradient():
    model = dynconv.create_model("resnet18", "dgc", num_classes=5)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    logits = model(x)
    layers = [m for m in model.modules() if isinstance(m, DGCConv2d)]
    assert all(layer.auxiliary_loss is not None for layer in layers)
    aux = dynconv.auxiliary_loss(model)
    # Independent: a layer's lasso is lambda * sum over heads of mean(g_h); run again capturing inputs.
    captured, expected = {}, 0.0
    hooks = [m.register_forward_pre_hook(lambda mod, inp, key=id(m): captured.__setitem__(key, inp[0]))
             for m in layers]
    model(x)
    for h in hooks:
        h.remove()
    for layer in layers:
        act = F.relu(layer.norm(captured[id(layer)]))  # train-mode BN: same batch statistics
        pooled = act.mean((2, 3))
        expected = expected + 1e-5 * sum(head(pooled).mean() for head in layer.head_modules())
    torch.testing.assert_close(aux, expected)
    loss = F.cross_entropy(logits, y) + aux
    loss.backward()
    fc2_bias = layers[0].headconv_0.fc2.bias
    assert fc2_bias.grad is not None and fc2_bias.grad.abs().sum() > 0
    model.zero_grad()
    dynconv.auxiliary_loss(model).backward()  # the lasso alone has a gradient of its own
    assert layers[-1].headconv_3.fc1.weight.grad.abs().sum() > 0
    model.eval()
    model(x)
    assert dynconv.auxiliary_loss(model).item() == 0.0  # eval forwards record nothing


def test_resnet18_layout_follows_the_official_model():
    model = dynconv.create_model("resnet18", "dgc")
    dgc = [n for n, m in model.named_modules() if isinstance(m, DGCConv2d)]
    assert len(dgc) == 16 + 3 and "layer2.0.downsample.0" in dgc and "conv1" not in dgc
    keys = model.state_dict()
    assert keys["layer1.0.conv1.headconv_0.conv.weight"].shape == (16, 64, 3, 3)
    assert keys["layer4.0.conv2.headconv_3.fc1.weight"].shape == (32, 512)  # 512 / 16
    assert keys["layer1.0.conv1.headconv_0.fc1.weight"].shape == (8, 64)  # 64 / (16 / 2)
    assert keys["layer3.0.downsample.0._inactive_channels"].item() == round(128 * 0.55)
    layer = model.layer1[0].conv1
    assert layer.norm is not None and layer.heads == 4


def test_total_epochs_option_sets_the_schedule_length():
    model = dynconv.create_model("resnet18", "dgc", total_epochs=12)
    dynconv.set_progress(model, 1.0)  # 1/12 of 12 epochs: still warm-up
    assert all(m.inactive_channels == 0 for m in model.modules() if isinstance(m, DGCConv2d))
    dynconv.set_progress(model, 9.0)
    assert model.layer1[0].conv1.inactive_channels == round(64 * 0.55)


def test_rejects_widths_that_do_not_divide_by_heads():
    with pytest.raises(ValueError, match="divisible by heads"):
        DGCConv2d(6, 8, 3)
    with pytest.raises(ValueError, match="groups=1"):
        DGCConv2d(8, 8, 3, groups=2)


def test_generic_cnn_keeps_indivisible_and_grouped_convs_static():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 3), nn.Conv2d(6, 8, 3),
                          nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1))
    report = dynconv.convert(model, "dgc")
    assert [name for name, _ in report.replaced] == ["4"]
    assert model(torch.randn(2, 3, 12, 12)).shape == (2, 16, 4, 4)
