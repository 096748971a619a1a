"""Every config in configs/mmdet/ built into its full detector and trained on CPU, in the mmdet environment.

Run with the mmdet environment's Python (``make mmdet-env``; ``.ci/run`` does it after the test suite)::

    .venv-mmdet/bin/python scripts/mmdet_stage.py [--only NAME ...] [--build-only NAME ...]

For each config this:

1. builds the detector the config describes (80 COCO classes) and checks its parameter count against the
   "built" column of ``configs/mmdet/README.md``;
2. writes an ImageNet classifier checkpoint of the config's arch and conv with dynconv's own checkpoint
   writer (:class:`dynconv.checkpoint.CheckpointManager`, random weights), or for an ``init_cfg`` with
   ``static=True`` (FDConv's configs) a plain state dict of the static arch, and points the config's
   ``init_cfg`` at it;
3. trains one epoch of two iterations (4 images, batch 2) on the generated ``synthetic_coco`` set
   (``dynconv.data.synthetic_coco``, 5 classes) through mmengine's ``Runner``: the config's own dataset
   class, data pipeline (its image scales shrunk to the 128-px images), batch sampler, optimizer wrapper,
   parameter-wise settings and schedulers. Checked: ``init_weights`` loaded the checkpoint into the
   backbone; every logged loss of both iterations is finite; the parameters stay finite, the frozen
   stages do not move and the trained backbone stages do.

First, every conv family (``dynconv.list_convs()``) runs as a ResNet18 detection backbone on this torch:
forward and backward in fp32 and under CPU bfloat16 autocast, a dynconv checkpoint loaded, schedules set
(:func:`check_families`); this is what ``dynconv/_compat.py`` exists for.

One config (``--test-config``) then runs mmdet's test loop (``Runner.test()`` with ``CocoMetric``, box and
mask) on the generated validation images and reports its AP (near 0 after two steps: the point is that
the loop, the metric and the mask path run). Exits non-zero when any check fails.
"""
from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # dynconv from this checkout, whatever the environment has installed

import torch  # noqa: E402
from mmengine.config import Config, ConfigDict  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import dynconv  # noqa: E402
from dynconv.checkpoint import CheckpointManager  # noqa: E402
from dynconv.data.synthetic_coco import CATEGORIES, make_synthetic_coco  # noqa: E402

CONFIG_DIR = ROOT / "configs" / "mmdet"
README = CONFIG_DIR / "README.md"
CLASSES = tuple(c["name"] for c in CATEGORIES)
TEST_CONFIG = "mask_rcnn_odconv4x_mobilenetv2_100_fpn_1x_coco"
# mmdet's COCO scale (1333, 800) -> (213, 128): the generated images are about 128 px
SCALE = 0.16


def readme_counts(path: Path = README) -> Dict[str, float]:
    """Config name -> the "built" parameter count (millions) of the README's tables."""
    counts: Dict[str, float] = {}
    column: Optional[int] = None
    for line in path.read_text().splitlines():
        if not line.startswith("|"):
            column = None if not line.strip() else column
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "config":
            column = next((i for i, c in enumerate(cells) if c.startswith("built")), None)
            continue
        name = re.fullmatch(r"`([\w.]+)`", cells[0])
        if name and column is not None:
            counts[name.group(1)] = float(re.match(r"([\d.]+)M", cells[column]).group(1))
    return counts


def shrink(node: Any, factor: float) -> Any:
    """The pipeline with every image scale / crop size (``scale``, ``scales``, ``crop_size``) times ``factor``."""
    if isinstance(node, (list, tuple)):
        return type(node)(shrink(n, factor) for n in node)
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in ("scale", "crop_size") and isinstance(value, (list, tuple)):
                value = tuple(max(1, round(v * factor)) for v in value)
            elif key == "scales" and isinstance(value, (list, tuple)):
                value = [tuple(max(1, round(v * factor)) for v in s) for s in value]
            else:
                value = shrink(value, factor)
            out[key] = value
        return out
    return node


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal`` that also matches NaN with NaN: a schedule-driven layer's progress buffer is NaN
    until a schedule sets it, and a checkpoint carries that NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)


def _set_num_classes(model: ConfigDict, num_classes: int) -> None:
    heads = model.roi_head
    for head in ("bbox_head", "mask_head"):
        if head in heads:
            heads[head].num_classes = num_classes


def _dataset(cfg_dataset: ConfigDict, data_root: Path, split: str, images: int) -> dict:
    ds = cfg_dataset.to_dict()
    ds.update(data_root=str(data_root) + "/", ann_file=f"annotations/instances_{split}.json",
              data_prefix=dict(img=f"{split}/"), metainfo=dict(classes=CLASSES), indices=images)
    ds["pipeline"] = shrink(ds["pipeline"], SCALE)
    return ds


