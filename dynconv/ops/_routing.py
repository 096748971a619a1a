"""Pieces shared by the attention (routing) branches of the dynamic families."""
from __future__ import annotations

from typing import Callable

import torch

from ._scheduled import ScheduledModule, schedule_state_keys  # noqa: F401  (schedule_state_keys: re-exported)


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over H and W, keeping ``(B, C, 1, 1)``.

    A tensor mean rather than ``nn.AdaptiveAvgPool2d``, whose CUDA backward is not deterministic.
    """
    return x.mean((2, 3), keepdim=True)


class TemperatureScheduled(ScheduledModule):
    """A routing module whose logits are divided by a scheduled temperature.

    The temperature is a 0-dim buffer: it follows the module across devices and ``deepcopy`` (EMA),
    updating it in place does not make ``torch.compile`` recompile the way a changing Python float
    would, and it is part of the state dict, so a model saved mid-schedule and reloaded with plain
    ``load_state_dict`` (timm's ``checkpoint_path=``, ``validate.py``) computes what it computed. A state
    dict without it (the official layouts, dynconv checkpoints written before it was saved) leaves the
    current value, as BatchNorm does with ``num_batches_tracked``.
    """

    SCHEDULE_STATE = ("temperature",)

    def __init__(self, schedule: Callable[[float], float]) -> None:
        super().__init__()
        self.register_buffer("temperature", torch.tensor(float(schedule(float("inf")))))
        self.init_schedule(schedule)

    def set_schedule_value(self, value: float) -> None:
        self.temperature.fill_(value)
