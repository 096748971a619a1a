"""Dilation patterns released with IC-Conv (yifan123/IC-Conv ``pattern_zoo``); see ``README.md`` here.

Read them with :func:`dynconv.ops.icconv.load_patterns` or by name through
:func:`dynconv.ops.icconv.official_pattern_path`.
"""
from pathlib import Path

PATTERN_DIR = Path(__file__).resolve().parent
