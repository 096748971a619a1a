"""Datasets and loaders.

A generated shapes-and-textures set that needs no download (:mod:`.synthetic`), ImageNet-style
folders with layout checks and corrupt-image handling (:mod:`.imagenet`), timm transforms
(:mod:`.transforms`) and resumable, seeded, sharded loaders (:mod:`.loader`).
"""
from .imagenet import CorruptImageError, DatasetError, ImageFolderDataset, imagenet_datasets
from .loader import (
    DataBundle,
    EpochLoader,
    ResumableDistributedSampler,
    SeededDataset,
    ShardSampler,
    build_datasets,
    build_loader,
)
from .synthetic import CLASSES as SYNTHETIC_CLASSES
from .synthetic import make_synthetic_dataset, synthetic_datasets, synthetic_transform
from .transforms import build_transform

__all__ = [
    "SYNTHETIC_CLASSES", "make_synthetic_dataset", "synthetic_datasets", "synthetic_transform",
    "DatasetError", "CorruptImageError", "ImageFolderDataset", "imagenet_datasets",
    "build_transform",
    "ResumableDistributedSampler", "ShardSampler", "SeededDataset", "EpochLoader", "build_loader",
    "DataBundle", "build_datasets",
]
