"""``eval.py``'s job: score a dynconv or official checkpoint on a validation set, report timm-style results."""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..accounting import count_macs, count_params
from ..checkpoint import atomic_write, load_checkpoint, load_weights
from ..data import build_loader
from ..malloc import reuse_freed_memory
from ..schedules import set_progress
from .builders import build_data, build_model, loader_workers
from .config import validate
from .distributed import resolve_device
from .evaluate import evaluate, images_per_second, to_channels_last


def load_for_eval(model: torch.nn.Module, cfg: Any, state: Optional[Mapping[str, Any]] = None, **expect: str) -> str:
    """Load ``cfg.checkpoint`` (or its already read ``state``), checked against arch, conv and ``expect``;
    a dynconv run's layer schedules are set where that run left them. Returns what was loaded."""
    state = load_checkpoint(cfg.checkpoint) if state is None else state
    loaded = load_weights(model, state, expect={"arch": cfg.model.name, "conv": cfg.conv.name, **expect},
                          use_ema=cfg.use_ema)
    meta = state.get("meta") if isinstance(state.get("meta"), dict) else {}
    progress = meta.get("schedule_progress", meta.get("epoch"))
    if progress is not None:  # mid-schedule temperatures, not the end values a fresh model holds
        set_progress(model, progress)
    return loaded.replace("<in-memory checkpoint>", str(cfg.checkpoint))


def eval_transform(cfg: Any, state: Optional[Mapping[str, Any]]) -> Tuple[str, float, str]:
    """Resize interpolation and crop fraction to evaluate with, and where they came from.

    A checkpoint is scored the way its run was validated: ``interpolation=`` / ``crop_pct=`` on the command
    line win; else a dynconv checkpoint's stored config (``recipe.aug.eval_interpolation``,
    ``data.crop_pct``); else, for official files, which carry no config, the recipe named for evaluation
    (``recipe=convnext_300ep`` gives the bicubic resize the KernelWarehouse 300-epoch models were validated
    with: its ``datasets.py``) and ``data.crop_pct``.
    """
    stored = state.get("config") if isinstance(state, Mapping) else None
    stored = stored if isinstance(stored, Mapping) else {}
    trained_aug = (stored.get("recipe") or {}).get("aug") or {}
    trained_crop = (stored.get("data") or {}).get("crop_pct")
    if cfg.interpolation is not None:
        interpolation, source = cfg.interpolation, "interpolation="
    elif trained_aug.get("eval_interpolation"):
        interpolation, source = trained_aug["eval_interpolation"], f"the checkpoint's recipe ({stored['recipe'].get('name')})"
    else:
        interpolation, source = cfg.recipe.aug.eval_interpolation, f"recipe={cfg.recipe.name}"
    if cfg.crop_pct is not None:
        crop_pct = cfg.crop_pct
    else:
        crop_pct = trained_crop if trained_crop is not None else cfg.data.crop_pct
    return interpolation, crop_pct, source


def run_eval(cfg: Any) -> Dict[str, Any]:
    """Score ``cfg.checkpoint`` (dynconv or official layout) on the validation split of ``cfg.data``.

    Single process on purpose: a padded distributed split would count some images twice. Prints and
    returns timm ``validate.py``-style results, and writes them as JSON to ``cfg.output`` when set.
    """
    if cfg.task == "detection":
        from .detection import run_eval_detection

        return run_eval_detection(cfg)
    validate(cfg)
    torch.manual_seed(cfg.seed)
    t = cfg.trainer
    device = resolve_device(t.device)
    if t.reuse_freed_memory:
        reuse_freed_memory(device)
    state = load_checkpoint(cfg.checkpoint) if cfg.checkpoint else None
    interpolation, crop_pct, transform_source = eval_transform(cfg, state)
    data = build_data(dataclasses.replace(cfg.data, crop_pct=crop_pct), None, eval_interpolation=interpolation)
    model = build_model(cfg.model, cfg.conv, data.num_classes)
    loaded = load_for_eval(model, cfg, state) if state is not None else "no checkpoint: a freshly initialised model"
    size = cfg.data.image_size
    params, macs = count_params(model), count_macs(model, (1, 3, size, size))
    model.to(device)
    if t.channels_last:
        to_channels_last(model)
    loader = build_loader(data.val, batch_size=cfg.batch_size or 100, train=False, workers=loader_workers(t.workers))
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
        "img_size": size, "crop_pct": crop_pct, "interpolation": interpolation, "transform_from": transform_source,
        "eval_samples_per_sec": round(metrics["count"] / elapsed, 2),
        "device": str(device), "data": cfg.data.name,
    }
    if cfg.bench_batches:
        images = next(iter(loader))[0]
        result["infer_samples_per_sec"] = round(images_per_second(
            model, images, device=device, amp=t.amp, channels_last=t.channels_last, repeats=cfg.bench_batches), 2)
        result["infer_batch_size"] = len(images)
    if cfg.output:
        atomic_write(cfg.output, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    return result
