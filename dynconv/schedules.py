"""Training-progress schedules of the dynamic layers, as pure functions of progress in epochs.

Layers that anneal something (attention temperature, KernelWarehouse mixing tau, DGC pruning share)
carry a ``schedule`` callable and receive its value through ``set_schedule_value``;
:func:`set_progress` is the only thing a training loop calls, or, for loops that know nothing of
dynconv (timm's ``train.py``), :func:`drive_schedules` lets the model advance itself from the run's length.
A freshly built layer holds the schedule's end value, so a loaded checkpoint evaluates the way the
official code evaluates; a layer that trains while nothing drives it warns
(:class:`UndrivenScheduleWarning`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class LinearRamp:
    """Linear from ``start`` at epoch 0 to ``end`` at ``epochs``, then constant.

    Evaluated at fractional epochs, this is the per-iteration schedule of the official code:
    ODConv's ``get_temperature`` (30 -> 1 over 10 epochs) and KernelWarehouse's (1 -> 0 over 20).
    """

    start: float
    end: float
    epochs: float

    def __call__(self, epoch: float) -> float:
        if self.epochs <= 0 or epoch >= self.epochs:
            return self.end
        return self.start + (self.end - self.start) * max(epoch, 0.0) / self.epochs

    @property
    def final(self) -> float:
        return self.end


def attention_temperature(epochs: float = 10.0, start: float = 30.0) -> LinearRamp:
    """Softmax/sigmoid temperature of ODConv and DY-Conv: ``start`` -> 1 over ``epochs``."""
    return LinearRamp(start, 1.0, epochs)


def warehouse_mixing(epochs: float = 20.0) -> LinearRamp:
    """KernelWarehouse tau: 1 -> 0 over ``epochs`` (20 in the ResNet/ConvNeXt configs, 15 for MobileNetV2)."""
    return LinearRamp(1.0, 0.0, epochs)


@dataclass(frozen=True)
class PruningStages:
    """DGC's three-stage pruning schedule, as the fraction of the pruning target reached.

    Su et al., "Dynamic Group Convolution for Accelerating Convolutional Neural Networks", ECCV 2020;
    official code zhuogege1943/dgc ``layers.py``. With progress ``p = epoch / epochs``: nothing is
    pruned up to ``p = 1/12`` (warm-up), then the pruned share grows linearly as ``1.5 (p - 1/12)``
    and reaches the full target at ``p = 3/4``, where it stays (fine-tuning). For the official 120
    epochs that is 10 warm-up, 80 pruning and 30 fine-tuning epochs.
    """

    epochs: float = 120.0
    warmup: float = 1.0 / 12
    end: float = 3.0 / 4

    def __call__(self, epoch: float) -> float:
        p = epoch / self.epochs if self.epochs > 0 else float("inf")
        if p <= self.warmup:
            return 0.0
        if p >= self.end:
            return 1.0
        return (p - self.warmup) / (self.end - self.warmup)

    @property
    def final(self) -> float:
        return 1.0


def dgc_pruning(epochs: float = 120.0) -> PruningStages:
    """DGC pruning over a run of ``epochs`` (120 in the official ImageNet ResNet18 run)."""
    return PruningStages(float(epochs))


class UndrivenScheduleWarning(RuntimeWarning):
    """A schedule-driven layer trains while nothing advances its schedule (see :func:`drive_schedules`)."""


@runtime_checkable
class Scheduled(Protocol):
    schedule: Callable[[float], float]

    def set_schedule_value(self, value: float) -> None: ...


def scheduled_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, Scheduled)]


def set_progress(model: nn.Module, epoch: float) -> None:
    """Push training progress (in epochs, fractional within an epoch) into every scheduled layer."""
    for module in scheduled_modules(model):
        if hasattr(module, "set_progress"):
            module.set_progress(epoch)
        else:  # a user layer that only follows the protocol
            module.set_schedule_value(module.schedule(epoch))


def set_schedule(model: nn.Module, kind: type, schedule: Callable[[float], float]) -> int:
    """Replace the schedule of every scheduled module of type ``kind``; returns how many changed."""
    changed = 0
    for module in scheduled_modules(model):
        if isinstance(module, kind):
            module.schedule = schedule
            module.set_schedule_value(schedule(float("inf")))
            changed += 1
    return changed


class ScheduleClock:
    """Ticks a model's clocked layers once per training forward pass (see :func:`drive_schedules`).

    A forward pre-hook of the model it drives; the step counts live in the layers. Dynamo does not trace
    it (it keeps Python counts): a compiled model breaks its graph once, before the forward.
    """

    def __call__(self, model: nn.Module, args: Any) -> None:
        if model.training and torch.is_grad_enabled():
            _tick(model)


@torch.compiler.disable
def _tick(model: nn.Module) -> None:
    for module in model.modules():
        if getattr(module, "steps_per_epoch", None) is not None and hasattr(module, "tick"):
            module.tick()


_CLOCK = "_dynconv_schedule_clock"


def drive_schedules(model: nn.Module, steps_per_epoch: Optional[int]) -> nn.Module:
    """Let ``model`` advance its own schedules: each training forward pass (train mode, gradients on) is
    one step of a run with ``steps_per_epoch`` batches an epoch, so a loop that never calls
    :func:`set_progress` (timm's ``train.py``, a user's own loop) still anneals temperatures, KW mixing and
    DGC pruning as the official per-iteration schedules do (step ``k`` runs at epoch ``k / steps_per_epoch``).
    The step counts are part of the state dict (``schedule_step``), so a resumed run continues them;
    :func:`set_progress` still overrides (the clock continues from the progress it sets). Eval-mode and
    no-grad passes do not count. ``None`` removes the clock. Returns ``model``.

    Count one step per forward pass: with gradient accumulation over ``k`` micro-batches,
    ``steps_per_epoch`` is the number of micro-batches, and with several forward passes per optimizer
    step (SAM) the schedule runs that many times faster.
    """
    if steps_per_epoch is not None and (int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1):
        raise ValueError(f"schedule_steps_per_epoch must be a positive integer (training batches per epoch), "
                         f"got {steps_per_epoch!r}")
    handle = getattr(model, _CLOCK, None)
    if handle is not None:
        handle.remove()
        delattr(model, _CLOCK)
    clocked = [m for m in scheduled_modules(model) if hasattr(m, "start_clock")]
    if steps_per_epoch is None:
        for module in clocked:
            module.stop_clock()
        return model
    for module in clocked:
        module.start_clock(int(steps_per_epoch))
    setattr(model, _CLOCK, model.register_forward_pre_hook(ScheduleClock()))
    return model
