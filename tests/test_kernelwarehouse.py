"""KernelWarehouse: official parameter counts and warehouse layouts, kernel assembly against a slow
reference, the tau = 1 static-network equivalence, and the shared-bank plumbing (deepcopy, state dict)."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import dynconv
from dynconv.ops.kernelwarehouse import KWAttention, KWConv2d, KWLinear

# Parameter counts of the official kw_* models (OSVAI/KernelWarehouse), in millions.
OFFICIAL_PARAMS = [
    ("kw_1d4x", "resnet18", 4.03),
    ("kw_1d2x", "resnet18", 7.43),
    ("kw_1x", "resnet18", 11.93),
    ("kw_2x", "resnet18", 23.24),
    ("kw_4x", "resnet18", 45.86),
    ("kw_1d2x", "resnet50", 17.64),
    ("kw_1x", "resnet50", 28.05),
    ("kw_4x", "resnet50", 102.02),
    ("kw_1x", "convnext_tiny", 39.37),
    ("kw_1x", "mobilenetv2_100", 5.17),
    ("kw_4x", "mobilenetv2_100", 11.38),
    ("kw_1d2x", "mobilenetv2_100", 2.65),
    ("kw_1x", "mobilenetv2_050", 2.85),
    ("kw_4x", "mobilenetv2_050", 4.65),
    ("kw_1d2x", "mobilenetv2_050", 1.47),
]

# OSVAI/KernelWarehouse modules/kernel_warehouse.py Warehouse_Manager.store() with configs/resnet*/kw*.json: (n, cell channels) per stage warehouse of kw_resnet18 / kw_resnet50.
RESNET18_WAREHOUSES = {
    "kw_1d4x": [(56, 32), (47, 64), (47, 128), (27, 256)],
    "kw_1d2x": [(112, 32), (94, 64), (94, 128), (54, 256)],
    "kw_1x": [(56, 64), (47, 128), (47, 256), (27, 512)],
    "kw_2x": [(112, 64), (94, 128), (94, 256), (54, 512)],
    "kw_4x": [(224, 64), (188, 128), (188, 256), (108, 512)],
}
RESNET50_WAREHOUSES = {
    "kw_1x": [(87, 64), (104, 128), (138, 256), (47, 512)],
    "kw_4x": [(348, 64), (416, 128), (552, 256), (188, 512)],
}


def meta_model(arch: str, conv: str, **kwargs) -> nn.Module:
    """Structure only (no memory, no init): enough for parameter counts and layouts."""
    with torch.device("meta"):
        return dynconv.create_model(arch, conv, **kwargs)


def kw_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, KWConv2d)]


# --------------------------------------------------------------------------- official layouts


@pytest.mark.parametrize("conv,arch,millions", OFFICIAL_PARAMS)
def test_param_count_matches_official(conv, arch, millions):
    model = meta_model(arch, conv)
    assert round(dynconv.count_params(model) / 1e6, 2) == millions
    bank_shapes = [tuple(w.shape) for w in model.warehouse_manager.weights]
    if arch == "resnet18":
        assert bank_shapes == [(n, c, c, 1, 1) for n, c in RESNET18_WAREHOUSES[conv]]
    if arch == "resnet50" and conv in RESNET50_WAREHOUSES:
        assert bank_shapes == [(n, c, c, 1, 1) for n, c in RESNET50_WAREHOUSES[conv]]


def test_resnet_membership_follows_handover_rules():
    model = meta_model("resnet18", "kw_1x")
    member = {n: m.warehouse_id for n, m in kw_layers(model)}
    assert [n for n, w in member.items() if w == 0] == [
        "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
        "layer2.0.conv1", "layer2.0.downsample.0",
    ]
    assert [n for n, w in member.items() if w == 3] == ["layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    # Bottleneck: the stage-0 hand-over conv and the stride-1 downsample stay plain.
    r50 = meta_model("resnet50", "kw_1x")
    assert type(r50.layer1[0].conv1) is nn.Conv2d and type(r50.layer1[0].downsample[0]) is nn.Conv2d
    assert isinstance(r50.layer2[0].downsample[0], KWConv2d) and r50.layer2[0].downsample[0].warehouse_id == 0
    assert r50.layer2[0].conv1.warehouse_id == 0 and r50.layer2[0].conv2.warehouse_id == 1


def test_mobilenetv2_and_convnext_warehouses():
    one = meta_model("mobilenetv2_050", "kw_1x")
    assert one.warehouse_manager.warehouse_names[:4] == [
        "stage0_conv0", "stage1_layer_dwconv0", "stage1_layer_pwconv", "stage2_layer_pwconv",
    ]
    assert all(isinstance(m, KWConv2d) for m in (one.conv_stem, one.conv_head, one.blocks[1][0].conv_pw))
    assert one.conv_head.warehouse_id == one.blocks[6][0].conv_pwl.warehouse_id
    assert len(one.warehouse_manager.weights) == 13
    assert one.blocks[0][0].conv_dw.attention.schedule.epochs == 15  # MobileNetV2 configs: temp_epoch 15
    four = meta_model("mobilenetv2_050", "kw_4x")
    assert len(four.warehouse_manager.weights) == 19
    assert four.blocks[2][1].conv_pw.warehouse_id != four.blocks[2][1].conv_pwl.warehouse_id

    half = meta_model("mobilenetv2_100", "kw_1d2x")
    assert len(half.warehouse_manager.weights) == 10
    assert type(half.blocks[5][0].conv_pw) is nn.Conv2d and isinstance(half.blocks[5][1].conv_pw, KWConv2d)
    assert isinstance(half.classifier, KWLinear)
    keys = half.state_dict()
    assert tuple(keys["classifier.conv.attention.fc1.weight"].shape) == (40, 1280)  # reduction 1/32
    assert tuple(keys["warehouse_manager.weights.9"].shape) == (20, 1000, 32, 1)

    cnx = meta_model("convnext_tiny", "kw_1x")
    assert cnx.warehouse_manager.warehouse_names == [
        "stagestem_conv0", "stage0_layer_conv0", "stage1_layer_conv0", "stage2_layer_conv0",
        "stage0_layer_dwconv0", "stage0_layer_pwconv", "stage1_layer_dwconv0", "stage1_layer_pwconv",
        "stage2_layer_dwconv0", "stage2_layer_pwconv", "stage3_layer_dwconv0", "stage3_layer_pwconv",
    ]
    block = cnx.stages[0].blocks[0]
    assert isinstance(block.conv_dw.attention.norm1, nn.LayerNorm) and block.conv_dw.attention.fc1.bias is not None
    assert block.mlp.fc1.bias is not None and block.mlp.fc1.warehouse_id == block.mlp.fc2.warehouse_id == 5


def test_nonlocal_basis_in_kw1d2x_resnet50():
    model = meta_model("resnet50", "kw_1d2x")
    att = model.layer2[1].conv2.attention
    assert att.fc3 is not None and att.basis_bias is not None and att.fc2.bias is None
    assert "layer2.1.conv2.attention.basis_bias" in model.state_dict()


@pytest.mark.parametrize("conv,arch", [("kw_1d4x", "resnet18"), ("kw_2x", "resnet18"), ("kw_1d2x", "mobilenetv2_050")])
def test_allocated_slices_cover_each_warehouse(conv, arch):
    model = dynconv.create_model(arch, conv, num_classes=10)
    manager = model.warehouse_manager
    ranges = {i: [] for i in range(len(manager.weights))}
    for _, layer in kw_layers(model):
        ranges[layer.warehouse_id].append(layer.cell_range)
        beta = layer.attention.temp_bias
        assert torch.equal(beta.sum(1), torch.ones(layer.num_mixtures))  # one target per mixture
        owned = [int(c) for c in beta[:, :-1].nonzero()[:, 1]]  # cells the layer equals at tau = 1
        start, stop = layer.cell_range
        assert owned[0] == start and len(set(owned)) == len(owned) and all(start <= c < stop for c in owned)
    for idx, spans in ranges.items():
        end = 0
        for start, stop in spans:  # modules() order: contiguous, in order, no overlap
            assert start == end and stop > start
            end = stop
        assert end == manager.weights[idx].shape[0]


# --------------------------------------------------------------------------- layer vs slow reference


def place_cells(cell_of_mixture, bank, layer):
    """Kernel built cell by cell: mixture j = s*(Go*Gi) + o*Gi + i fills block (o, i) at tap s."""
    c_out, c_in = bank.shape[1:3]
    g_out, g_in = layer.out_channels // c_out, layer.in_channels // layer.groups // c_in
    kh, kw = layer.kernel_size
    kernel = bank.new_zeros(layer.out_channels, layer.in_channels // layer.groups, kh, kw)
    for j in range(layer.num_mixtures):
        s, rest = divmod(j, g_out * g_in)
        o, i = divmod(rest, g_in)
        kernel[o * c_out:(o + 1) * c_out, i * c_in:(i + 1) * c_in, s // kw, s % kw] = cell_of_mixture(j)
    return kernel


def reference_kernel(attention_row_block, bank, layer):
    """One sample's kernel: cell j = sum_t alpha[j, t] * bank[t], summed in a Python loop."""
    c_out, c_in = bank.shape[1:3]

    def cell(j):
        return sum(attention_row_block[j, t] * bank[t].reshape(c_out, c_in) for t in range(bank.shape[0]))

    return place_cells(cell, bank, layer)