class StageCheck(Hook):
    """Records the losses of each iteration and checks the backbone before and after training."""

    priority = "VERY_LOW"

    def __init__(self, backbone_state: Dict[str, torch.Tensor]) -> None:
        self.backbone_state = backbone_state  # what init_weights must have loaded (all or part of the body)
        self.start: Dict[str, torch.Tensor] = {}
        self.losses: List[Dict[str, float]] = []
        self.failures: List[str] = []

    @staticmethod
    def _backbone(runner):
        model = runner.model.module if hasattr(runner.model, "module") else runner.model
        return model.backbone

    def before_train(self, runner) -> None:
        body = self._backbone(runner).dynconv.body.state_dict()
        self.start = {k: v.detach().clone() for k, v in body.items()}
        wrong = [k for k, v in self.backbone_state.items() if k not in body or not _same(body[k], v)]
        if not self.backbone_state or wrong:
            self.failures.append(f"init_weights did not load the checkpoint ({len(wrong)} tensors differ)")

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        values = {k: float(v) for k, v in (outputs or {}).items()}
        self.losses.append(values)
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad or "loss" not in values:
            self.failures.append(f"iteration {batch_idx}: non-finite or missing losses {bad or values}")

    def after_train(self, runner) -> None:
        backbone = self._backbone(runner)
        params = dict(backbone.dynconv.body.named_parameters())
        if not all(torch.isfinite(p).all() for p in params.values()):
            self.failures.append("non-finite backbone parameters after training")
        moved = {n for n, p in params.items() if not _same(p.detach(), self.start[n])}
        frozen = {n for n, p in params.items() if not p.requires_grad}
        if moved & frozen:
            self.failures.append(f"frozen parameters changed: {sorted(moved & frozen)[:3]}")
        if not moved - frozen:
            self.failures.append("no trainable backbone parameter changed in two steps")


def check_families(arch: str = "resnet18") -> List[str]:
    """Every conv family as a detection backbone on this torch: forward and backward in fp32 and under CPU
    bfloat16 autocast, a checkpoint written by dynconv loaded into it, and its schedules (temperature,
    KW mixing, DGC pruning) set. Returns one line per failure."""
    from dynconv.detection.backbone import DynamicBackbone
    from dynconv.schedules import scheduled_modules, set_progress

    failures: List[str] = []
    with tempfile.TemporaryDirectory(prefix="dynconv-families-") as tmp:
        for conv in dynconv.list_convs():
            t0 = time.time()
            try:
                torch.manual_seed(0)
                backbone = DynamicBackbone(arch, conv, frozen_stages=-1, norm_eval=False).train()
                x = torch.randn(2, 3, 32, 32)
                for autocast in (False, True):
                    backbone.zero_grad(set_to_none=True)
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        levels = list(backbone(x).values())
                        loss = sum(level.float().square().mean() for level in levels)
                    loss.backward()
                    grads = [p.grad for p in backbone.parameters() if p.requires_grad]
                    if not math.isfinite(loss.item()) or any(g is None or not torch.isfinite(g).all() for g in grads):
                        failures.append(f"{conv}: non-finite loss or missing / non-finite gradients "
                                        f"(autocast={autocast})")
                # a dynconv training checkpoint of the ImageNet classifier, loaded strictly
                classifier = dynconv.create_model(arch, conv)
                path = CheckpointManager(Path(tmp) / conv).save("best", {
                    "model": classifier.state_dict(), "ema": None,
                    "meta": {"arch": arch, "conv": conv, "num_classes": 1000}})
                backbone.load_pretrained(path)
                state = classifier.state_dict()
                if not all(_same(v, state[k]) for k, v in backbone.body.state_dict().items()):
                    failures.append(f"{conv}: the checkpoint did not load")
                # schedules: the start of training differs from the end for every scheduled family
                if scheduled_modules(backbone.body):
                    backbone.eval()
                    with torch.no_grad():
                        end = list(backbone(x).values())[-1]
                        set_progress(backbone.body, 0.0)
                        start = list(backbone(x).values())[-1]
                    if torch.allclose(start, end):
                        failures.append(f"{conv}: set_progress(0) changed nothing")
                print(f"  family {conv:12} ok ({time.time() - t0:.1f} s)", flush=True)
            except Exception as e:  # report every family
                failures.append(f"{conv}: {type(e).__name__}: {e}")
                print(f"  family {conv:12} FAIL: {type(e).__name__}: {e}", flush=True)
    return failures


