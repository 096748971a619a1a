"""Timing helpers for the benchmark scripts: side-by-side medians with warm-up.

Cases are timed round-robin (one call of each case per round) so that a slow drift of the machine
(thermal state, other processes) affects every case alike, which is what makes ratios between
cases measured in one run trustworthy.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Mapping

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    cases: Mapping[str, Callable[[], object]],
    repeats: int = 20,
    warmup: int = 3,
    device: torch.device = torch.device("cpu"),
) -> Dict[str, float]:
    """Median seconds per call of each case, timing the cases round-robin after ``warmup`` rounds."""
    times: Dict[str, List[float]] = {name: [] for name in cases}
    for round_index in range(warmup + repeats):
        for name, fn in cases.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def machine_summary() -> Dict[str, object]:
    """What the numbers were measured on."""
    import platform

    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
