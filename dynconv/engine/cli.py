"""Running an entry point: errors caused by the user's input end the process with one clear line."""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Tuple, Type

from ..checkpoint import CheckpointError
from ..data import DatasetError
from .trainer import NonFiniteLossError

USER_ERRORS: Tuple[Type[BaseException], ...] = (ValueError, FileNotFoundError, DatasetError, CheckpointError,
                                                NonFiniteLossError)


def run_main(fn: Callable[..., Any], *args: Any, user_errors: Tuple[Type[BaseException], ...] = ()) -> Any:
    """``fn(*args)``; a bad config, dataset, checkpoint or a diverged loss exits with status 1 and the
    message on stderr (prefixed with the rank under ``torchrun``) instead of a traceback.
    ``DYNCONV_TRACEBACK=1`` re-raises for debugging."""
    try:
        return fn(*args)
    except USER_ERRORS + tuple(user_errors) as err:
        if os.environ.get("DYNCONV_TRACEBACK"):
            raise
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"{prefix}error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
