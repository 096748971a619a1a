"""Scoring a classifier: top-1 / top-5 / loss over a loader (summed across ranks), and images/s."""
from __future__ import annotations

import time
from typing import Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum
from .runtime import autocast, to_device


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, device: torch.device, amp: str = "none",
             channels_last: bool = False, limit: Optional[int] = None) -> Dict[str, float]:
    """``loss``, ``top1``, ``top5`` (percent) and ``count`` over ``loader``, summed over all ranks.

    Each rank should see a disjoint, unpadded shard, so the totals count every image once.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    for i, (images, targets) in enumerate(loader):
        if limit is not None and i >= limit:
            break
        images, targets = to_device(images, device, channels_last), targets.to(device)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(targets[:, None])
        totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                               hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                               torch.tensor(float(len(targets)), device=device, dtype=torch.float64)])
    all_reduce_sum(totals)
    loss, top1, top5, count = totals.tolist()
    n = max(count, 1.0)
    return {"loss": loss / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "count": int(count)}


@torch.no_grad()
def images_per_second(model: nn.Module, batch: torch.Tensor, *, device: torch.device, amp: str = "none",
                      channels_last: bool = False, repeats: int = 5, warmup: int = 2) -> float:
    """Eval-mode throughput on one batch repeated (median of ``repeats`` timed forwards)."""
    model.eval()
    batch = to_device(batch, device, channels_last)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast(device, amp):
            model(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return len(batch) / times[len(times) // 2]
