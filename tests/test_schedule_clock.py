"""Schedules in loops that never call ``dynconv.set_progress`` (issue 17, point 2).

``schedule_steps_per_epoch=N`` (``timm.create_model`` / ``dynconv.create_model``, timm's ``--model-kwargs``)
makes a model advance its own schedules one step per training forward pass, as the official per-iteration
``get_temperature`` calls do; a model that trains while nothing drives it warns. The loops here use timm's
own training machinery (``create_optimizer_v2``, ``ModelEmaV3``, ``CheckpointSaver``, ``resume_checkpoint``),
as timm's ``train.py`` does.
"""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
from timm.models import resume_checkpoint
from timm.optim import create_optimizer_v2
from timm.utils import CheckpointSaver, ModelEmaV3
from test_schedules import kw_official_tau, odconv_official_temperature

import dynconv
from dynconv.ops import ODAttention
from dynconv.ops.dgc import DGCConv2d
from dynconv.ops.kernelwarehouse import KWAttention
from dynconv.schedules import PruningStages

STEPS = 3  # training batches per epoch of the toy runs


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 5, (2,), generator=g)


def _layers(model, kind):
    return [m for m in model.modules() if isinstance(m, kind)]


def _train(model, steps: int, first: int = 0, optimizer=None):
    """``steps`` SGD steps of a timm-style loop (no dynconv call); returns the temperature each ran at."""
    optimizer = optimizer or create_optimizer_v2(model, "sgd", lr=0.01, momentum=0.9)
    model.train()
    seen = []
    for i in range(first, first + steps):
        x, y = _batch(i)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        seen.append(float(_layers(model, (ODAttention, KWAttention))[0].temperature))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return seen, optimizer


@pytest.mark.parametrize("name,official", [("odconv4x_resnet18", odconv_official_temperature),
                                           ("kw1x_resnet18", kw_official_tau)])
def test_a_timm_loop_anneals_as_the_official_per_iteration_schedule(name, official):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, schedule_steps_per_epoch=STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dynconv.UndrivenScheduleWarning)
        seen, _ = _train(model, 7)
    expected = [official(i, STEPS) for i in range(7)]
    assert seen == pytest.approx(expected, rel=1e-6)
    assert seen[0] == (30.0 if name.startswith("odconv") else 1.0)  # step 0 runs at the schedule's start


def test_eval_and_no_grad_passes_do_not_advance_the_schedule():
    model = timm.create_model("odconv4x_resnet18", num_classes=5, schedule_steps_per_epoch=STEPS)
    x, _ = _batch(0)
    model.eval()
    model(x)
    model.train()
    with torch.no_grad():
        model(x)
    layer = _layers(model, ODAttention)[0]
    assert int(layer.schedule_step) == 0 and float(layer.temperature) == 1.0
    model(x)
    assert int(layer.schedule_step) == 1 and float(layer.temperature) == 30.0


def test_set_progress_overrides_and_the_clock_continues_from_it():
    model = dynconv.create_model("resnet18", "odconv_4x", num_classes=5, schedule_steps_per_epoch=STEPS)
    _train(model, 2)
    dynconv.set_progress(model, 5.0)
    seen, _ = _train(model, 3, first=2)
    assert seen == pytest.approx([odconv_official_temperature(5 * STEPS + i, STEPS) for i in range(3)], rel=1e-6)


def test_dgc_pruning_advances_with_the_clock():
    model = dynconv.create_model("resnet18", "dgc", num_classes=5, total_epochs=2, schedule_steps_per_epoch=STEPS)
    layer = _layers(model, DGCConv2d)[0]
    stages = PruningStages(2.0)
    model.train()
    for step in range(2 * STEPS):
        model(_batch(step)[0])
        target = round(layer.in_channels * layer.pruning_rate * stages(step / STEPS))
        assert layer.inactive_channels == target
    assert layer.inactive_channels > 0  # the run reached the pruning stage


def test_a_killed_timm_run_resumes_on_the_same_schedule_and_weights(tmp_path):
    """timm's CheckpointSaver + resume_checkpoint (what train.py --resume does) continue the uninterrupted run."""
    torch.manual_seed(0)
    whole = timm.create_model("odconv4x_resnet18", num_classes=5, schedule_steps_per_epoch=STEPS)
    torch.manual_seed(0)
    first = timm.create_model("odconv4x_resnet18", num_classes=5, schedule_steps_per_epoch=STEPS)
    torch.manual_seed(0)
    resumed = timm.create_model("odconv4x_resnet18", num_classes=5, schedule_steps_per_epoch=STEPS)

    seen_whole, _ = _train(whole, 2 * STEPS)
    seen_first, optimizer = _train(first, STEPS)
    saver = CheckpointSaver(first, optimizer, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=0.0)
    new_optimizer = create_optimizer_v2(resumed, "sgd", lr=0.01, momentum=0.9)
    start = resume_checkpoint(resumed, str(tmp_path / "last.pth.tar"), optimizer=new_optimizer, log_info=False)
    assert start == 1
    seen_rest, _ = _train(resumed, STEPS, first=STEPS, optimizer=new_optimizer)

    assert seen_first + seen_rest == seen_whole
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


