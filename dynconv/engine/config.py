"""The training and evaluation configuration as plain dataclasses (the schema behind ``configs/``).

``train.py`` registers :class:`TrainConfig` and :class:`EvalConfig` with Hydra's ConfigStore, so a
misspelt key or a value of the wrong type fails at composition with the key's full name; the
package itself never imports Hydra. :func:`validate` adds the checks that span several keys and
runs before any data is read.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

MISSING = "???"  # OmegaConf's marker for a mandatory value

AMP_MODES = ("none", "bf16", "fp16")
NAN_POLICIES = ("raise", "skip")
SCHEDULERS = ("step", "cosine", "constant")
ON_CORRUPT = ("raise", "skip")
TASKS = ("classification", "detection")
CLASSIFICATION_DATA = ("synthetic", "imagenet")
DETECTION_DATA = ("coco", "synthetic_coco")
LAYER_SCHEDULES = ("end", "train")


@dataclass
class ModelConfig:
    name: str = "resnet18"
    drop_rate: float = 0.0  # dropout before the classifier
    drop_path_rate: float = 0.0
    # linear: timm's ramp over the blocks (ConvNeXt's rule); uniform: every block at the rate (KW ResNets)
    drop_path_mode: str = "linear"
    kwargs: Dict[str, Any] = field(default_factory=dict)  # anything else timm.create_model takes
    # start from a static checkpoint of the same arch (a file, or "timm" for timm's own weights)
    pretrained: Optional[str] = None


@dataclass
class ConvConfig:
    name: str = "static"
    options: Dict[str, Any] = field(default_factory=dict)  # family options: kernel_num, temperature_epochs, ...
    # a family defined outside dynconv: the .py file (or module name) that registers it, imported first
    module: Optional[str] = None


@dataclass
class OptimizerConfig:
    name: str = "momentum"  # a timm optimizer name: momentum (SGD), sgd/nesterov (SGD + Nesterov), adamw, ...
    lr: float = 0.1  # at a global batch of ``lr_batch``; scaled linearly to the run's global batch
    lr_batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    decay_1d: bool = True  # weight decay on biases and norm parameters too (the classic recipe does)
    # Parameter-name substrings: no weight decay for names containing one (mmcv's paramwise custom_keys with
    # decay_mult 0), or weight decay even for 1-D parameters (a parameter the official model keeps 4-D)
    no_decay_keys: List[str] = field(default_factory=list)
    decay_keys: List[str] = field(default_factory=list)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class SchedulerConfig:
    name: str = "step"  # step | cosine | constant
    milestones: List[int] = field(default_factory=lambda: [30, 60, 90])  # step: epochs
    decay_rate: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up before the decay starts
    warmup_steps: int = 0  # warm-up in updates instead (mmdet's 500 iterations); needs per_iteration
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    per_iteration: bool = False  # update the LR every iteration rather than once per epoch


@dataclass
class AugConfig:
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    hflip: float = 0.5
    color_jitter: float = 0.0
    auto_augment: Optional[str] = None  # a timm RandAugment string, e.g. rand-m9-mstd0.5-inc1
    reprob: float = 0.0  # random erasing
    remode: str = "pixel"
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.0
    train_interpolation: str = "bilinear"
    eval_interpolation: str = "bilinear"


@dataclass
class DetAugConfig:
    """Detection training augmentation; sizes are fractions of ``data.min_size`` (exact at 800)."""

    hflip: float = 0.5
    scales: List[float] = field(default_factory=lambda: [1.0])  # shorter sides, one drawn per batch
    crop_prob: float = 0.0  # DETR-style branch: resize to a crop_resize side, then a random crop
    crop_resize: List[float] = field(default_factory=lambda: [0.5, 0.625, 0.75])  # 400/500/600 at 800
    crop_size: List[float] = field(default_factory=lambda: [0.48, 0.75])  # 384..600 at 800


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9999


@dataclass
class RecipeConfig:
    name: str = "classic_100ep"
    epochs: int = 100
    batch_size: int = 256  # global: per-process batch x processes x accumulation steps
    grad_clip: Optional[float] = None  # max gradient norm
    # The layers' schedules (ODConv / DY-Conv temperature, KernelWarehouse mixing, DGC pruning) keep their
    # official lengths in epochs; a short run makes them this many times faster so they end in time.
    schedule_speed: float = 1.0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    det_aug: DetAugConfig = field(default_factory=DetAugConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)


@dataclass
class DataConfig:
    name: str = "synthetic"  # synthetic | imagenet | coco | synthetic_coco
    root: str = MISSING
    image_size: int = 224
    crop_pct: float = 0.875  # eval: resize to image_size / crop_pct, then centre crop
    classes: Optional[Any] = None  # imagenet: an int (the first N classes) or a list of class folders
    num_classes: int = 10  # synthetic only: how many of its classes to generate
    train_per_class: int = 300  # synthetic only
    val_per_class: int = 50  # synthetic only
    train_images: int = 200  # synthetic_coco only
    val_images: int = 50  # synthetic_coco only
    train_split: str = "train2017"  # coco: annotations/instances_<split>.json and <split>/
    val_split: str = "val2017"
    min_size: int = 800  # detection: shorter side at evaluation (training: recipe.det_aug.scales of it)
    max_size: int = 1333  # detection: longer side at most
    on_corrupt: str = "raise"  # raise | skip (counted, logged with the file name)
    max_bad_fraction: float = 0.001


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    project: str = "dynconv"
    entity: Optional[str] = None
    group: Optional[str] = None  # default: the experiment name
    job_type: str = "train"
    tags: List[str] = field(default_factory=list)
    mode: Optional[str] = None  # online | offline | disabled; None leaves it to WANDB_MODE


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "none"  # none | bf16 | fp16 (CUDA)
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    workers: int = 4
    batch_size: Optional[int] = None  # per process; default: the recipe's global batch / processes
    eval_batch_size: Optional[int] = None  # per process; default: the training batch (detection: 1, as mmdet)
    log_interval: int = 50
    checkpoint_interval: int = 0  # optimizer steps between mid-epoch checkpoints (0: every epoch only)
    nan_policy: str = "raise"  # raise | skip
    max_nan_skips: int = 5  # consecutive skipped steps before stopping anyway
    deterministic: bool = False
    max_epochs: Optional[int] = None  # stop early (the schedules still follow recipe.epochs)
    limit_train_batches: Optional[int] = None  # per epoch, for quick checks
    limit_eval_batches: Optional[int] = None
    # score the starting weights before the first update (an epoch-0 row): a model converted from a static
    # checkpoint (model.pretrained) shows where the fine-tune starts
    eval_before_train: bool = False
    resume: str = "auto"  # auto | never | a checkpoint path
    # values a resumed run may change (recipe.epochs, recipe.optimizer.lr, recipe.grad_clip, trainer.batch_size);
    # any other difference from the run's stored config stops the resume (dynconv.engine.run_guard)
    resume_changes: List[str] = field(default_factory=list)
    init_checkpoint: Optional[str] = None  # weights to start from (dynconv or official layout)
    progress: bool = True
    # CPU runs: glibc keeps freed memory for reuse instead of unmapping it (dynconv.malloc); the per-sample
    # kernels of a dynamic layer then cost no page faults, and the process stays at its peak memory
    reuse_freed_memory: bool = True


@dataclass
class DetectorConfig:
    """A torchvision R-CNN with FPN on the dynconv backbone (``dynconv.detection.create_detector``)."""

    name: str = "faster_rcnn"  # faster_rcnn | mask_rcnn
    frozen_stages: int = 1  # stem and the first N backbone levels get no gradient
    # ...except parameters whose names contain one of these (FDConv's official need_grad_list: KSM, FBM)
    frozen_trainable: List[str] = field(default_factory=list)
    norm_eval: bool = True  # BatchNorm statistics stay those of the ImageNet checkpoint
    fpn_channels: int = 256
    backbone_checkpoint: Optional[str] = None  # ImageNet weights: a dynconv run or an official file
    backbone_use_ema: bool = False
    layer_schedule: str = "end"  # end: T = 1 / tau = 0 throughout | train: restart them over this run
    aspect_ratio_group_factor: int = 3  # batches of similar aspect ratio (0: no grouping)
    find_unused_parameters: bool = True  # DDP: frozen stages leave attention parameters unused
    # anything else torchvision's FasterRCNN / MaskRCNN take, e.g. box_batch_size_per_image (512)
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    name: str = "default"  # experiment name: the W&B group and the run directory's parent
    task: str = "classification"  # classification | detection (set by the task/ group)
    seed: int = 0
    run_dir: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    conv: ConvConfig = field(default_factory=ConvConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)  # task=detection only
    # An experiment's per-row settings: {"<conv>" or "<arch>/<conv>": {"dotted.key": value}}, applied
    # by apply_row for the run's (arch, conv); the arch/conv entry wins over the conv entry.
    rows: Dict[str, Dict[str, Any]] = field(default_factory=dict)


@dataclass
class EvalConfig:
    task: str = "classification"
    checkpoint: Optional[str] = None  # dynconv or official checkpoint; None scores the fresh model
    use_ema: bool = False
    seed: int = 0
    output: Optional[str] = None  # JSON file for the results
    batch_size: Optional[int] = None  # default: 100 for classification, 1 for detection (as mmdet tests)
    # None: as the checkpoint's run validated (its stored config), else as ``recipe`` (official files)
    interpolation: Optional[str] = None
    crop_pct: Optional[float] = None
    bench_batches: int = 5  # timed eval batches for images/s (0: skip)
    ignore_class_names: bool = False  # score a checkpoint whose stored class names differ from the data's
    deploy: bool = False  # score dynconv.deploy(model): BatchNorms folded, the same outputs (classification)
    model: ModelConfig = field(default_factory=ModelConfig)
    conv: ConvConfig = field(default_factory=ConvConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)  # task=detection only
    # the eval transform of official files (which store no config): recipe=convnext_300ep is bicubic
    recipe: RecipeConfig = field(default_factory=RecipeConfig)


def apply_row(cfg: Any, protected: Iterable[str] = ()) -> Dict[str, Any]:
    """Set the experiment's per-row values (``cfg.rows``) for this run's arch and conv; returns them.

    Keys in ``protected`` (those given on the command line) keep their value. A row name that is no
    conv variant, or a key that is not in the schema, raises ValueError naming it.
    """
    from ..models import list_archs
    from ..registry import list_convs

    for name in cfg.rows:
        arch, _, conv = name.rpartition("/")
        if conv not in list_convs() or (arch and arch not in list_archs()):
            raise ValueError(f"rows.{name}: not a conv variant or <arch>/<conv> pair")
    delta = {**cfg.rows.get(cfg.conv.name, {}), **cfg.rows.get(f"{cfg.model.name}/{cfg.conv.name}", {})}
    applied = {}
    for key, value in delta.items():
        if key in set(protected):
            continue
        *path, leaf = key.split(".")
        node = cfg
        for part in path:
            node = getattr(node, part, None)
        if node is None or not hasattr(node, leaf) or key.startswith("rows"):
            raise ValueError(f"rows: {key!r} is not a config key")
        setattr(node, leaf, value)
        applied[key] = value
    return applied


def _choice(key: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"{key}={value!r} is not valid; choose one of: {', '.join(valid)}")


# Free-form mappings: their keys are options of timm, torchvision or a conv family, checked where used.
_FREE_FORM = {"kwargs", "options", "rows"}


def unknown_keys(node: Any, prefix: str = "") -> List[str]:
    """Dotted names of values set on the config that its schema does not define.

    Hydra lets ``+trainer.wrkers=2`` add a key to a structured config; it would then be ignored.
    """
    if not dataclasses.is_dataclass(node):
        return []
    names = {f.name for f in dataclasses.fields(node)}
    out = [f"{prefix}{key}" for key in vars(node) if key not in names and not key.startswith("_")]
    for name in names - _FREE_FORM:
        out += unknown_keys(getattr(node, name), f"{prefix}{name}.")
    return out


def _did_you_mean(key: str, node: Any) -> str:
    *path, leaf = key.split(".")
    for part in path:
        node = getattr(node, part)
    close = difflib.get_close_matches(leaf, [f.name for f in dataclasses.fields(node)], n=1)
    return f"; did you mean {'.'.join(path + close)}?" if close else ""


def _at_least(key: str, value: Any, low: float, what: str = "") -> None:
    if value is not None and value < low:
        raise ValueError(f"{key}={value!r} is not valid: it must be at least {low:g}{what}")


def _check_numbers(cfg: Any) -> None:
    t = cfg.trainer
    for key in ("batch_size", "eval_batch_size", "max_epochs", "limit_train_batches", "limit_eval_batches",
                "log_interval"):
        _at_least(f"trainer.{key}", getattr(t, key), 1)
    _at_least("trainer.workers", t.workers, 0)
    _at_least("trainer.checkpoint_interval", t.checkpoint_interval, 0, " (0: a checkpoint at the end of each epoch only)")
    _at_least("trainer.max_nan_skips", t.max_nan_skips, 0)
    _at_least("data.image_size", cfg.data.image_size, 1)
    if not 0 < cfg.data.crop_pct <= 1:
        raise ValueError(f"data.crop_pct={cfg.data.crop_pct!r} is not valid: it must be in (0, 1] "
                         "(the centre crop's share of the resized image, 0.875 for 224 of 256)")
    for key, value in cfg.conv.options.items():
        if key.endswith("_epochs") and isinstance(value, (int, float)):
            _at_least(f"conv.options.{key}", value, 0)


def _check_recipe(recipe: Any) -> None:
    from timm.optim import list_optimizers

    _choice("recipe.scheduler.name", recipe.scheduler.name, SCHEDULERS)
    for key in ("batch_size", "epochs"):
        _at_least(f"recipe.{key}", getattr(recipe, key), 1)
    if recipe.schedule_speed <= 0:
        raise ValueError(f"recipe.schedule_speed={recipe.schedule_speed!r} is not valid: it must be positive")
    opt = recipe.optimizer
    if opt.lr <= 0 or opt.lr_batch < 1:
        raise ValueError(f"recipe.optimizer.lr={opt.lr!r} at recipe.optimizer.lr_batch={opt.lr_batch!r} is not "
                         "valid: both must be positive")
    _at_least("recipe.optimizer.weight_decay", opt.weight_decay, 0)
    names = list_optimizers()
    if opt.name.lower() not in names:
        close = difflib.get_close_matches(opt.name.lower(), names, n=3)
        raise ValueError(f"recipe.optimizer.name={opt.name!r} is not a timm optimizer"
                         + (f"; did you mean {', '.join(close)}?" if close else "")
                         + " (all names: timm.optim.list_optimizers())")
    warmup = recipe.scheduler.warmup_epochs
    _at_least("recipe.scheduler.warmup_epochs", warmup, 0)
    if warmup >= recipe.epochs:
        raise ValueError(f"recipe.scheduler.warmup_epochs={warmup:g} is not shorter than recipe.epochs="
                         f"{recipe.epochs}: the run would end inside its warm-up; lower it (e.g. "
                         f"recipe.scheduler.warmup_epochs={recipe.epochs / 10:g}) or raise recipe.epochs")
    if recipe.scheduler.warmup_steps and not recipe.scheduler.per_iteration:
        raise ValueError("recipe.scheduler.warmup_steps needs recipe.scheduler.per_iteration=true")


PRETRAINED_TIMM = ("timm", "true", "True")  # model.pretrained values meaning timm's own weights


def _check_pretrained(value: Optional[str]) -> None:
    if value is None or str(value) in PRETRAINED_TIMM:
        return
    if not os.path.isfile(os.path.expanduser(str(value))):
        raise ValueError(f"model.pretrained={value}: no such file (a static checkpoint of the same arch, or "
                         "'timm' for timm's pretrained weights)")


def validate(cfg: Any) -> None:
    """Checks across keys that the schema cannot express; raises ValueError naming the key."""
    from ..models import DROP_PATH_MODES, list_archs
    from ..registry import list_convs, load_family_module

    extra = unknown_keys(cfg)
    if extra:
        raise ValueError(f"{extra[0]} is not a config key (given with '+'?){_did_you_mean(extra[0], cfg)}")
    _choice("task", cfg.task, TASKS)
    _choice("model.name", cfg.model.name, tuple(list_archs()))
    if cfg.conv.module:
        load_family_module(cfg.conv.module)
    _choice("conv.name", cfg.conv.name, tuple(list_convs()))
    detection = cfg.task == "detection"
    _choice("data.name", cfg.data.name, DETECTION_DATA if detection else CLASSIFICATION_DATA)
    if detection:
        from ..detection.detectors import DETECTORS

        _choice("detector.name", cfg.detector.name, DETECTORS)
        _choice("detector.layer_schedule", cfg.detector.layer_schedule, LAYER_SCHEDULES)
    _choice("data.on_corrupt", cfg.data.on_corrupt, ON_CORRUPT)
    _choice("trainer.amp", cfg.trainer.amp, AMP_MODES)
    _choice("trainer.nan_policy", cfg.trainer.nan_policy, NAN_POLICIES)
    _choice("model.drop_path_mode", cfg.model.drop_path_mode, DROP_PATH_MODES)
    _check_pretrained(getattr(cfg.model, "pretrained", None))
    _check_numbers(cfg)
    from .run_guard import RESUMABLE

    for key in getattr(cfg.trainer, "resume_changes", ()):
        _choice("trainer.resume_changes", key, RESUMABLE)
    if isinstance(cfg, EvalConfig):
        _at_least("batch_size", cfg.batch_size, 1)
    if hasattr(cfg, "recipe") and not isinstance(cfg, EvalConfig):  # eval composes a recipe it does not run
        _check_recipe(cfg.recipe)
    if hasattr(cfg, "logger"):
        _choice("logger.name", cfg.logger.name, ("none", "wandb"))
    if cfg.data.root in (None, "", MISSING):
        raise ValueError(f"data.root is not set: give the {cfg.data.name} dataset directory, "
                         f"e.g. data.root=/data/{cfg.data.name}")
