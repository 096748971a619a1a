"""Live-tensor memory counting and the training-memory floor (dynconv.memory_floor), against hand counts."""
from __future__ import annotations

import torch
from torch import nn

from dynconv import create_model
from dynconv.benchmark import BenchSettings
from dynconv.memory_floor import (LiveTensorTracker, attention_activation_bytes, live_training_memory,
                                  peak_holders, training_memory_floor)
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
