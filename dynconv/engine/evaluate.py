"""Scoring a classifier: top-1 / top-5 / loss over a loader (summed across ranks), and images/s."""
from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision for ``amp`` in ``bf16``/``fp16``, nothing for ``none``."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("trainer.amp=fp16 needs a CUDA device; use trainer.amp=bf16 or none on CPU")
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def to_channels_last(model: nn.Module) -> nn.Module:
    """Channels-last for every 4-D parameter and buffer; ``model.to(memory_format=...)`` refuses the
    5-D expert banks of CondConv / DY-Conv / ODConv."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.ndim == 4:
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return model


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


def run_eval(cfg: Any) -> Dict[str, Any]:
    """Score ``cfg.checkpoint`` (dynconv or official layout) on the validation split of ``cfg.data``.

    Single process on purpose: a padded distributed split would count some images twice. Prints and
    returns timm ``validate.py``-style results, and writes them as JSON to ``cfg.output`` when set.
    """
    from ..accounting import count_macs, count_params
    from ..checkpoint import load_checkpoint, load_weights
    from ..schedules import set_progress
    from .builders import build_data, build_model
    from .config import validate
    from .distributed import resolve_device
    from ..data import build_loader

    validate(cfg)
    torch.manual_seed(cfg.seed)
    t = cfg.trainer
    device = resolve_device(t.device)
    data = build_data(cfg.data, None, eval_interpolation=cfg.interpolation)
    model = build_model(cfg.model, cfg.conv, data.num_classes)
    loaded = "no checkpoint: a freshly initialised model"
    if cfg.checkpoint:
        state = load_checkpoint(cfg.checkpoint)
        loaded = load_weights(model, state, expect={"arch": cfg.model.name, "conv": cfg.conv.name},
                              use_ema=cfg.use_ema).replace("<in-memory checkpoint>", str(cfg.checkpoint))
        progress = state.get("meta", {}).get("epoch") if isinstance(state.get("meta"), dict) else None
        if progress is not None:  # a dynconv run stopped mid-schedule: its temperatures, not the end values
            set_progress(model, progress)
    size = cfg.data.image_size
    params, macs = count_params(model), count_macs(model, (1, 3, size, size))
    model.to(device)
    if t.channels_last:
        to_channels_last(model)
    loader = build_loader(data.val, batch_size=cfg.batch_size, train=False, workers=t.workers)
    start = time.perf_counter()
    metrics = evaluate(model, loader, device=device, amp=t.amp, channels_last=t.channels_last,
                       limit=t.limit_eval_batches)
    elapsed = time.perf_counter() - start
    result = {
        "model": cfg.model.name, "conv": cfg.conv.name, "checkpoint": cfg.checkpoint, "loaded": loaded,
        "top1": round(metrics["top1"], 3), "top1_err": round(100 - metrics["top1"], 3),
        "top5": round(metrics["top5"], 3), "top5_err": round(100 - metrics["top5"], 3),
        "loss": metrics["loss"], "num_images": metrics["count"],
        "param_count": round(params / 1e6, 3), "macs_g": round(macs / 1e9, 4),
        "img_size": size, "crop_pct": cfg.data.crop_pct, "interpolation": cfg.interpolation,
        "eval_samples_per_sec": round(metrics["count"] / elapsed, 2),
        "device": str(device), "data": cfg.data.name,
    }
    if cfg.bench_batches:
        images = next(iter(loader))[0]
        result["infer_samples_per_sec"] = round(images_per_second(
            model, images, device=device, amp=t.amp, channels_last=t.channels_last, repeats=cfg.bench_batches), 2)
        result["infer_batch_size"] = len(images)
    if cfg.output:
        from ..checkpoint import atomic_write

        atomic_write(cfg.output, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    return result