def calibrated_static(arch: str, options: Dict[str, Any]) -> torch.nn.Module:
    """A random static classifier whose BatchNorm statistics are those of its own activations (the running
    average over a few batches of random images), as an ImageNet checkpoint's are. With fresh statistics
    (mean 0, variance 1) and ``norm_eval`` nothing normalises and the activations grow with depth (about 20
    at ResNet50's last stage): a converted FDConv backbone's zero-started attention heads then get gradients
    of 1e5 to 1e6 and two SGD steps overflow, which says nothing about a real checkpoint."""
    model = dynconv.create_model(arch, "static", **options)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average
    model.train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(2, 3, 128, 128, generator=generator))
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
    return model.eval()


def run_config(path: Path, data_root: Path, work: Path, expected: Dict[str, float], step: bool,
               test: bool) -> Dict[str, Any]:
    name = path.stem
    result: Dict[str, Any] = {"config": name, "failures": []}
    t0 = time.time()
    cfg = Config.fromfile(str(path))
    init_default_scope("mmdet")
    from mmdet.registry import MODELS

    # 1. the detector as configured (80 classes) against the README's "built" count
    detector = MODELS.build(copy.deepcopy(cfg.model))
    params = sum(p.numel() for p in detector.parameters()) / 1e6
    result["params_m"] = round(params, 2)
    if name not in expected:
        result["failures"].append("no 'built' count in configs/mmdet/README.md")
    elif round(params, 2) != expected[name]:
        result["failures"].append(f"{params:.2f}M parameters, the README says {expected[name]:.2f}M")
    del detector
    result["build_s"] = round(time.time() - t0, 1)
    if not step:
        return result

    # 2. a dynconv ImageNet checkpoint of the backbone, or (init_cfg static=True) a plain state dict of the
    #    static arch, which init_weights converts: then the tensors it copies or maps are checked
    bb = cfg.model.backbone
    options = dict(bb.get("conv_options") or {})
    torch.manual_seed(0)
    if bb.init_cfg.get("static"):
        ckpt = work / name / "static.pth"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save(calibrated_static(bb.arch, options).state_dict(), ckpt)
        classifier = dynconv.create_model(bb.arch, bb.conv, pretrained=str(ckpt), **options)
        loaded = set(classifier.pretrained_report.copied) | set(classifier.pretrained_report.mapped)
    else:
        classifier = dynconv.create_model(bb.arch, bb.conv, **options)
        ckpt = CheckpointManager(work / name).save("best", {
            "model": classifier.state_dict(), "ema": None,
            "meta": {"arch": bb.arch, "conv": bb.conv, "num_classes": 1000}})
        loaded = set(classifier.state_dict())
    state = {k: v.clone() for k, v in classifier.state_dict().items() if k in loaded}
    del classifier

    # 3. two training iterations through mmengine's Runner
    cfg.model.backbone.init_cfg.checkpoint = str(ckpt)
    _set_num_classes(cfg.model, len(CLASSES))
    cfg.work_dir = str(work / name)
    cfg.train_dataloader.batch_size = 2
    cfg.train_dataloader.num_workers = 0
    cfg.train_dataloader.persistent_workers = False
    cfg.train_dataloader.dataset = _dataset(cfg.train_dataloader.dataset, data_root, "train2017", 4)
    cfg.train_cfg.max_epochs = 1
    cfg.train_cfg.val_interval = 100
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    if test:
        cfg.test_dataloader.batch_size = 2
        cfg.test_dataloader.num_workers = 0
        cfg.test_dataloader.persistent_workers = False
        cfg.test_dataloader.dataset = _dataset(cfg.test_dataloader.dataset, data_root, "val2017", 8)
        cfg.test_evaluator.ann_file = str(data_root / "annotations" / "instances_val2017.json")
        cfg.test_evaluator.metric = ["bbox", "segm"] if "mask_head" in cfg.model.roi_head else ["bbox"]
    else:
        cfg.test_dataloader = cfg.test_cfg = cfg.test_evaluator = None
    if bb.init_cfg.get("static") and cfg.optim_wrapper.optimizer.get("type") == "SGD":
        # FDConv from a random static network: its attention MLP's hidden units reach 1e2-1e3 (StarReLU squares
        # them; the new BatchNorm before it keeps its fresh statistics under norm_eval, as in the official
        # backbone), so the zero-started heads get gradients near 1e4, and even the first warm-up step (lr 2e-5)
        # saturates them and the network overflows. The official layer gives the same gradients (compared per
        # layer); real ImageNet weights are not available here. Clipped so the plumbing can be checked.
        cfg.optim_wrapper.clip_grad = dict(max_norm=35, norm_type=2)
        result["note"] = "random static weights: gradients clipped at 35 (SGD overflows without)"
    if cfg.optim_wrapper.get("type") == "AmpOptimWrapper" and not torch.cuda.is_available():
        # mmengine's fp16 wrapper needs a GPU: train in fp32 here, the rest of the recipe unchanged
        cfg.optim_wrapper.type = "OptimWrapper"
        cfg.optim_wrapper.pop("loss_scale", None)
        result["note"] = (result.get("note", "") + "; " if "note" in result else "") + \
            "AmpOptimWrapper run as OptimWrapper (no GPU)"
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger.interval = 1
    cfg.log_level = "ERROR"  # mmengine lists every frozen parameter at WARNING
    cfg.randomness = dict(seed=0)
    cfg.env_cfg.mp_cfg = dict(mp_start_method="fork", opencv_num_threads=0)

    t1 = time.time()
    runner = Runner.from_cfg(cfg)
    backbone_state = {k: state[k] for k in runner.model.backbone.dynconv.body.state_dict() if k in state}
    check = StageCheck(backbone_state)
    runner.register_hook(check)
    runner.train()
    result["train_s"] = round(time.time() - t1, 1)
    result["losses"] = [round(step_losses.get("loss", float("nan")), 4) for step_losses in check.losses]
    if len(check.losses) != 2:
        check.failures.append(f"{len(check.losses)} training iterations, expected 2")
    result["failures"] += check.failures
    if test:
        t2 = time.time()
        metrics = runner.test()
        result["test_s"] = round(time.time() - t2, 1)
        result["metrics"] = {k: round(float(v), 4) for k, v in metrics.items() if k.endswith("_mAP")}
        wanted = ["coco/bbox_mAP"] + (["coco/segm_mAP"] if "segm" in cfg.test_evaluator.metric else [])
        missing = [k for k in wanted if k not in metrics or not math.isfinite(float(metrics[k]))]
        if missing:
            result["failures"].append(f"Runner.test() reported no {missing}: {dict(metrics)}")
    del runner
    gc.collect()
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="config names (file stems) to run")
    parser.add_argument("--build-only", nargs="*", default=[],
                        help="configs to build and count but not train (too slow for the machine)")
    parser.add_argument("--test-config", default=TEST_CONFIG, help="the config that also runs Runner.test()")
    parser.add_argument("--skip-families", action="store_true", help="skip the per-family backbone checks")
    parser.add_argument("--work-dir", default=None, help="default: a temporary directory")
    parser.add_argument("--data-root", default=None,
                        help="synthetic_coco directory (default: $DYNCONV_CACHE or .cache/synthetic_coco/...)")
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    configs = sorted(CONFIG_DIR.glob("*.py"))
    if args.only:
        unknown = set(args.only) - {p.stem for p in configs}
        if unknown:
            parser.error(f"unknown configs: {sorted(unknown)}")
        configs = [p for p in configs if p.stem in args.only]
    expected = readme_counts()
    cache = Path(os.environ.get("DYNCONV_CACHE", ROOT / ".cache"))
    data_root = Path(args.data_root) if args.data_root else cache / "synthetic_coco" / "mmdet-stage-n12-v8-128px"
    make_synthetic_coco(data_root, train_images=12, val_images=8, image_size=128, seed=0)

    start = time.time()
    print(f"mmdet stage: torch {torch.__version__}; every conv family as a backbone", flush=True)
    family_failures = [] if args.skip_families else check_families()
    for failure in family_failures:
        print(f"FAIL family {failure}", flush=True)
    print(f"mmdet stage: {len(configs)} configs, data {data_root}", flush=True)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="dynconv-mmdet-stage-") as tmp:
        work = Path(args.work_dir or tmp)
        for path in configs:
            try:
                r = run_config(path, data_root, work, expected, step=path.stem not in args.build_only,
                               test=path.stem == args.test_config)
            except Exception as e:  # report every config, then fail
                import traceback

                traceback.print_exc()
                r = {"config": path.stem, "failures": [f"{type(e).__name__}: {e}"]}
            status = "FAIL" if r["failures"] else "ok"
            failed += bool(r["failures"])
            detail = ", ".join(f"{k}={r[k]}" for k in ("params_m", "build_s", "train_s", "losses", "test_s",
                                                      "metrics", "note") if k in r)
            print(f"{status:4} {r['config']}: {detail}" + "".join(f"\n     - {f}" for f in r["failures"]),
                  flush=True)
    print(f"mmdet stage: {len(configs) - failed} of {len(configs)} configs passed, {len(family_failures)} conv "
          f"family failures, in {time.time() - start:.0f} s", flush=True)
    return 1 if failed or family_failures else 0


if __name__ == "__main__":
    sys.exit(main())
