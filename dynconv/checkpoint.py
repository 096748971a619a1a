"""Training checkpoints: atomic writes, safe loading and weight loading.

Everything dynconv writes loads with ``torch.load(weights_only=True)``: tensors, dicts, lists,
tuples and primitives only. Configs are stored as plain dicts (``OmegaConf.to_container(cfg,
resolve=True)``), never as ``DictConfig`` or ``argparse.Namespace``, and RNG states as primitives
(:func:`dynconv.rng.rng_state`). Loading never falls back to an unsafe unpickler.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import os
import pickle
import re
import uuid
from pathlib import Path
from typing import IO, Any, Callable, ContextManager, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ._compat import safe_globals

PathLike = Union[str, "os.PathLike[str]"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_LIST_LIMIT = 5
_GLOBAL_IN_ERROR = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit; the message names the file."""


# --------------------------------------------------------------------------------------------------
# Writing


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through ``write(file)`` so that readers see the old file or the whole new one.

    The data goes to a hidden temp file in the same directory (``os.replace`` is atomic only within
    one file system), is fsynced, replaces ``path``, and the directory is fsynced so the rename
    survives a power loss. On any error the temp file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    writer: Optional[_WriteErrors] = None
    try:
        with open(tmp, "xb") as f:  # "x": never clobber another writer's temp file
            writer = _WriteErrors(f)
            write(writer)
            writer.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:  # KeyboardInterrupt / SystemExit must not leave a temp file either
        tmp.unlink(missing_ok=True)
        cause = writer.error if writer is not None and writer.error is not None else err
        if isinstance(cause, OSError) and cause.errno in _DISK_FULL:
            kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written there"
            raise CheckpointError(f"no space left on device writing {path}; {kept}") from err
        raise
    _fsync_dir(path.parent)
    return path


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class _WriteErrors:
    """A binary file that remembers the ``OSError`` of a failed write: ``torch.save`` reports a full disk
    as a ``RuntimeError`` ("unexpected pos ...") that has lost the errno."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        return self._keep(self.file.write, data)

    def flush(self) -> None:
        self._keep(self.file.flush)

    def _keep(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as e:
            self.error = e
            raise


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # directories cannot be opened on Windows; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)`` atomically (see :func:`atomic_write`); returns ``path``."""
    return atomic_write(path, lambda f: torch.save(obj, f))


# --------------------------------------------------------------------------------------------------
# Reading


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a ``.pt`` file with ``weights_only=True``, or a ``.safetensors`` file as a state dict.

    ``argparse.Namespace`` is allowed, as in timm: timm and KernelWarehouse store their run
    arguments that way, and it is plain data.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is truncated or not a checkpoint, or it needs globals that
            ``weights_only`` refuses (no unsafe fallback is attempted).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, map_location)
    try:
        with _allow_namespace():
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = _unsafe_globals(path, e)
        if blocked:
            # torch's own message advises weights_only=False, which would run the file's code: not passed on
            raise CheckpointError(
                f"checkpoint {path} is not a dynconv or official checkpoint: it asks to build Python objects "
                f"that no checkpoint holds ({', '.join(blocked)}), and was not loaded"
            ) from e
        raise _corrupt(path, e) from e
    except (RuntimeError, EOFError, KeyError, IndexError, ValueError) as e:  # what torn / foreign bytes raise
        raise _corrupt(path, e) from e
    _verify_checksum(obj, path)
    return obj


def _allow_namespace() -> ContextManager:
    # torch < 2.5 (the torch 2.1 of an mmdet environment) has no safe_globals: such files then stay refused
    return safe_globals([argparse.Namespace])


def _load_safetensors(path: Path, map_location: Any) -> Dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = str(map_location) if map_location is not None else "cpu"
    try:
        return dict(load_file(path, device=device))
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(path, e) from e


def _unsafe_globals(path: Path, error: BaseException) -> List[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (RuntimeError, ValueError, AttributeError):  # AttributeError: torch < 2.5  # legacy (non-zip) format: read the name from the refusal
        return _GLOBAL_IN_ERROR.findall(str(error))


def _corrupt(path: Path, error: BaseException) -> CheckpointError:
    detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    if "weights_only" in str(error):  # torch's advice to unpickle unsafely: never passed on
        detail = ""
    return CheckpointError(
        f"checkpoint {path} is not a dynconv or official checkpoint, or it is incomplete or corrupt "
        f"(not a readable torch or safetensors file): {type(error).__name__}{': ' + detail if detail else ''}"
    )


# --------------------------------------------------------------------------------------------------
# Checksums: torch verifies nothing on load, so a flipped byte in a tensor loads silently.

CHECKSUM_KEY = "checksum"


def content_checksum(obj: Any) -> str:
    """SHA-256 over a checkpoint's contents: every tensor's dtype, shape and bytes and every other
    value's ``repr``, in the object's own (insertion) order; the ``checksum`` entry itself is left out."""
    digest = hashlib.sha256()

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            items = [(key, item) for key, item in value.items() if key != CHECKSUM_KEY]
            digest.update(f"D{len(items)}".encode())
            for key, item in items:
                digest.update(repr(key).encode())
                visit(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__[0]}{len(value)}".encode())
            for item in value:
                visit(item)
        else:
            digest.update(repr(value).encode())

    visit(obj)
    return digest.hexdigest()


def _verify_checksum(obj: Any, path: Path) -> None:
    """Official files carry no checksum and are taken as they are."""
    stored = obj.get(CHECKSUM_KEY) if isinstance(obj, Mapping) else None
    if not isinstance(stored, Mapping) or "sha256" not in stored:
        return
    if content_checksum(obj) != stored["sha256"]:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its contents no longer match the checksum dynconv stored when it "
            "wrote the file (a damaged copy or disk); use another checkpoint of the run (last.pt / best.pt)"
        )


