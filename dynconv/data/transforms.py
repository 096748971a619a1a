"""ImageNet train and eval transforms, built by :func:`timm.data.create_transform`."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

__all__ = ["build_transform"]


def build_transform(
    *,
    train: bool,
    image_size: int,
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float = 0.0,
    auto_augment: Optional[str] = None,
    reprob: float = 0.0,
    remode: str = "pixel",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Callable:
    """A PIL-image-to-normalised-tensor transform, as timm's ``train.py`` builds it.

    Train: RandomResizedCrop(``scale``, ``ratio``), horizontal flip, colour jitter or ``auto_augment``
    (e.g. ``"rand-m9-mstd0.5-inc1"``; timm then drops colour jitter), random erasing. Eval: resize the
    short side to ``image_size / crop_pct``, center crop ``image_size``.

    Args:
        train: training (random) or eval (deterministic) transform.
        image_size: output side in pixels.
        crop_pct: eval crop fraction.
        interpolation: ``"bilinear"``, ``"bicubic"``, ``"random"`` (train only) ...
        scale, ratio: RandomResizedCrop area and aspect ranges.
        hflip: horizontal flip probability.
        color_jitter: brightness/contrast/saturation strength; 0 disables it.
        auto_augment: timm AutoAugment/RandAugment/AugMix string, or ``None``.
        reprob, remode: random erasing probability and fill mode.
        mean, std: normalisation.
    """
    if not train:
        return create_transform(image_size, is_training=False, interpolation=interpolation,
                                crop_pct=crop_pct, mean=tuple(mean), std=tuple(std))
    # timm adds ColorJitter(0, 0, 0) for color_jitter=0: a no-op that still draws from the torch RNG.
    # None leaves it out.
    return create_transform(
        image_size,
        is_training=True,
        scale=tuple(scale),
        ratio=tuple(ratio),
        hflip=hflip,
        color_jitter=color_jitter or None,
        auto_augment=auto_augment or None,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
        re_prob=reprob,
        re_mode=remode,
    )
