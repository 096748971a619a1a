"""EDO (Liu et al., "Inception Convolution with Efficient Dilation Search", CVPR 2021, Section 3.2):
planted kernels select their dilation under both criteria, the expected-output error equals a brute-force
average of real dilated convs, the criteria disagree where the input statistics matter, the supernet
preserves the network, a tiny search runs end to end."""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from dynconv import edo
from dynconv.ops.icconv import InceptionConv2d
from dynconv.patterns import dilation_grid, load_patterns


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
    result = edo.select_dilations(nn.Sequential(conv), "k9", criterion="weight")
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
    layer = edo.select_dilations(nn.Sequential(conv), "k9", criterion="weight").layers[0]
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
    layer = edo.select_dilations(nn.Sequential(conv), criterion="weight").layers[0]
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
    assert result.criterion == "expected_output"
    assert all(m.input_mean is not None for _, m in edo.supernet_layers(model))
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


# ---------------------------------------------------------------------------------------------------
# The paper's criterion (Section 3.2): L1 distance between E[W * X] and E[W_p * X], W_p = W cropped to the
# taps of dilation p, with E over the data.


def _batches(x, size):
    """``(images, labels)`` batches of ``x``, as a DataLoader gives them."""
    return [(x[i:i + size], torch.zeros(len(x[i:i + size]), dtype=torch.long)) for i in range(0, len(x), size)]


