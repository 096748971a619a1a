"""A run directory belongs to one run: one writer at a time, and a resume only with the same settings.

The directory name holds only model, conv, recipe, data and seed, so two commands that differ elsewhere
(the learning rate, the epochs) land in the same directory. :class:`RunLock` keeps a second writer out
while the first lives (an ``flock`` that the kernel drops when its process dies, however it dies), and
:func:`config_changes` tells a resume what differs from the run it would continue.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO, Any, Dict, Iterable, List, Mapping, Optional, Tuple

LOCK_NAME = ".lock"

# Values that do not change what is computed: where and how fast it runs, what it prints, where data lie.
IGNORED = (
    "name", "run_dir", "rows", "logger.", "data.root", "data.on_corrupt", "data.max_bad_fraction",
    "trainer.device", "trainer.workers", "trainer.progress", "trainer.log_interval", "trainer.checkpoint_interval",
    "trainer.resume", "trainer.resume_changes", "trainer.reuse_freed_memory", "trainer.max_epochs",
    "trainer.eval_batch_size", "trainer.limit_eval_batches", "trainer.nan_policy", "trainer.max_nan_skips",
    "trainer.compile", "trainer.deterministic", "trainer.eval_before_train",
)
# Values a resumed run may change when asked to (trainer.resume_changes=[...]): the run goes on from its
# checkpoint under the new value; the learning-rate schedule is rebuilt for it (a longer run decays over
# its new length, a lower rate applies from the resume on).
RESUMABLE = ("recipe.epochs", "recipe.optimizer.lr", "recipe.grad_clip", "trainer.batch_size")


class RunDirectoryBusy(RuntimeError):
    """Another live process writes to this run directory."""


class ConfigChanged(ValueError):
    """A resume whose settings differ from the run's in values that change the result."""


class RunLock:
    """An exclusive lock on ``run_dir`` for the life of the process (or until :meth:`release`).

    The lock file says who holds it (PID, host, since when), for the message a second writer gets.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._file: Optional[IO[str]] = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirectoryBusy(
                f"run directory {self.path.parent} is in use by {holder}: wait for that run to end, or give "
                "this one another directory (name=..., seed=... or hydra.run.dir=...)") from None
        f.seek(0)
        f.truncate()
        f.write(f"PID {os.getpid()} on host {socket.gethostname()} (since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')})\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_run_dir(run_dir: Path, is_primary: bool) -> Optional[RunLock]:
    """Rank 0 holds ``run_dir`` for the run's life and removes the temp files of checkpoint writes a kill
    interrupted; every rank raises :class:`RunDirectoryBusy` (collective) when another process holds it."""
    from .distributed import broadcast_object

    lock, busy = None, None
    if is_primary:
        try:
            lock = RunLock(run_dir).acquire()
            remove_orphan_temp_files(run_dir)
        except RunDirectoryBusy as err:
            busy = str(err)
    busy = broadcast_object(busy)
    if busy:
        raise RunDirectoryBusy(busy)
    return lock


def remove_orphan_temp_files(run_dir: Path) -> List[Path]:
    """Delete the temporary files of checkpoint writers that were killed (``.<name>.<pid>.<hex>.tmp``,
    :func:`dynconv.checkpoint.atomic_write`); call it holding the :class:`RunLock`."""
    removed = []
    for path in Path(run_dir).glob(".*.tmp"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, Mapping):
        out: Dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _ignored(key: str) -> bool:
    return any(key == name or (name.endswith(".") and key.startswith(name)) for name in IGNORED)


def config_changes(stored: Mapping[str, Any], current: Mapping[str, Any]) -> List[Tuple[str, Any, Any]]:
    """``(key, stored value, current value)`` for every value that differs and changes the result.

    Keys that only one side has (a config written before a key existed) are not compared.
    """
    old, new = _flatten(stored), _flatten(current)
    return [(key, old[key], new[key]) for key in sorted(old.keys() & new.keys())
            if old[key] != new[key] and not _ignored(key)]


def check_resume(stored: Mapping[str, Any], current: Mapping[str, Any], allowed: Iterable[str],
                 where: Path) -> List[str]:
    """The keys a resume changes with permission; raises :class:`ConfigChanged` for any other difference."""
    allowed = list(allowed)
    bad = [key for key in allowed if key not in RESUMABLE]
    if bad:
        raise ConfigChanged(f"trainer.resume_changes: {', '.join(bad)} cannot change in a resumed run; "
                            f"these can: {', '.join(RESUMABLE)}")
    changes = config_changes(stored, current)
    refused = [(k, a, b) for k, a, b in changes if k not in allowed]
    if refused:
        listed = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, a, b in refused)
        resumable = [k for k, _, _ in refused if k in RESUMABLE]
        hint = (f", or continue it with the new values: trainer.resume_changes=[{','.join(resumable)}]"
                if len(resumable) == len(refused) else "")
        raise ConfigChanged(f"{where} holds a run with other settings ({listed}): start a new run directory "
                            f"(name=..., seed=... or hydra.run.dir=...){hint}")
    return [k for k, _, _ in changes]
