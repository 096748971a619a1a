"""Loading a checkpoint to score it: a dynconv run's or an official file, checked against the task's identity,
with the layer schedules where the run left them. Every task's ``eval.py`` path goes through it."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..checkpoint import load_weights
from ..schedules import set_progress
from .config import EvalConfig


def load_for_eval(model: torch.nn.Module, cfg: EvalConfig, state: Mapping[str, Any],
                  expect: Mapping[str, str]) -> str:
    """Load ``cfg.checkpoint`` (already read as ``state``), checked against the task's identity ``expect``;
    a dynconv run's layer schedules are set where that run left them. Returns what was loaded."""
    loaded = load_weights(model, state, expect=dict(expect), source_name=str(cfg.checkpoint), use_ema=cfg.use_ema)
    meta = state.get("meta") if isinstance(state.get("meta"), dict) else {}
    progress = meta.get("schedule_progress", meta.get("epoch"))
    if progress is not None:  # mid-schedule temperatures, not the end values a fresh model holds
        set_progress(model, progress)
    return loaded.replace("<in-memory checkpoint>", str(cfg.checkpoint))


__all__ = ["load_for_eval"]
