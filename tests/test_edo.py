"""EDO: planted kernels select their dilation, the supernet preserves the network, a tiny search runs end to end."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

from dynconv import edo
from dynconv.ops.icconv import InceptionConv2d, dilation_grid, load_patterns


def planted(base_k, grid, per_pattern=2, c_in=3, dtype=torch.float64):
    """Dense kernels whose channel ``c`` is non-zero exactly on the taps of dilation ``c % P``: taps at
    ``centre + i * d`` for ``i`` in ``-(k-1)/2 .. (k-1)/2``, values away from zero."""
    dilations = dilation_grid(grid)
    d_max = max(max(d) for d in dilations)
    size = (base_k - 1) * d_max + 1
    centre, r = (size - 1) // 2, (base_k - 1) // 2
    weight = torch.zeros(per_pattern * len(dilations), c_in, size, size, dtype=dtype)
    for c in range(weight.shape[0]):
        dh, dw = dilations[c % len(dilations)]
        for i in range(-r, r + 1):
            for j in range(-r, r + 1):
                values = torch.empty(c_in, dtype=dtype).uniform_(0.5, 1.5) * (torch.randint(0, 2, (c_in,)) * 2 - 1)
                weight[c, :, centre + i * dh, centre + j * dw] = values
    return weight


@pytest.mark.parametrize("base_k, grid", [(3, "k9"), (3, "k13"), (5, "k9")])
def test_planted_kernels_select_their_dilation(base_k, grid):
    weight = planted(base_k, grid)
    errors = edo.dilation_errors(weight, (base_k, base_k), grid)
    num = len(dilation_grid(grid))
    truth = torch.arange(weight.shape[0]) % num
    assert torch.equal(errors.argmin(1), truth)
    assert torch.equal(errors[torch.arange(len(truth)), truth], torch.zeros(len(truth), dtype=weight.dtype))
    # the criterion, spelled out for a few (channel, dilation) pairs: L1 norm of K minus K on the taps
    masks = edo.tap_masks((base_k, base_k), grid)
    for c, p in ((0, 1), (5, 0), (len(truth) - 1, num - 1)):
        assert torch.isclose(errors[c, p], (weight[c] * ~masks[p]).abs().sum())


def test_select_groups_channels_by_dilation():
    conv = edo.SupernetConv2d(3, 32, (3, 3), 4)
    with torch.no_grad():
        conv.weight.copy_(planted(3, "k9").flip(0))  # channel c planted with dilation 15 - c % 16
    result = edo.select_dilations(nn.Sequential(conv), "k9")
    layer = result.layers[0]
    assert layer.pattern == {d: 2 for d in dilation_grid("k9")}
    assert torch.equal(layer.assignment, 15 - torch.arange(32) % 16)
    assert torch.equal(layer.assignment[layer.order], torch.arange(32) // 2)
    assert torch.all(layer.relative_error == 0)


def test_grouped_layers_choose_per_group():
    conv = edo.SupernetConv2d(4, 8, (3, 3), 4, groups=2)  # 4 output channels per group
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:3, :, 4, 6] = 1.0  # group 0 mostly on dilation (1, 2)'s taps
        conv.weight[3, :, 4, 5] = 5.0   # one channel of it on (1, 1)'s
        conv.weight[4:, :, 0, 4] = 1.0  # group 1 on (4, 1)'s
    layer = edo.select_dilations(nn.Sequential(conv), "k9").layers[0]
    assert layer.pattern == {(1, 1): 4, (4, 1): 4}


def test_supernet_starts_as_the_original_network():
    model = timm.create_model("resnet18", num_classes=5, channels=(8, 16, 32, 64), stem_width=8)
    generic = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, 2, 1, groups=8),
                            nn.Conv2d(8, 6, 5, padding=2), nn.Conv2d(6, 6, 3, padding=0, bias=True))
    for net, names, size in ((model, 16, 32), (generic, 3, 15)):
        net.eval()
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            before = net(x)
        assert len(edo.build_supernet(net, "k9")) == names
        with torch.no_grad():
            torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-5)
    conv = generic[2]
    assert isinstance(conv, edo.SupernetConv2d) and conv.kernel_size == (17, 17) and conv.padding == (8, 8)


def test_kaiming_supernet_spreads_mass_over_the_grid():
    conv = nn.Conv2d(8, 16, 3, padding=1)
    dense = edo.SupernetConv2d.from_conv(conv, 4, init="kaiming")
    outside = dense.weight.detach().abs()[:, :, ~edo.tap_masks((3, 3))[0]]
    assert outside.min() > 0 and abs(dense.weight.std().item() / (2 / (16 * 81)) ** 0.5 - 1) < 0.1
    torch.testing.assert_close(dense.bias, conv.bias)
    with pytest.raises(ValueError, match="unknown supernet init"):
        edo.SupernetConv2d.from_conv(conv, 4, init="zeros")


def test_inherited_layer_reproduces_a_planted_supernet_layer():
    conv = edo.SupernetConv2d(3, 32, (3, 3), 4, stride=(2, 2), bias=True).double()
    with torch.no_grad():
        conv.weight.copy_(planted(3, "k9"))
        conv.bias.uniform_(-1, 1)
    layer = edo.select_dilations(nn.Sequential(conv)).layers[0]
    ic = edo.inherit_layer(conv, layer)
    assert isinstance(ic, InceptionConv2d) and list(ic.pattern) == dilation_grid("k9")
    x = torch.randn(2, 3, 17, 19, dtype=torch.float64)
    torch.testing.assert_close(ic(x), conv(x)[:, layer.order])


def test_tiny_search_end_to_end(tmp_path):
    from dynconv.data import synthetic_datasets

    train, _ = synthetic_datasets(tmp_path / "data", num_classes=4, train_per_class=16, val_per_class=2,
                                  image_size=24)
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))

    def tiny():
        return timm.create_model("resnet18", num_classes=4, channels=(8, 8, 16, 16), stem_width=8)

    model = tiny()
    result = edo.search(model, loader, "k9", steps=8, lr=0.05)
    assert len(result.layers) == 16 and all(sum(p.values()) == w for p, w in
                                            zip(result.patterns, [8] * 8 + [16] * 8))
    path = result.save(tmp_path / "patterns.json")
    raw = json.loads(path.read_text())
    assert len(raw) == 16 and all(len(entry) == 16 for entry in raw)
    patterns = load_patterns(path)
    assert patterns == result.patterns
    assert sum(result.histogram().values()) == 8 * 8 + 16 * 8
    fresh = tiny()
    assert len(edo.build_icconv(fresh, patterns)) == 16
    fresh.eval()
    with torch.no_grad():
        assert fresh(train[0][0][None]).shape == (1, 4)


def test_selection_needs_a_supernet():
    with pytest.raises(ValueError, match="build_supernet"):
        edo.select_dilations(nn.Sequential(nn.Conv2d(3, 3, 3)))
