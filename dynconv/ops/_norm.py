"""BatchNorm for attention branches that must also train with batch size 1.

The official ODConv and KernelWarehouse attentions normalise a ``(B, C)`` pooled vector with
BatchNorm, which raises "Expected more than 1 value per channel" when training with one sample
(OSVAI/ODConv issues #11, #23, #27). These subclasses keep the state-dict layout of
``nn.BatchNorm{1,2}d`` and, when a training batch holds exactly one value per channel, normalise
with the running statistics and leave them untouched (batch statistics are undefined there).
With two or more values per channel they behave exactly like the parent class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _one_value_per_channel(x: torch.Tensor) -> bool:
    return x.numel() == x.shape[1]


class _RunningStatsFallback:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.running_mean is not None and _one_value_per_channel(x):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class SafeBatchNorm1d(_RunningStatsFallback, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that uses running statistics for a one-sample training batch."""


class SafeBatchNorm2d(_RunningStatsFallback, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that uses running statistics for a one-sample training batch."""
