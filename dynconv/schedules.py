"""Training-progress schedules of the dynamic layers, as pure functions of progress in epochs.

Layers that anneal something (attention temperature, KernelWarehouse mixing tau, DGC pruning share)
carry a ``schedule`` callable and receive its value through ``set_schedule_value``;
:func:`set_progress` is the only thing a training loop calls. A freshly built layer holds the
schedule's end value, so a loaded checkpoint evaluates the way the official code evaluates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

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


@runtime_checkable
class Scheduled(Protocol):
    schedule: Callable[[float], float]

    def set_schedule_value(self, value: float) -> None: ...


def scheduled_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, Scheduled)]


def set_progress(model: nn.Module, epoch: float) -> None:
    """Push training progress (in epochs, fractional within an epoch) into every scheduled layer."""
    for module in scheduled_modules(model):
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
