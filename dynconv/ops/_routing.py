"""Pieces shared by the attention (routing) branches of the dynamic families."""
from __future__ import annotations

from typing import Any, Callable, Dict, Set

import torch
from torch import nn


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over H and W, keeping ``(B, C, 1, 1)``.

    A tensor mean rather than ``nn.AdaptiveAvgPool2d``, whose CUDA backward is not deterministic.
    """
    return x.mean((2, 3), keepdim=True)


class TemperatureScheduled(nn.Module):
    """A routing module whose logits are divided by a scheduled temperature.

    The temperature is a 0-dim buffer: it follows the module across devices and ``deepcopy`` (EMA),
    updating it in place does not make ``torch.compile`` recompile the way a changing Python float
    would, and it is part of the state dict, so a model saved mid-schedule and reloaded with plain
    ``load_state_dict`` (timm's ``checkpoint_path=``, ``validate.py``) computes what it computed. A state
    dict without it (the official layouts, dynconv checkpoints written before it was saved) leaves the
    current value, as BatchNorm does with ``num_batches_tracked``.
    """

    STATE = "temperature"  # the schedule state's name in the state dict

    def __init__(self, schedule: Callable[[float], float]) -> None:
        super().__init__()
        self.schedule = schedule
        self.register_buffer(self.STATE, torch.tensor(float(schedule(float("inf")))))

    def set_schedule_value(self, value: float) -> None:
        self.temperature.fill_(value)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + self.STATE
        if key not in state_dict:
            state_dict[key] = self.temperature.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def schedule_state_keys(model: nn.Module) -> Set[str]:
    """The state-dict keys of ``model`` that hold schedule state (no official layout has them)."""
    return {f"{name}.{m.STATE}" if name else m.STATE for name, m in model.named_modules()
            if isinstance(m, TemperatureScheduled)}
