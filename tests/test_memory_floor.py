"""Live-tensor memory counting and the training-memory floor (dynconv.memory_floor), against hand counts."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dynconv import create_model
from dynconv.benchmark import BenchSettings
from dynconv.memory_floor import (LiveTensorTracker, attention_activation_bytes, live_training_memory,
                                  peak_holders, training_memory_floor)
from dynconv.ops import _cpu_tuning, functional
from dynconv.ops.kernels import Kernels, MixedKernels
from dynconv.ops.odconv import ODConv2d

F32 = 4


def test_tracker_counts_each_storage_once_and_sees_freed_temporaries():
    with LiveTensorTracker() as tracker:
        a = torch.empty(1000)  # 4000 B
        view = a[10:].view(10, 99)  # a view: no new storage
        assert tracker.current == 4000
        tmp = a * 2  # a temporary, freed below: shows in the peak only
        del tmp
        assert (tracker.current, tracker.peak) == (4000, 8000)
        b = torch.empty(250, dtype=torch.float64)  # 2000 B
        assert (tracker.current, tracker.peak) == (6000, 8000)
        del a  # the view keeps the storage alive
        assert tracker.current == 6000
        del view, b
        assert tracker.current == 0


def test_tracker_counts_what_autograd_saves_until_the_graph_goes():
    x = torch.randn(100, requires_grad=True)
    with LiveTensorTracker() as tracker:
        tracker.add([x], "input")
        y = x.exp()  # exp saves its output for the backward
        loss = y.sum()  # 4 B
        del y
        assert tracker.current == 400 + 400 + 4
        del loss  # the graph, and the saved output with it
        assert tracker.current == 400


def test_live_training_memory_of_one_linear_layer_equals_the_hand_count():
    settings = BenchSettings(batch=4, image_size=8, num_classes=10, reuse_freed_memory=False)
    features, classes, batch = 3 * 8 * 8, 10, 4
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(features, classes))
    params = (features * classes + classes) * F32
    # the second step's peak is in the backward, at the weight gradient's matmul: parameters, their
    # momentum (from step 1) and their gradients, the input batch and labels (int64), the logits'
    # gradient (B x classes), the loss and the backward's seed (scalars). The saved log-softmax output is
    # gone by then (its node ran first), and the first step has no momentum during its backward.
    expected = 3 * params + batch * features * F32 + batch * 8 + batch * classes * F32 + 2 * F32
    assert live_training_memory(model, settings, steps=2) == expected
    holders = dict(peak_holders(model, settings, steps=2, n=20))
    assert holders["parameter"] == params and holders["step: clone.default"] == params  # momentum
    assert holders["backward 1: AddmmBackward0 -> mm.default"] == features * classes * F32  # weight gradient


def test_static_floor_is_the_static_peak():
    settings = BenchSettings(batch=2, image_size=32, num_classes=10, reuse_freed_memory=False)
    torch.manual_seed(0)
    model = create_model("resnet18", "static", num_classes=10)
    peak = live_training_memory(model, settings, steps=1)
    parts = training_memory_floor(model, peak, settings)  # the static model found from the arch
    assert parts["floor"] == parts["static_peak"] == peak
    assert parts["extra_params"] == parts["attention"] == 0


def test_odconv_floor_components_by_hand():
    settings = BenchSettings(batch=8, image_size=8, num_classes=10, reuse_freed_memory=False)
    torch.manual_seed(0)
    layer = ODConv2d(3, 8, 3, padding=1, bias=False, kernel_num=4)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    static = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    hidden = 16  # max(int(3 / 16), 16), ODConv's minimum attention width
    # kept by the attention branch, per sample: the pooled input (read by fc's backward), fc's output (by
    # the BatchNorm's), the normalised and ReLU'd features (one storage, in place; read by the four
    # heads), and the four attentions: channel (3), filter (8), spatial (3 x 3), kernel (4)
    per_sample = (3 + hidden + hidden + 3 + 8 + 9 + 4) * F32
    assert attention_activation_bytes(model, settings) == per_sample * settings.batch
    parts = training_memory_floor(model, 1000, settings, static_model=static)
    extra = sum(p.numel() for p in layer.parameters()) * F32 - 8 * 3 * 9 * F32
    assert parts["extra_params"] == parts["extra_grads"] == parts["extra_optimizer"] == extra
    assert parts["floor"] == 1000 + 3 * extra + per_sample * settings.batch
    # the floor is a floor: the measured step holds at least the static step plus these
    static_peak = live_training_memory(static, settings)
    floor = training_memory_floor(model, static_peak, settings, static_model=static)["floor"]
    assert live_training_memory(model, settings) >= floor


@pytest.mark.parametrize("groups,kernel,stride", [(1, 3, 1), (2, 3, 2), (1, 1, 1), (4, 1, 1)])
@pytest.mark.parametrize("attentions", [(), ("taps",), ("taps", "channels")])
def test_mixed_kernels_in_slices_equal_mixing_first(monkeypatch, groups, kernel, stride, attentions):
    """per_sample_conv2d(mixing=...) on the matmul path forms the per-sample kernels a slice of output
    channels at a time (one channel per slice here); values and float64 gradients equal mixing first and
    convolving each sample with its kernel (the grouped path)."""
    monkeypatch.setattr(_cpu_tuning, "MIX_CHUNK_BYTES", 1)
    torch.manual_seed(0)
    batch, n, c_in, c_out = 3, 4, 8, 6 if groups != 4 else 8
    opts = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(batch, c_in, 6, 6, **opts)
    coeffs = torch.rand(batch, n, **opts)
    bank = torch.randn(n, c_out, c_in // groups, kernel, kernel, **opts)
    taps = torch.rand(batch, kernel * kernel, **opts) if "taps" in attentions else None
    channels = torch.rand(batch, c_in, **opts) if "channels" in attentions else None
    args, factors = dict(stride=(stride, stride), padding=(kernel // 2,) * 2, groups=groups), dict(spatial=taps,
                                                                                                  in_channel=channels)
    got = functional.per_sample_conv2d(x, MixedKernels(coeffs, bank, **factors), None, path="matmul", **args)
    expected = functional.per_sample_conv2d(x, Kernels(functional.mix_kernels(coeffs, bank), **factors), None,
                                            path="grouped", **args)
    torch.testing.assert_close(got, expected)
    leaves = [t for t in (x, coeffs, bank, taps, channels) if t is not None]
    upstream = torch.randn_like(expected)
    for g, e in zip(torch.autograd.grad(got, leaves, upstream), torch.autograd.grad(expected, leaves, upstream)):
        torch.testing.assert_close(g, e)


def test_mixed_kernels_are_never_all_alive_in_training(monkeypatch):
    """A DY-Conv layer's training step on the matmul path, in slices of one output channel, never holds its
    B per-sample kernels (B x C_out x C_in x 9) or their gradient; formed whole (one slice), it does."""
    from dynconv.ops.dyconv import DynamicConv2d

    batch, channels = 8, 128
    layer = DynamicConv2d(channels, channels, 3, padding=1, bias=False).double()
    x = torch.randn(batch, channels, 4, 4, dtype=torch.float64, requires_grad=True)
    kernels_bytes = batch * layer.weight[0].numel() * 8

    def step_peak(chunk_bytes: int) -> int:
        monkeypatch.setattr(_cpu_tuning, "MIX_CHUNK_BYTES", chunk_bytes)
        with LiveTensorTracker() as tracker:
            tracker.add([x, *layer.parameters()], "inputs")
            before = tracker.current
            layer(x).sum().backward()
        return tracker.peak - before

    # besides the bank's gradient (4 x the weights), the unfolded input (9 x 128 x 16 per sample) and the
    # input gradient's partial sums: together under half the kernels
    bank_grad_bytes = layer.weight.numel() * 8
    assert step_peak(1) - bank_grad_bytes < 0.5 * kernels_bytes
    assert step_peak(2**40) >= kernels_bytes


@pytest.mark.parametrize("chunk_bytes", [1, 2**40])
@pytest.mark.parametrize("blocks,kernel,stride", [((2, 2), 3, 1), ((1, 2), 3, 2), ((2, 1), 1, 1)])
def test_kernelwarehouse_cells_mixed_in_chunks_equal_mixing_first(monkeypatch, chunk_bytes, blocks, kernel, stride):
    """cell_conv2d(mixing=(rows, bank)) forms the cells a chunk of mixtures at a time (one here, or all);
    values and float64 gradients equal mixing the cells first (``rows @ bank``) and contracting them."""
    monkeypatch.setattr(_cpu_tuning, "MIX_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    batch, n, cell_out, cell_in = 3, 5, 4, 3
    mixtures = kernel * kernel * blocks[0] * blocks[1]
    opts = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(batch, cell_in * blocks[1], 6, 6, **opts)
    rows = torch.randn(mixtures * batch, n, **opts)
    bank = torch.randn(n, cell_out, cell_in, **opts)
    args = (blocks, (kernel, kernel), (stride, stride), (kernel // 2,) * 2)
    got = functional.cell_conv2d(x, None, *args, mixing=(rows, bank))
    cells = (rows @ bank.reshape(n, -1)).reshape(mixtures, batch, cell_out, cell_in)
    expected = functional.cell_conv2d(x, cells, *args)
    torch.testing.assert_close(got, expected)
    upstream = torch.randn_like(expected)
    for g, e in zip(torch.autograd.grad(got, (x, rows, bank), upstream),
                    torch.autograd.grad(expected, (x, rows, bank), upstream)):
        torch.testing.assert_close(g, e)