def _brute_force_errors(conv, x, grid):
    """``[C_out, P]``: for every grid dilation, the real dilated conv (kernel cropped from the supernet,
    dilation ``d``, padding ``p + (d - d0)(k - 1) / 2``), run on every sample; the L1 norm over the output
    map of the difference between the sample-averaged outputs of the supernet layer and of that conv."""
    k, masks = conv.base_kernel_size, edo.tap_masks(conv.base_kernel_size, grid)
    with torch.no_grad():
        full = conv(x).mean(0)
        errors = []
        for p, d in enumerate(dilation_grid(grid)):
            cropped = conv.weight[:, :, masks[p]].reshape(*conv.weight.shape[:2], *k)
            pad = [b + (dd - d0) * (kk - 1) // 2 for b, dd, d0, kk in zip(conv.base_padding, d, conv.base_dilation, k)]
            dilated = F.conv2d(x, cropped, conv.bias, conv.stride, pad, d, conv.groups).mean(0)
            errors.append((full - dilated).abs().sum((1, 2)))
    return torch.stack(errors, 1)


@pytest.mark.parametrize("c_in, c_out, stride, groups, grid, size", [
    (3, 5, 1, 1, "k9", (11, 13)),
    (4, 6, 2, 2, "k9", (12, 9)),
    (2, 3, 1, 1, "k13", (15, 14)),
])
def test_expected_output_errors_equal_brute_force_average(c_in, c_out, stride, groups, grid, size):
    torch.manual_seed(0)
    d_max = max(max(d) for d in dilation_grid(grid))
    conv = edo.SupernetConv2d(c_in, c_out, (3, 3), d_max, stride=(stride, stride), groups=groups, bias=True).double()
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    # Inputs with a mean that varies over channels and positions (a ramp), so borders and position matter.
    ramp = torch.linspace(-1, 2, size[0] * size[1], dtype=torch.float64).view(1, 1, *size)
    x = torch.randn(7, c_in, *size, dtype=torch.float64) + ramp * torch.arange(1, c_in + 1).view(1, -1, 1, 1)
    seen = edo.collect_input_means(nn.Sequential(conv), _batches(x, 3), batches=None)
    assert seen == 7
    torch.testing.assert_close(conv.input_mean, x.mean(0))  # batches of 3, 3, 1 weighted by their size
    errors = edo.expected_output_errors(conv.weight, conv.input_mean, (3, 3), grid, conv.stride, conv.padding, groups)
    torch.testing.assert_close(errors, _brute_force_errors(conv, x, grid), rtol=1e-10, atol=1e-10)
    # chunked evaluation (a few values per chunk) gives the same numbers
    small = edo.expected_output_errors(conv.weight, conv.input_mean, (3, 3), grid, conv.stride, conv.padding, groups,
                                       max_elements=1)
    torch.testing.assert_close(small, errors, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grid, per_pattern", [("k9", 2), ("k13", 1)])
def test_expected_output_criterion_selects_planted_dilation(grid, per_pattern):
    """Channel ``c`` non-zero exactly on the taps of dilation ``c % P`` with positive weights, inputs with
    positive mean: the planted dilation reproduces the expected output exactly, any other misses a tap
    with positive expected response, so the selection is unambiguous."""
    torch.manual_seed(1)
    weight = planted(3, grid, per_pattern).abs()
    conv = edo.SupernetConv2d(3, weight.shape[0], (3, 3), (weight.shape[-1] - 1) // 2).double()
    with torch.no_grad():
        conv.weight.copy_(weight)
    x = torch.rand(6, 3, 16, 16, dtype=torch.float64) + 0.5
    model = nn.Sequential(conv)
    edo.collect_input_means(model, _batches(x, 2))
    layer = edo.select_dilations(model, grid).layers[0]
    num = len(dilation_grid(grid))
    truth = torch.arange(weight.shape[0]) % num
    assert torch.equal(layer.assignment, truth)
    assert torch.all(layer.relative_error == 0)
    errors = edo.expected_output_errors(conv.weight, conv.input_mean, (3, 3), grid, conv.stride, conv.padding)
    off_truth = errors[torch.nn.functional.one_hot(truth, num) == 0]
    assert off_truth.min() > 0


def test_criteria_disagree_on_taps_that_see_zero_mean_input():
    """Large weights on the outer taps of dilation (3, 3), but on an input channel whose mean is zero;
    small weights on dilation (1, 1)'s taps of a channel with mean 1. The weight criterion keeps the
    heavy taps, (3, 3); in expectation those taps contribute nothing, the expected output is exactly the
    (1, 1) crop's and the paper's criterion chooses (1, 1)."""
    conv = edo.SupernetConv2d(2, 1, (3, 3), 4).double()
    masks = edo.tap_masks((3, 3))
    grid = dilation_grid("k9")
    small, large = masks[grid.index((1, 1))], masks[grid.index((3, 3))] & ~masks[grid.index((1, 1))]
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0][small] = 0.5
        conv.weight[0, 1][large] = 5.0
    noise = torch.randn(4, 2, 12, 12, dtype=torch.float64)
    x = torch.cat([noise, -noise])  # antithetic pairs: the sample mean of the noise is exactly zero
    x[:, 0] += 1.0
    model = nn.Sequential(conv)
    edo.collect_input_means(model, _batches(x, 4))
    by_weight = edo.select_dilations(model, criterion="weight").layers[0]
    by_output = edo.select_dilations(model).layers[0]
    assert grid[by_weight.assignment.item()] == (3, 3)
    assert grid[by_output.assignment.item()] == (1, 1) and by_output.relative_error.item() == 0
    # and the (1, 1) crop does reproduce the average output, the (3, 3) crop does not
    brute = _brute_force_errors(conv, x, "k9")[0]
    assert brute[grid.index((1, 1))] < 1e-12 < brute[grid.index((3, 3))]


def test_criteria_disagree_on_taps_that_only_see_padding():
    """A 2x2 input (the last ResNet stage at 64 px): every supernet tap more than one pixel from the
    centre reads the zero padding, so dilation (1, 1) reproduces the expected output exactly, whatever
    mass training left on the far taps (weight criterion: (4, 4))."""
    conv = edo.SupernetConv2d(3, 1, (3, 3), 4).double()
    masks = edo.tap_masks((3, 3))
    grid = dilation_grid("k9")
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0][:, masks[grid.index((1, 1))]] = 0.2
        conv.weight[0][:, masks[grid.index((4, 4))]] += 3.0
    x = torch.rand(4, 3, 2, 2, dtype=torch.float64) + 0.5
    model = nn.Sequential(conv)
    edo.collect_input_means(model, _batches(x, 4))
    assert grid[edo.select_dilations(model, criterion="weight").layers[0].assignment.item()] == (4, 4)
    errors = edo.expected_output_errors(conv.weight, conv.input_mean, (3, 3), "k9", padding=conv.padding)[0]
    torch.testing.assert_close(errors, _brute_force_errors(conv, x, "k9")[0], rtol=1e-10, atol=1e-12)
    assert errors[grid.index((1, 1))] == 0 and errors[grid.index((4, 4))] > 0
    assert grid[edo.select_dilations(model).layers[0].assignment.item()] == (1, 1)


def test_expected_output_grouped_layers_choose_per_group():
    """Depthwise-style layer, 2 channels per group: the group's summed expected-output errors decide."""
    conv = edo.SupernetConv2d(4, 4, (3, 3), 4, groups=2).double()
    masks, grid = edo.tap_masks((3, 3)), dilation_grid("k9")
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, :, masks[grid.index((2, 2))]] = 1.0   # group 0: (2, 2) for both channels,
        conv.weight[1, :, masks[grid.index((2, 2))]] = 1.0
        conv.weight[1, :, masks[grid.index((1, 3))]] += 0.01  # one with a little (1, 3) mass
        conv.weight[2:, :, masks[grid.index((4, 1))]] = 1.0  # group 1: (4, 1)
    x = torch.rand(2, 4, 20, 20, dtype=torch.float64) + 1
    model = nn.Sequential(conv)
    edo.collect_input_means(model, _batches(x, 2))
    assert edo.select_dilations(model).layers[0].pattern == {(2, 2): 2, (4, 1): 2}


