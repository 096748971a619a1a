"""Datasets the project generates itself, written once under a cache directory.

A finished set holds a marker file with the settings it was made with: the same settings reuse it,
other settings are refused by name. A set is written to a temporary sibling directory and renamed into
place, so concurrent processes (DDP ranks, test workers) never see half a set.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Union


def _existing(root: Path, params: Dict[str, Any], marker: str, kind: str) -> bool:
    path = root / marker
    if not path.is_file():
        return False
    found = json.loads(path.read_text())
    if found != params:
        diff = {k: (found.get(k), v) for k, v in params.items() if found.get(k) != v}
        raise ValueError(f"{path}: the {kind} there was made with other settings (found, asked): {diff}; "
                         f"use another root")
    return True


def generate_once(root: Union[str, os.PathLike], params: Dict[str, Any], marker: str, kind: str,
                  write: Callable[[Path], None]) -> Path:
    """``root``, after ``write(directory)`` has filled it, unless a set with ``params`` is already there.

    Args:
        root: the dataset directory.
        params: the settings, recorded in ``root/marker`` (JSON) and compared on reuse.
        marker: the marker file's name.
        kind: what the set is, for messages ("synthetic COCO set").
        write: fills the (existing, empty) directory it is given.

    Raises:
        ValueError: ``root`` holds another set or anything else.
    """
    root = Path(root)
    if _existing(root, params, marker, kind):
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"{root} exists and is not a dynconv {kind}; use another root")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        write(tmp)
        (tmp / marker).write_text(json.dumps(params, indent=1) + "\n")
        try:
            if root.exists():
                root.rmdir()  # empty when checked above, unless another process has finished since
            os.rename(tmp, root)
        except OSError:  # another process finished first
            if not _existing(root, params, marker, kind):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


__all__ = ["generate_once"]