def test_the_ema_copy_follows_the_schedule_and_validates_through_timm(tmp_path):
    """ModelEmaV3's copy (in eval mode, so its clock never ticks) averages the temperatures like any float
    buffer; its checkpoint evaluates the same in a model built without a clock (timm's validate.py:
    ``create_model(name, checkpoint_path=...)``)."""
    model = timm.create_model("odconv4x_resnet18", num_classes=5, schedule_steps_per_epoch=STEPS)
    ema = ModelEmaV3(model, decay=0.5)
    optimizer = create_optimizer_v2(model, "sgd", lr=0.01)
    model.train()
    for i in range(4):
        x, y = _batch(i)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step(), optimizer.zero_grad()
        ema.update(model, step=i)
    live, copied = _layers(model, ODAttention)[0], _layers(ema.module, ODAttention)[0]
    assert float(live.temperature) == pytest.approx(odconv_official_temperature(3, STEPS))
    assert float(live.temperature) < float(copied.temperature) < 30.0
    path = tmp_path / "ema.pth"
    torch.save(ema.module.state_dict(), path)
    plain = timm.create_model("odconv4x_resnet18", num_classes=5, checkpoint_path=str(path)).eval()
    x, _ = _batch(9)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ema.module.eval()(x), rtol=0, atol=0)


def test_a_compiled_model_runs_each_step_at_its_scheduled_value():
    """Under ``torch.compile`` the clock runs eagerly before the graph, which reads the updated buffers."""
    torch.manual_seed(0)
    model = timm.create_model("odconv4x_resnet18", num_classes=5, schedule_steps_per_epoch=STEPS)
    reference = timm.create_model("odconv4x_resnet18", num_classes=5)
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model)
    model.train(), reference.train()
    for step in range(3):
        x, _ = _batch(step)
        dynconv.set_progress(reference, step / STEPS)
        # inductor's kernels round differently (about 4e-4 here); a step at the end value is off by about 1
        torch.testing.assert_close(compiled(x), reference(x), rtol=0, atol=2e-3)


def test_a_clocked_checkpoint_loads_strictly_either_way(tmp_path):
    """Without a clock the step counts are dropped (validate.py); with one, a checkpoint without them keeps the
    model's own count (a dynconv or official checkpoint to fine-tune from)."""
    clocked = timm.create_model("odconv4x_resnet18", num_classes=5, schedule_steps_per_epoch=STEPS)
    _train(clocked, 2)
    state = clocked.state_dict()
    assert sum(k.endswith("schedule_step") for k in state) == 16
    plain = timm.create_model("odconv4x_resnet18", num_classes=5)
    plain.load_state_dict(state, strict=True)
    assert not any(k.endswith("schedule_step") for k in plain.state_dict())
    again = timm.create_model("odconv4x_resnet18", num_classes=5, schedule_steps_per_epoch=STEPS)
    again.load_state_dict(plain.state_dict(), strict=True)
    assert int(_layers(again, ODAttention)[0].schedule_step) == 0


def test_features_only_models_carry_the_clock():
    model = timm.create_model("odconv4x_resnet18", features_only=True, schedule_steps_per_epoch=STEPS).train()
    model(_batch(0)[0])
    model(_batch(1)[0])
    assert float(_layers(model, ODAttention)[0].temperature) == pytest.approx(odconv_official_temperature(1, STEPS))


@pytest.mark.parametrize("name", ["odconv4x_resnet18", "kw1x_resnet18", "dyconv4x_resnet18", "dgc_resnet18"])
def test_training_with_nothing_driving_the_schedule_warns(name):
    model = timm.create_model(name, num_classes=5).train()
    x, _ = _batch(0)
    with pytest.warns(dynconv.UndrivenScheduleWarning, match="schedule_steps_per_epoch"):
        model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dynconv.UndrivenScheduleWarning)
        model.eval()(x)  # evaluation at the end values is what a finished model does
        driven = timm.create_model(name, num_classes=5).train()
        dynconv.set_progress(driven, float("inf"))  # fine-tuning at the end values, on purpose
        driven(x)


def test_bad_steps_per_epoch_is_refused_with_the_key_named():
    with pytest.raises(ValueError, match="schedule_steps_per_epoch"):
        timm.create_model("odconv4x_resnet18", schedule_steps_per_epoch=0)
    model = dynconv.drive_schedules(dynconv.create_model("resnet18", "odconv_4x", num_classes=5), STEPS)
    assert len(model._forward_pre_hooks) == 1
    dynconv.drive_schedules(model, STEPS)  # again: replaced, not stacked
    assert len(model._forward_pre_hooks) == 1
    dynconv.drive_schedules(model, None)
    assert not model._forward_pre_hooks