def test_expected_output_needs_statistics_of_fixed_size():
    conv = edo.SupernetConv2d(3, 4, (3, 3), 4)
    model = nn.Sequential(conv)
    with pytest.raises(ValueError, match="collect_input_means"):
        edo.select_dilations(model)
    with pytest.raises(ValueError, match="unknown criterion"):
        edo.select_dilations(model, criterion="l2")
    batches = [(torch.randn(2, 3, 8, 8), torch.zeros(2)), (torch.randn(2, 3, 10, 10), torch.zeros(2))]
    with pytest.raises(ValueError, match="fixed-size"):
        edo.collect_input_means(model, batches)
    # the pass leaves train / eval flags as they were
    model.train()
    edo.collect_input_means(model, batches[:1])
    assert model.training and conv.training and conv.input_mean.shape == (3, 8, 8)


def test_supernet_pretraining_defaults_are_a_full_schedule(tmp_path):
    """Not a demo: by default the supernet trains for the 100-epoch ImageNet ResNet schedule (lr 0.1 at
    batch 256, x0.1 at epochs 30/60/90: OSVAI/ODConv main.py, README ResNet command), and ``epochs``
    counts passes over the loader."""
    import inspect

    for fn in (edo.train_supernet, edo.search):
        params = inspect.signature(fn).parameters
        assert params["epochs"].default == 100 and params["lr"].default == 0.1 and params["steps"].default is None
    assert inspect.signature(edo.search).parameters["criterion"].default == "expected_output"
    assert [round(m * 100) for m in edo.SUPERNET_MILESTONES] == [30, 60, 90]
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten())
    edo.build_supernet(model, "k9")
    batches = _batches(torch.randn(12, 3, 8, 8), 4)
    assert len(edo.train_supernet(model, batches, 1.5, lr=0.01)) == math.ceil(1.5 * 3)
    assert len(edo.train_supernet(model, batches, steps=2, lr=0.01)) == 2


def test_supernet_learning_rate_steps_at_the_milestones(monkeypatch):
    """The learning rate is ``lr`` until 30% of the run, then x0.1 at 30%, 60% and 90% of the steps."""
    seen = []
    original = torch.optim.SGD.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", record)
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten())
    edo.build_supernet(model, "k9")
    edo.train_supernet(model, _batches(torch.randn(4, 3, 6, 6), 2), steps=20, lr=1.0)
    expected = [1.0] * 6 + [0.1] * 6 + [0.01] * 6 + [0.001] * 2
    assert seen == pytest.approx(expected)


def _script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "edo_search.py"
    spec = importlib.util.spec_from_file_location("edo_search_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_search_script_defaults_are_the_papers_search():
    """``scripts/edo_search.py`` without ``--demo``: ImageNet (a root is required), ResNet50, the full
    supernet schedule at batch 256 and lr 0.1, the expected-output criterion; ``--demo`` is the short run."""
    script = _script()
    with pytest.raises(SystemExit):
        script.parse_args([])
    paper = script.parse_args(["--data-root", "/data/imagenet", "--device", "cpu"])
    assert (paper.arch, paper.width_divisor, paper.image_size, paper.batch_size) == ("resnet50", 1, 224, 256)
    assert (paper.epochs, paper.steps, paper.lr, paper.criterion, paper.init) == (
        100, None, 0.1, "expected_output", "kaiming")
    assert script.parse_args(["--data-root", "x", "--batch-size", "512"]).lr == pytest.approx(0.2)
    demo = script.parse_args(["--demo"])
    assert (demo.arch, demo.width_divisor, demo.steps, demo.lr, demo.image_size) == ("resnet18", 4, 150, 0.05, 64)
    longer = script.parse_args(["--demo", "--epochs", "3"])
    assert (longer.epochs, longer.steps) == (3, None)