def reference_forward(layer: KWConv2d, x: torch.Tensor) -> torch.Tensor:
    att = layer.attention(x)
    bank = layer.warehouse_manager.weights[0]
    m = layer.num_mixtures
    outs = []
    for b in range(x.shape[0]):
        kernel = reference_kernel(att[b * m:(b + 1) * m], bank, layer)
        outs.append(F.conv2d(x[b:b + 1], kernel, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outs)


LAYER_CASES = [
    # in, out, k, stride, padding, dilation, groups, (cell_num, cell_in, cell_out), batch
    (4, 6, 3, 2, 1, 1, 1, (1, 1, 1), 3),
    (4, 6, 3, 1, 2, 2, 2, (2, 0.5, 0.5), 3),
    (6, 6, 3, 1, 1, 1, 6, (1, 1, 1), 3),
    (8, 4, 1, 1, 0, 1, 1, (0.5, 0.5, 0.5), 1),
    (3, 4, 5, 1, 2, 1, 1, (4, 1, 1), 1),
    (8, 8, 3, 2, 1, 1, 1, (0.25, 0.5, 0.5), 3),
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: f"k{c[2]}s{c[3]}d{c[5]}g{c[6]}r{c[7][0]}b{c[8]}")
def test_kwconv2d_matches_slow_reference(case):
    cin, cout, k, stride, padding, dilation, groups, (num, rin, rout), batch = case
    layer = KWConv2d(cin, cout, k, stride, padding, dilation, groups, bias=True, cell_num_ratio=num,
                     cell_inplane_ratio=rin, cell_outplane_ratio=rout).double()
    with torch.no_grad():
        layer.bias.normal_()
    layer.attention.set_schedule_value(0.3)  # exercise both terms of the attention function
    x1 = torch.randn(batch, cin, 7, 9, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = layer(x1), reference_forward(layer, x2)
    assert y1.shape == y2.shape == F.conv2d(x1, torch.zeros(cout, cin // groups, k, k, dtype=torch.float64),
                                            None, stride, padding, dilation, groups).shape
    torch.testing.assert_close(y1, y2)
    grad = torch.randn_like(y1)
    params = [layer.warehouse_manager.weights[0], layer.bias, layer.attention.fc2.weight]
    g1 = torch.autograd.grad(y1, [x1, *params], grad)
    g2 = torch.autograd.grad(y2, [x2, *params], grad)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_attention_function_formula():
    att = KWAttention(8, num_cells=5, num_mixtures=3).double().eval()
    att.assign_cells(1, 1)
    att.set_schedule_value(0.25)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    h = att.act1(att.norm1(att.fc1(x.mean((2, 3)))))
    z = att.fc2(h).reshape(2, 3, 6)
    want = torch.empty(2, 3, 5, dtype=torch.float64)
    for b in range(2):
        for j in range(3):
            denom = sum(abs(z[b, j, p]) for p in range(6)) + 1e-3
            for t in range(5):
                beta = 1.0 if t == 1 + j else 0.0
                want[b, j, t] = 0.75 * z[b, j, t] / denom + 0.25 * beta
    torch.testing.assert_close(att(x), want.reshape(6, 5))


def test_nonlocal_basis_places_local_logits_at_own_cells():
    att = KWAttention(8, num_cells=40, num_mixtures=4, cell_num_ratio=1, nonlocal_basis_ratio=0.0625, start_cell=10)
    att.eval()
    assert att.num_local_cells == 4 and att.num_basis == 16 and tuple(att.fc3.weight.shape) == (36, 16)
    with torch.no_grad():
        att.fc3.weight.zero_()
    alpha = att(torch.randn(2, 8, 3, 3)).reshape(2, 4, 40)
    outside = torch.cat([alpha[..., :10], alpha[..., 14:]], -1)
    assert torch.count_nonzero(outside) == 0 and torch.count_nonzero(alpha[..., 10:14]) > 0


def test_kwlinear_matches_reference():
    layer = KWLinear(12, 5, cell_num_ratio=0.5, cell_inplane_ratio=0.5).double()
    with torch.no_grad():
        layer.conv.bias.normal_()
    for shape in ((3, 12), (2, 4, 12)):
        x = torch.randn(*shape, dtype=torch.float64)
        tokens = x.reshape(shape[0], -1, 12)
        att = layer.conv.attention(tokens.transpose(1, 2).unsqueeze(-1))
        bank = layer.conv.warehouse_manager.weights[0]
        assert bank.dim() == 4  # 1-D cells, as the official KWConv1d
        m = layer.conv.num_mixtures
        want = torch.stack([
            tokens[b] @ reference_kernel(att[b * m:(b + 1) * m], bank, layer.conv)[:, :, 0, 0].T + layer.conv.bias
            for b in range(shape[0])
        ]).reshape(*shape[:-1], 5)
        torch.testing.assert_close(layer(x), want)


def test_from_conv_is_standalone_drop_in():
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
    layer = KWConv2d.from_conv(conv)
    assert layer.bias is None and layer(torch.randn(2, 4, 10, 10)).shape == conv(torch.randn(2, 4, 10, 10)).shape
    assert tuple(layer.state_dict()["warehouse_manager.weights.0"].shape) == (9, 8, 4, 1, 1)
    assert float(layer.attention.temperature) == 0.0  # a fresh layer evaluates with tau = 0


# --------------------------------------------------------------------------- whole networks


def assigned_static_kernel(layer: KWConv2d) -> torch.Tensor:
    """The static kernel a KW layer equals at tau = 1: mixture j takes the cell its beta points at."""
    beta = layer.attention.temp_bias
    bank = layer.warehouse_manager_ref.weights[layer.warehouse_id].detach()
    c_out, c_in = bank.shape[1:3]
    zero_cell = beta.shape[1] - 1

    def cell(j):
        t = int(beta[j].argmax())
        return bank.new_zeros(c_out, c_in) if t == zero_cell else bank[t].reshape(c_out, c_in)

    return place_cells(cell, bank, layer)


@pytest.mark.parametrize("conv", ["kw_1x", "kw_2x"])
def test_tau_one_equals_static_network_of_assigned_cells(conv):
    kw = dynconv.create_model("resnet18", conv, num_classes=10).double().eval()
    static = timm.create_model("resnet18", num_classes=10).double().eval()
    state = {k: v for k, v in kw.state_dict().items() if k in static.state_dict()}
    for name, layer in kw_layers(kw):
        state[f"{name}.weight"] = assigned_static_kernel(layer)
    static.load_state_dict(state, strict=True)
    dynconv.set_progress(kw, 0.0)  # tau = 1
    assert all(float(layer.attention.temperature) == 1.0 for _, layer in kw_layers(kw))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(kw(x), static(x))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def test_generic_cnn_batch_one_training_step_and_progress():
    model = small_cnn()
    report = dynconv.convert(model, "kw_1x")
    assert [n for n, _ in report.replaced] == ["3", "6", "8"]
    assert model.warehouse_manager.warehouse_names == ["stage0_layer_conv", "stage1_layer_dwconv0",
                                                      "stage1_layer_conv"]
    dynconv.set_progress(model, 5.0)
    assert float(model[3].attention.temperature) == pytest.approx(0.75)
    model.train()
    before = [w.detach().clone() for w in model.warehouse_manager.weights]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(model(torch.randn(1, 3, 16, 16)), torch.tensor([3]))
    loss.backward()
    assert all(w.grad is not None and torch.isfinite(w.grad).all() for w in model.warehouse_manager.weights)
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.warehouse_manager.weights))
    dynconv.set_progress(model, 100.0)
    assert float(model[3].attention.temperature) == 0.0


def test_deepcopy_keeps_shared_links_inside_the_copy():
    model = small_cnn()
    dynconv.convert(model, "kw_1x")
    model.eval()
    twin = copy.deepcopy(model)
    for (_, a), (_, b) in zip(kw_layers(model), kw_layers(twin)):
        assert a.warehouse_manager_ref is model.warehouse_manager
        assert b.warehouse_manager_ref is twin.warehouse_manager
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = model(x)
        for w in twin.warehouse_manager.weights:
            w.mul_(2.0)
        torch.testing.assert_close(model(x), y)
        assert not torch.allclose(twin(x), y)


def test_state_dict_has_official_keys_and_no_aliases():
    model = dynconv.create_model("resnet18", "kw_1x", num_classes=10)
    assert dynconv.count_params(model) == sum(p.numel() for p in model.parameters())
    state = model.state_dict()
    assert tuple(state["warehouse_manager.weights.0"].shape) == (56, 64, 64, 1, 1)
    assert tuple(state["layer1.0.conv1.attention.fc1.weight"].shape) == (16, 64)
    assert tuple(state["layer1.0.conv1.attention.fc2.weight"].shape) == (513, 16)
    assert tuple(state["layer4.0.conv2.attention.fc2.weight"].shape) == (252, 32)
    # tau is schedule state, saved since issue 17 (temp_bias follows from the cell assignment); the official
    # layout has neither
    assert not any("temp_bias" in k for k in state) and "layer1.0.conv1.attention.temperature" in state
    assert not any("temp_bias" in k or "temperature" in k for k in dynconv.export_official(model)["model"])
    assert all(k.startswith("warehouse_manager.weights.") for k in state if "warehouse_manager" in k)
    ptrs = [v.data_ptr() for v in state.values() if v.numel()]
    assert len(ptrs) == len(set(ptrs))
    fresh = dynconv.create_model("resnet18", "kw_1x", num_classes=10)
    fresh.load_state_dict(state, strict=True)


def test_cells_contracted_directly_equal_the_assembled_kernels(monkeypatch):
    """On the matmul path a KW layer convolves with its cells tap by tap (functional.cell_conv2d); the
    outputs and every gradient equal those of the assembled kernels on the grouped path."""
    from dynconv.ops import functional, kernelwarehouse

    calls, original = [], functional.cell_conv2d

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(functional, "cell_conv2d", spy)
    torch.manual_seed(0)
    model = dynconv.create_model("resnet18", "kw_1x", num_classes=5).double().train()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    results, counts = [], []
    for path in (None, "grouped"):
        model.zero_grad()
        with functional.forced_path(path) if path else torch.enable_grad():
            out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        counts.append(len(calls))
    assert counts[0] >= 12 and counts[1] == counts[0]  # every 3x3 layer on maps of <= 16x16, then none
    torch.testing.assert_close(results[0][0], results[1][0])
    assert len(results[0][1]) == len(results[1][1])
    for ours, assembled in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(ours, assembled)
