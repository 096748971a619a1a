"""Pieces shared by the attention (routing) branches of the dynamic families."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over H and W, keeping ``(B, C, 1, 1)``.

    A tensor mean rather than ``nn.AdaptiveAvgPool2d``, whose CUDA backward is not deterministic.
    """
    return x.mean((2, 3), keepdim=True)


class TemperatureScheduled(nn.Module):
    """A routing module whose logits are divided by a scheduled temperature.

    The temperature is a non-persistent 0-dim buffer: it follows the module across devices and
    ``deepcopy`` (EMA) without changing the official state-dict layout, and updating it in place
    does not trigger ``torch.compile`` recompilation the way a changing Python float would.
    """

    def __init__(self, schedule: Callable[[float], float]) -> None:
        super().__init__()
        self.schedule = schedule
        self.register_buffer("temperature", torch.tensor(float(schedule(float("inf")))), persistent=False)

    def set_schedule_value(self, value: float) -> None:
        self.temperature.fill_(value)
