"""Running an entry point: errors caused by the user's input end the process with one clear line."""
from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable, Tuple, Type

from ..checkpoint import CheckpointError
from ..data.imagenet import DatasetError
from .errors import NonFiniteLossError
from .run_guard import RunDirectoryBusy

USER_ERRORS: Tuple[Type[BaseException], ...] = (ValueError, FileNotFoundError, DatasetError, CheckpointError,
                                                NonFiniteLossError, RunDirectoryBusy)

# torch.utils.data re-raises a DataLoader worker's exception as ``type(err)(text)``, the text being
# "Caught <Name> in DataLoader worker process <n>.\nOriginal Traceback ..." and the worker's traceback
# (torch/_utils.py ExceptionWrapper.reraise).
_WORKER_WRAPPED = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def user_message(err: BaseException) -> str:
    """The message of ``err`` as the user should read it: for an error re-raised from a DataLoader worker,
    the original exception's message (the last line of the worker's traceback, as ``workers=0`` prints),
    not the wrapper's ~50 lines of traceback."""
    text = str(err)
    if not _WORKER_WRAPPED.match(text):
        return text
    kind = type(err)
    # traceback.format_exception ends with "<module>.<qualname>: <message>" (builtins unqualified); chained
    # causes come before it, so the last such line is the exception that was raised.
    for name in (f"{kind.__module__}.{kind.__qualname__}", kind.__qualname__):
        at = text.rfind(f"\n{name}: ")
        if at >= 0:
            return text[at + len(name) + 3:].strip()
    return text


def run_main(fn: Callable[..., Any], *args: Any, user_errors: Tuple[Type[BaseException], ...] = ()) -> Any:
    """``fn(*args)``; a bad config, dataset, checkpoint or a diverged loss exits with status 1 and the
    message on stderr (prefixed with the rank under ``torchrun``) instead of a traceback, also when it was
    raised in a DataLoader worker. ``DYNCONV_TRACEBACK=1`` re-raises for debugging."""
    try:
        return fn(*args)
    except USER_ERRORS + tuple(user_errors) as err:
        if os.environ.get("DYNCONV_TRACEBACK"):
            raise
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"{prefix}error: {user_message(err)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
