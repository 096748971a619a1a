"""``eval.py``'s job: score a dynconv or official checkpoint on a validation set, report timm-style results."""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from ..accounting import count_macs, count_params
from ..checkpoint import CheckpointError, atomic_write, first_non_finite, load_checkpoint, load_weights
from ..data import build_loader
from ..deploy import deploy
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
                          source_name=str(cfg.checkpoint),
                          use_ema=cfg.use_ema)
    meta = state.get("meta") if isinstance(state.get("meta"), dict) else {}
    progress = meta.get("schedule_progress", meta.get("epoch"))
    if progress is not None:  # mid-schedule temperatures, not the end values a fresh model holds
        set_progress(model, progress)
    return loaded.replace("<in-memory checkpoint>", str(cfg.checkpoint))


def check_class_names(state: Optional[Mapping[str, Any]], classes: Sequence[str], checkpoint: Any,
                      ignore: bool = False) -> Optional[str]:
    """Refuse to score a checkpoint on data whose class names differ from those it was trained on.

    A dynconv checkpoint stores its run's class names (``meta["classes"]``, in label order). With other
    names, or the same in another order, label ``i`` of the data is not the class output ``i`` was trained
    for, and top-1 is measured against the wrong labels without any error. Official files store no names
    and are not checked; a dynconv checkpoint without them (written before they were stored) cannot be.

    Returns:
        a warning to print (names that could not be checked, or differences ignored), or None.

    Raises:
        CheckpointError: the names differ and ``ignore`` is False (``ignore_class_names=true`` scores anyway).
    """
    meta = state.get("meta") if isinstance(state, Mapping) else None
    if not isinstance(meta, Mapping):
        return None  # an official file or a bare state dict: no names to check against
    stored = meta.get("classes")
    if stored is None:
        return (f"warning: {checkpoint} stores no class names (written by an older dynconv), so they cannot be "
                f"checked against the data's {len(classes)} classes")
    stored, classes = [str(c) for c in stored], [str(c) for c in classes]
    if stored == classes:
        return None
    first = next(i for i in range(max(len(stored), len(classes)))
                 if i >= len(stored) or i >= len(classes) or stored[i] != classes[i])
    at = lambda names: repr(names[first]) if first < len(names) else "nothing"  # noqa: E731
    problem = (f"{checkpoint} was trained on {len(stored)} classes, the data has {len(classes)}, and they differ "
               f"first at label {first}: {at(stored)} in the checkpoint, {at(classes)} in the data "
               f"(only in the checkpoint: {sorted(set(stored) - set(classes))[:5]}, only in the data: "
               f"{sorted(set(classes) - set(stored))[:5]})")
    if not ignore:
        raise CheckpointError(f"{problem}: the scores would count the wrong labels. Evaluate on the run's "
                              f"classes (data.root, data.classes / data.num_classes), or set "
                              f"ignore_class_names=true to score anyway")
    return f"warning: {problem}; scoring anyway (ignore_class_names=true)"


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
        if cfg.deploy:
            raise ValueError("deploy=true scores classification models only (task=classification)")
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
    warning = check_class_names(state, data.classes, cfg.checkpoint, ignore=cfg.ignore_class_names)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    model = build_model(cfg.model, cfg.conv, data.num_classes)
    loaded = load_for_eval(model, cfg, state) if state is not None else "no checkpoint: a freshly initialised model"
    size = cfg.data.image_size
    params, macs = count_params(model), count_macs(model, (1, 3, size, size))
    folded = None
    if cfg.deploy:  # the inference copy: same outputs, BatchNorms folded (params / MACs above: the paper's count)
        folds: list = []
        example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        model = deploy(model.eval(), example, report=folds)
        folded = len(folds)
    model.to(device)
    if t.channels_last:
        to_channels_last(model)
    loader = build_loader(data.val, batch_size=cfg.batch_size or 100, train=False, workers=loader_workers(t.workers))
    start = time.perf_counter()
    metrics = evaluate(model, loader, device=device, amp=t.amp, channels_last=t.channels_last,
                       limit=t.limit_eval_batches)
    elapsed = time.perf_counter() - start
    if not math.isfinite(metrics["loss"]):
        from .trainer import NonFiniteLossError

        bad = first_non_finite(model)
        where = f" ({bad} holds a NaN or infinity)" if bad else ""
        raise NonFiniteLossError(f"non-finite evaluation loss ({metrics['loss']}) with "
                                 f"{cfg.checkpoint or 'a fresh model'}{where}: these weights cannot be scored")
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
    if folded is not None:
        result["deployed_norms_folded"] = folded
    if cfg.bench_batches:
        images = next(iter(loader))[0]
        result["infer_samples_per_sec"] = round(images_per_second(
            model, images, device=device, amp=t.amp, channels_last=t.channels_last, repeats=cfg.bench_batches), 2)
        result["infer_batch_size"] = len(images)
    if cfg.output:
        atomic_write(cfg.output, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    return result