# --------------------------------------------------------------------------------------------------
# Model weights


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` / ``DataParallel`` and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def clean_state_dict(state: Mapping[str, Any]) -> Dict[str, Any]:
    """``state`` with leading ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes removed."""
    out: Dict[str, Any] = {}
    for key, value in state.items():
        clean = key
        while clean.startswith(_WRAPPER_PREFIXES):
            clean = clean.split(".", 1)[1]
        if clean in out:
            raise ValueError(f"state dict keys collide after removing wrapper prefixes: {clean!r}")
        out[clean] = value
    return out


def first_non_finite(*modules: Optional[nn.Module]) -> Optional[str]:
    """The name of the first parameter or buffer holding a NaN or infinity, or None (what must never be saved)."""
    for module in modules:
        if module is None:
            continue
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return name
    return None


def checkpoint_num_classes(obj: Mapping[str, Any]) -> int:
    """The classifier width of a checkpoint: its ``meta`` says it (dynconv), else the last 2-D weight."""
    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else None
    if meta and meta.get("num_classes"):
        return int(meta["num_classes"])
    state: Any = obj
    for key in ("model", "state_dict", "model_ema", "state_dict_ema"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    weights = [v for k, v in state.items() if isinstance(v, torch.Tensor) and v.ndim == 2 and k.endswith("weight")]
    return int(weights[-1].shape[0]) if weights else 1000


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _select_state(
    obj: Any, use_ema: bool, where: str
) -> Tuple[Mapping[str, Any], Optional[Mapping[str, Any]], str]:
    """``(state dict, dynconv meta or None, what was read)`` from any accepted checkpoint form."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {where} holds a {type(obj).__name__}, not a dict")
    meta = obj.get("meta")
    if isinstance(obj.get("model"), Mapping) and isinstance(meta, Mapping):
        if not use_ema:
            return obj["model"], meta, "dynconv checkpoint"
        if not isinstance(obj.get("ema"), Mapping):
            raise CheckpointError(f"checkpoint {where}: use_ema=True but it holds no 'ema' weights")
        return obj["ema"], meta, "dynconv checkpoint, EMA weights"
    entries = ("state_dict_ema", "model_ema", "ema") if use_ema else ("state_dict", "model", "state_dict_ema")
    for entry in entries:
        if isinstance(obj.get(entry), Mapping):
            return obj[entry], None, f"'{entry}' entry"
    if not use_ema and _is_state_dict(obj):
        return obj, None, "state dict"
    wanted = "EMA weights (" + ", ".join(entries) + ")" if use_ema else "a state dict"
    raise CheckpointError(f"checkpoint {where} holds no {wanted}; top-level keys: {list(obj)[:8]}")


def _check_expect(meta: Optional[Mapping[str, Any]], expect: Optional[Mapping[str, Any]], where: str) -> None:
    if not expect or meta is None:
        return
    if all(meta.get(k) == v for k, v in expect.items()):
        return
    trained = " ".join(f"{k}={meta.get(k)}" for k in expect)
    wanted = " ".join(f"{k}={v}" for k, v in expect.items())
    raise CheckpointError(f"checkpoint {where} was trained for {trained}, but the model is {wanted}")


def _some(keys: List[str]) -> str:
    more = f" (+{len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else ""
    return ", ".join(keys[:_LIST_LIMIT]) + more


def _mismatch_error(
    where: str, model: nn.Module, missing: List[str], unexpected: List[str], shapes: List[str], official: str
) -> CheckpointError:
    lines = [
        f"checkpoint {where} does not fit the {type(model).__name__} model: {len(missing)} missing, "
        f"{len(unexpected)} unexpected, {len(shapes)} shape-mismatched keys"
    ]
    if missing:
        lines.append(f"  missing ({len(missing)}): {_some(missing)}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {_some(unexpected)}")
    if shapes:
        lines.append(f"  shape mismatch ({len(shapes)}): {_some(shapes)}")
    lines.append(f"  not an official checkpoint layout either: {official}")
    lines.append("  pass strict=False to load only the matching tensors")
    return CheckpointError("\n".join(lines))


def load_weights(
    model: nn.Module,
    source: Union[PathLike, Mapping[str, Any]],
    *,
    strict: bool = True,
    expect: Optional[Mapping[str, Any]] = None,
    use_ema: bool = False,
    source_name: Optional[str] = None,
) -> str:
    """Load weights into ``model`` and return a one-line description of what was loaded.

    Args:
        model: the model (DDP / ``torch.compile`` wrappers are looked through).
        source: a ``.pt`` / ``.safetensors`` path or a loaded object: a dynconv training checkpoint
            (``{"model": ..., "meta": {"arch", "conv", ...}, "ema"?: ...}``), a dict with a
            ``state_dict`` / ``model`` / ``state_dict_ema`` entry, or a bare state dict.
            ``module.`` / ``_orig_mod.`` prefixes are removed. Files of the official ODConv / KW /
            DCD / DGC / IC-Conv code load through :func:`dynconv.import_official`.
        strict: every key and shape must match. ``strict=False`` loads the tensors that match and
            says in the description how many were skipped.
        expect: e.g. ``{"arch": "resnet18", "conv": "odconv_4x"}``; checked against the dynconv
            checkpoint's ``meta``.
        use_ema: read the EMA weights (``ema``, ``state_dict_ema`` or ``model_ema``).
        source_name: how messages name an in-memory ``source`` (e.g. the file it was read from).

    Raises:
        CheckpointError: unreadable file, ``meta`` disagreeing with ``expect``, or keys / shapes that
            fit neither the model nor an official layout (the first keys of each kind are listed).
    """
    if isinstance(source, Mapping):
        where, obj = source_name or "<in-memory checkpoint>", source
    else:
        where, obj = str(source), load_checkpoint(source)
    raw, meta, form = _select_state(obj, use_ema, where)
    _check_expect(meta, expect, where)
    model = unwrap_model(model)
    bad = next((k for k, v in raw.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"checkpoint {where}: entry {bad!r} is a {type(raw[bad]).__name__}, not a tensor")
    try:
        state = clean_state_dict(raw)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {where}: {e}") from e

    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [
        f"{k}: checkpoint {list(v.shape)} vs model {list(target[k].shape)}"
        for k, v in state.items() if k in target and v.shape != target[k].shape
    ]
    trained = f", arch={meta.get('arch')} conv={meta.get('conv')}" if meta else ""
    origin = f"from {where} ({form}{trained})"
    if not (missing or unexpected or shapes):
        model.load_state_dict(state, strict=True)
        return f"loaded {len(state)} tensors {origin}"

    from .official import import_official  # official layouts rename keys; try them before giving up

    try:
        # With use_ema, hand over the EMA entry itself: import_official only knows KW's 'model_ema'.
        report = import_official(model, raw if use_ema else obj)
    except (ValueError, KeyError) as e:
        official = str(e).split("; ")[0]
    else:
        report.source = where
        return str(report)
    if strict:
        raise _mismatch_error(where, model, missing, unexpected, shapes, official)
    fitting = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}
    model.load_state_dict(fitting, strict=False)
    return (
        f"loaded {len(fitting)} of {len(target)} tensors {origin}; strict=False skipped "
        f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} shape-mismatched keys"
    )


# --------------------------------------------------------------------------------------------------
# Run directory


class CheckpointManager:
    """Named checkpoints (``last``, ``best``) in a run directory, written by the primary rank only.

    State dicts must hold only what ``weights_only=True`` loads: tensors, containers, primitives,
    configs as plain dicts.
    """

    def __init__(self, run_dir: PathLike, is_primary: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.is_primary = is_primary

    def path(self, name: str) -> Path:
        if not name or Path(name).name != name or name.startswith("."):
            raise ValueError(f"checkpoint name must be a plain file stem, got {name!r}")
        return self.run_dir / f"{name}.pt"

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def save(self, name: str, state: Mapping[str, Any]) -> Optional[Path]:
        """Write ``run_dir/<name>.pt`` atomically with its content checksum (verified by
        :func:`load_checkpoint`); a no-op returning ``None`` on non-primary ranks."""
        if not self.is_primary:
            return None
        state = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
        state[CHECKSUM_KEY] = {"sha256": content_checksum(state)}
        return atomic_save(state, self.path(name))

    def load(self, name: str, map_location: Any = "cpu") -> Optional[Dict[str, Any]]:
        """The checkpoint ``name``, or ``None`` when there is none."""
        return load_checkpoint(self.path(name), map_location) if self.exists(name) else None

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.run_dir)!r}, is_primary={self.is_primary})"


__all__ = [
    "CHECKSUM_KEY",
    "CheckpointError",
    "CheckpointManager",
    "atomic_save",
    "atomic_write",
    "clean_state_dict",
    "content_checksum",
    "first_non_finite",
    "load_checkpoint",
    "load_weights",
    "rng_state",
    "set_rng_state",
    "unwrap_model",
]
