"""The engine's own error: a run whose numbers stopped being numbers."""
from __future__ import annotations


class NonFiniteLossError(FloatingPointError):
    """The (all-reduced) training loss is NaN or infinite, or the model's weights or statistics are."""


__all__ = ["NonFiniteLossError"]
