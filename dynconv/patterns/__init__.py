"""Dilation patterns of IC-Conv: the files released with it (yifan123/IC-Conv ``pattern_zoo``, see
``README.md`` here), reading and writing them in the official format, and hand-set defaults.

A pattern is ``{(d_h, d_w): channels}`` for one layer (1-based dilations, key order = output channel order);
a network's patterns are a list in layer order (:func:`dynconv.surgery.icconv.icconv_sites`).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from ..ops.icconv import Dilation, Pattern, _check_pattern

PATTERN_DIR = Path(__file__).resolve().parent
PatternSource = Union[str, Path, Sequence[Mapping[Any, int]]]

# Dilation grids of the released patterns: "k9" = dilations 1..4 per axis (3x3 extent up to 9),
# "k13" = 1..6 (extent up to 13).
GRIDS: Dict[str, int] = {"k9": 4, "k13": 6}


def dilation_grid(grid: Union[str, int] = "k9") -> List[Dilation]:
    """Candidate dilations of a grid in the official key order (``d_h`` major): ``(1, 1), (1, 2), ...``."""
    d_max = _grid_max(grid)
    return [(a, b) for a in range(1, d_max + 1) for b in range(1, d_max + 1)]


def _grid_max(grid: Union[str, int]) -> int:
    if isinstance(grid, int) and grid >= 1:
        return grid
    if grid not in GRIDS:
        raise ValueError(f"unknown dilation grid {grid!r}; choose one of {sorted(GRIDS)} or a maximum dilation")
    return GRIDS[grid]


_KEY = re.compile(r"^\(\s*(\d+)\s*,\s*(\d+)\s*\)$")
# The released segmentation ResNet101 patterns are the detection ones (same file in pattern_zoo).
_ALIASES = {"segmentation_ic_resnet101_k9": "detection_ic_resnet101_k9"}


def official_pattern_names() -> List[str]:
    """Names of the shipped pattern files (yifan123/IC-Conv ``pattern_zoo``), e.g. ``detection_ic_resnet50_k9``."""
    return sorted([p.stem for p in PATTERN_DIR.glob("*.json")] + list(_ALIASES))


def official_pattern_path(name: str) -> Path:
    """Path of a shipped pattern file, by name (see :func:`official_pattern_names`)."""
    path = PATTERN_DIR / f"{_ALIASES.get(name, name)}.json"
    if not path.is_file():
        raise ValueError(f"no official IC-Conv pattern {name!r}; available: {', '.join(official_pattern_names())}")
    return path


def load_patterns(source: PatternSource) -> List[Pattern]:
    """Read dilation patterns, one per layer in network order.

    Args:
        source: a JSON file in the official format (a list of objects whose keys ``"(a, b)"`` mean
            dilation ``(a + 1, b + 1)`` and whose values are channel counts), the name of a shipped
            file, or an already-parsed list: official string keys, or ``(d_h, d_w)`` tuples (1-based).

    Returns:
        ``[{(d_h, d_w): channels}]`` with zero counts dropped, key order kept (it is channel order).
    """
    where = "patterns"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file() and isinstance(source, str) and source in official_pattern_names():
            path = official_pattern_path(source)
        where = str(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
    else:
        data = source
    if not isinstance(data, (list, tuple)):
        raise ValueError(f"{where}: expected a list of patterns (one per layer), got {type(data).__name__}")
    patterns = []
    for i, entry in enumerate(data):
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: entry {i} is a {type(entry).__name__}, expected an object")
        pattern: Pattern = {}
        seen = set()
        for key, count in entry.items():
            if isinstance(key, str):
                match = _KEY.match(key)
                if match is None:
                    raise ValueError(f"{where}: entry {i} has key {key!r}; expected \"(a, b)\" with a, b >= 0")
                d = (int(match.group(1)) + 1, int(match.group(2)) + 1)
            elif isinstance(key, tuple) and len(key) == 2 and all(isinstance(v, int) and v >= 1 for v in key):
                d = key
            else:
                raise ValueError(f"{where}: entry {i} has key {key!r}; expected \"(a, b)\" or a dilation tuple")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"{where}: entry {i}, key {key!r}: count must be a non-negative int, got {count!r}")
            if d in seen:
                raise ValueError(f"{where}: entry {i} gives dilation {d} twice")
            seen.add(d)
            if count:
                pattern[d] = count
        patterns.append(pattern)
    return patterns


def save_patterns(patterns: Sequence[Mapping[Dilation, int]], path: Union[str, Path],
                  grid: Optional[Union[str, int]] = None) -> Path:
    """Write patterns in the official format: keys ``"(a, b)"`` (0-based), every key of the grid present.

    Args:
        patterns: ``[{(d_h, d_w): channels}]`` per layer; key order is channel order. Keys are written
            in grid order with the missing ones at count 0 (the official layout) when that keeps the
            channel order, else the pattern's keys first and the grid's missing ones after them.
        path: output file, written atomically.
        grid: ``"k9"``, ``"k13"`` or a maximum dilation; default the smallest of k9 / k13 that holds every
            dilation (else only the keys present).
    """
    patterns = [_check_pattern(p) for p in patterns]
    used = max((max(d) for p in patterns for d in p), default=1)
    if grid is None:
        grid = next((g for g, d_max in GRIDS.items() if used <= d_max), used)
    if used > _grid_max(grid):
        raise ValueError(f"dilation {used} is outside grid {grid!r}")
    keys = dilation_grid(grid)
    entries = []
    for p in patterns:
        used_in_grid_order = [d for d in keys if d in p] == list(p)
        order = keys if used_in_grid_order else list(p) + [d for d in keys if d not in p]
        entries.append({f"({a - 1}, {b - 1})": p.get((a, b), 0) for a, b in order})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(entries, indent=2) + "\n")
    tmp.replace(path)
    return path


def default_patterns(
    widths: Sequence[int],
    stages: Sequence[int],
    grid: Union[str, int] = "k9",
    early_stages: int = 2,
    units: Optional[Sequence[int]] = None,
) -> List[Pattern]:
    """Hand-set patterns for networks without a searched file, as the IC-Conv author advises
    (yifan123/IC-Conv issues #5, #6): dilation ``(1, 1)`` gets 50% of a layer's channels in early layers
    and 70% in later ones, the rest is spread uniformly over the grid's other dilations.

    "Early" means stages ``0 .. early_stages - 1`` (ResNet ``layer1``-``layer2``, ConvNeXt stages 0-1,
    timm MobileNetV2 ``blocks.0``-``blocks.1``). Counts are in multiples of ``units[i]`` (1 by default;
    a grouped layer's group width): ``round(ratio * blocks)`` blocks go to ``(1, 1)``, the remainder
    is divided evenly and its leftover given one block each to the other dilations in grid order.
    """
    if len(widths) != len(stages):
        raise ValueError(f"{len(widths)} widths but {len(stages)} stages")
    units = list(units) if units is not None else [1] * len(widths)
    others = [d for d in dilation_grid(grid) if d != (1, 1)]
    patterns = []
    for width, stage, unit in zip(widths, stages, units):
        if width % unit:
            raise ValueError(f"width {width} is not a multiple of its unit {unit}")
        blocks = width // unit
        ratio = 0.5 if stage < early_stages else 0.7
        centre = min(blocks, math.floor(ratio * blocks + 0.5))
        share, leftover = divmod(blocks - centre, len(others))
        pattern: Pattern = {(1, 1): centre * unit}
        for i, d in enumerate(others):
            pattern[d] = (share + (i < leftover)) * unit
        patterns.append({d: n for d, n in pattern.items() if n})
    return patterns
