"""The random number generators' state as plain data (Python, numpy, torch CPU and CUDA), saved in checkpoints so
that a resumed run continues the same trajectory."""
from __future__ import annotations

import random
import warnings
from typing import Any, Dict, Mapping

import numpy as np
import torch


def rng_state() -> Dict[str, Any]:
    """Python, numpy (legacy global), torch CPU and every CUDA device's RNG state, as plain data."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: Dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": [str(kind), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (also after a save / ``weights_only`` load)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if len(cuda) != count:
            warnings.warn(
                f"the RNG state holds {len(cuda)} CUDA devices but {count} are visible; restoring the "
                f"first {min(len(cuda), count)} (the run will not be bitwise reproducible)"
            )
        for device, device_state in enumerate(cuda[:count]):
            torch.cuda.set_rng_state(device_state.cpu(), device)
