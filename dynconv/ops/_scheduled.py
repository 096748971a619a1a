"""What every schedule-driven layer shares: its schedule, whether anything drives it, and its clock.

A layer that anneals something during training (attention temperature, KernelWarehouse's tau, DGC's pruned
share) derives from :class:`ScheduledModule`. Its schedule is a pure function of progress in epochs
(:mod:`dynconv.schedules`); the layer only receives the value (``set_schedule_value``). Two ways drive it:
:func:`dynconv.set_progress` from a training loop, or a clock (:func:`dynconv.drive_schedules`) that ticks
once per training forward pass for loops that know nothing of dynconv (timm's ``train.py``).

- A clocked layer keeps its step count as a persistent ``schedule_step`` buffer, so a checkpoint resumes
  the schedule after a plain ``load_state_dict`` (timm's ``--resume``). A layer without a clock drops that
  entry when it loads one (timm's ``validate.py`` builds the model without one); a clocked layer keeps its
  own count when a checkpoint has none.
- ``schedule_driven`` is set by either way. A layer that trains while nothing drives it would silently
  train at its schedule's end value (temperature 1 from the first step), so it warns once with
  :class:`dynconv.UndrivenScheduleWarning`, naming the ways to drive it.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Optional, Set, Tuple

import torch
from torch import nn

from .._compat import is_compiling
from ..schedules import UndrivenScheduleWarning

_HELD = 2 ** 62  # the step of a clock held at the schedules' end (set_progress(model, inf))


class ScheduledModule(nn.Module):
    """Base of the modules a training-progress schedule drives. Subclasses call :meth:`init_schedule`
    in ``__init__`` and implement :meth:`set_schedule_value`; ``SCHEDULE_STATE`` names their own
    state-dict entries that hold the scheduled value (a checkpoint without them leaves the current value,
    as BatchNorm does with ``num_batches_tracked``)."""

    SCHEDULE_STATE: Tuple[str, ...] = ()
    STEP = "schedule_step"

    def init_schedule(self, schedule: Callable[[float], float]) -> None:
        self.schedule = schedule
        self.schedule_driven = False
        self.steps_per_epoch: Optional[int] = None
        self._step = 0
        self._undriven_warned = False
        self.register_forward_pre_hook(_warn_if_undriven)

    def set_schedule_value(self, value: float) -> None:
        raise NotImplementedError

    def set_progress(self, epoch: float) -> None:
        """Take the schedule's value at ``epoch``; a clock continues from there."""
        self.set_schedule_value(self.schedule(epoch))
        if self.steps_per_epoch is not None:
            self._set_step(round(epoch * self.steps_per_epoch) if math.isfinite(epoch) else _HELD)
        self.schedule_driven = True

    # -- clock ---------------------------------------------------------------------------------------

    def start_clock(self, steps_per_epoch: int) -> None:
        if self.steps_per_epoch is None:
            self.register_buffer(self.STEP, torch.zeros((), dtype=torch.long))
            self._step = 0
        self.steps_per_epoch = steps_per_epoch
        self.schedule_driven = True

    def stop_clock(self) -> None:
        if self.steps_per_epoch is not None:
            delattr(self, self.STEP)
            self.steps_per_epoch = None

    def tick(self) -> None:
        """One training step: this step's value, then count it."""
        self.set_schedule_value(self.schedule(self._step / self.steps_per_epoch))
        self._set_step(self._step + 1)

    def _set_step(self, step: int) -> None:
        self._step = min(step, _HELD)
        getattr(self, self.STEP).fill_(self._step)

    # -- state dict ----------------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        clocked = self.steps_per_epoch is not None
        for name in (*self.SCHEDULE_STATE, *((self.STEP,) if clocked else ())):
            if prefix + name not in state_dict:
                state_dict[prefix + name] = getattr(self, name).detach().clone()
        if not clocked:
            state_dict.pop(prefix + self.STEP, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        step = getattr(self, self.STEP, None)
        if step is not None and not step.is_meta:
            self._step = int(step.item())


def _warn_if_undriven(module: ScheduledModule, args: Any) -> None:
    if is_compiling() or not module.training or module.schedule_driven or module._undriven_warned:
        return
    if not torch.is_grad_enabled():
        return
    module._undriven_warned = True
    warnings.warn(UndrivenScheduleWarning(
        f"{type(module).__name__} is training but nothing drives its schedule, so it stays at the schedule's "
        f"end value ({module.schedule(math.inf):g}) from the first step. Call dynconv.set_progress(model, epoch) "
        "before each step, or build the model with schedule_steps_per_epoch=N (timm's train.py: "
        "--model-kwargs schedule_steps_per_epoch=N; or dynconv.drive_schedules(model, N)) so it advances "
        "itself; dynconv.set_progress(model, float('inf')) trains at the end values on purpose (fine-tuning)."),
        stacklevel=3)


def schedule_state_keys(model: nn.Module) -> Set[str]:
    """The state-dict keys of ``model`` that hold schedule state (no official layout has them)."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, ScheduledModule):
            prefix = f"{name}." if name else ""
            clock = (module.STEP,) if module.steps_per_epoch is not None else ()
            keys.update(prefix + key for key in (*module.SCHEDULE_STATE, *clock))
    return keys
