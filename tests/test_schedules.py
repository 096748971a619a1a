"""Schedules: pure functions of progress matching the official per-iteration formulas, and
``set_progress`` reaching every scheduled layer."""
from __future__ import annotations

import math

import pytest
import torch

import dynconv
from dynconv.ops import DYAttention, ODAttention
from dynconv.ops.kernelwarehouse import KWAttention
from dynconv.schedules import attention_temperature, set_schedule, warehouse_mixing


def odconv_official_temperature(iteration: int, iters_per_epoch: int, temp_epoch=10, temp_init=30.0) -> float:
    """OSVAI/ODConv main.py (get_temperature, utils/misc.py), evaluated per iteration."""
    total = iters_per_epoch * temp_epoch
    return 1 + max(0.0, (temp_init - 1) * (total - iteration) / total)


def kw_official_tau(iteration: int, iters_per_epoch: int, temp_epoch=20, init=1.0, end=0.0) -> float:
    """OSVAI/KernelWarehouse engine.py (get_temperature), evaluated per iteration."""
    total = iters_per_epoch * temp_epoch
    return end + max(0.0, (init - end) * (total - iteration) / max(1, total))


def temperatures(model, kind):
    return {float(m.temperature) for m in model.modules() if isinstance(m, kind)}


@pytest.mark.parametrize("iters_per_epoch", [1, 7, 1251])
def test_schedules_equal_official_per_iteration_formulas(iters_per_epoch):
    odconv, kw, kw_mbv2 = attention_temperature(), warehouse_mixing(), warehouse_mixing(15)
    for it in range(0, 25 * iters_per_epoch, max(1, iters_per_epoch // 3)):
        epoch = it / iters_per_epoch
        assert odconv(epoch) == pytest.approx(odconv_official_temperature(it, iters_per_epoch))
        assert kw(epoch) == pytest.approx(kw_official_tau(it, iters_per_epoch))
        assert kw_mbv2(epoch) == pytest.approx(kw_official_tau(it, iters_per_epoch, temp_epoch=15))


def test_schedule_end_points():
    t = attention_temperature()
    assert (t(0), t(5), t(10), t(200), t.final) == (30.0, 15.5, 1.0, 1.0, 1.0)
    tau = warehouse_mixing()
    assert (tau(0), tau(10), tau(20), tau(math.inf)) == (1.0, 0.5, 0.0, 0.0)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2_050"])
def test_fresh_models_evaluate_with_the_end_values(arch):
    assert temperatures(dynconv.create_model(arch, "odconv_4x"), ODAttention) == {1.0}
    assert temperatures(dynconv.create_model(arch, "dyconv_4x"), DYAttention) == {1.0}
    assert temperatures(dynconv.create_model(arch, "kw_1x"), KWAttention) == {0.0}


def test_set_progress_reaches_every_scheduled_layer():
    model = dynconv.create_model("resnet18", "odconv_4x")
    dynconv.set_progress(model, 2.5)
    assert [*temperatures(model, ODAttention)] == pytest.approx([30 - 29 * 0.25])
    dynconv.set_progress(model, 10.0)
    assert temperatures(model, ODAttention) == {1.0}
    kw = dynconv.create_model("resnet18", "kw_1x")
    dynconv.set_progress(kw, 5.0)
    assert temperatures(kw, KWAttention) == {0.75}


def test_kw_mobilenetv2_anneals_over_15_epochs_resnet_over_20():
    mbv2 = dynconv.create_model("mobilenetv2_050", "kw_1x")
    resnet = dynconv.create_model("resnet18", "kw_1x")
    for model in (mbv2, resnet):
        dynconv.set_progress(model, 7.5)
    assert temperatures(mbv2, KWAttention) == {0.5}
    assert temperatures(resnet, KWAttention) == {0.625}


def test_schedule_lengths_are_overridable():
    od = dynconv.create_model("resnet18", "odconv_1x", temperature_epochs=5)
    dynconv.set_progress(od, 2.5)
    assert temperatures(od, ODAttention) == {15.5}
    kw = dynconv.create_model("resnet18", "kw_1x", mixing_epochs=4)
    dynconv.set_progress(kw, 1.0)
    assert temperatures(kw, KWAttention) == {0.75}
    changed = set_schedule(od, ODAttention, attention_temperature(epochs=2, start=10))
    assert changed == 16 and temperatures(od, ODAttention) == {1.0}
    dynconv.set_progress(od, 1.0)
    assert temperatures(od, ODAttention) == {5.5}


def test_temperature_changes_the_output_and_survives_state_dict_round_trip():
    model = dynconv.create_model("resnet18", "odconv_4x", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y_end = model(x)
        dynconv.set_progress(model, 0.0)
        y_start = model(x)
    assert not torch.allclose(y_end, y_start)
    # issue 17: the schedule state is saved (a mid-schedule model reloads as it was), the official layout is not
    state = model.state_dict()
    assert state["layer1.0.conv1.attention.temperature"] == 30.0
    fresh = dynconv.create_model("resnet18", "odconv_4x", num_classes=10).eval()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(x), y_start)
    assert not any("temperature" in k for k in dynconv.export_official(model)["state_dict"])
