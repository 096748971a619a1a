"""Datasets and loaders.

A generated shapes-and-textures set that needs no download (:mod:`.synthetic`), ImageNet-style
folders with layout checks and corrupt-image handling (:mod:`.imagenet`), timm transforms
(:mod:`.transforms`) and resumable, seeded, sharded loaders (:mod:`.loader`). For detection: COCO
instance annotations as torchvision targets (:mod:`.coco`), a generated COCO-layout shapes set
(:mod:`.synthetic_coco`), box- and mask-aware transforms (:mod:`.detection_transforms`) and
aspect-ratio grouped batches (:mod:`.grouping`).
"""
from .coco import CocoDetectionDataset, DetectionData, coco_datasets, detection_collate
from .detection_transforms import build_detection_transform
from .grouping import GroupedBatchSampler, aspect_ratio_groups
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
from .synthetic_coco import CATEGORIES as SYNTHETIC_COCO_CATEGORIES
from .synthetic_coco import make_synthetic_coco
from .transforms import build_transform

__all__ = [
    "SYNTHETIC_CLASSES", "make_synthetic_dataset", "synthetic_datasets", "synthetic_transform",
    "DatasetError", "CorruptImageError", "ImageFolderDataset", "imagenet_datasets",
    "build_transform",
    "ResumableDistributedSampler", "ShardSampler", "SeededDataset", "EpochLoader", "build_loader",
    "DataBundle", "build_datasets",
    "SYNTHETIC_COCO_CATEGORIES", "make_synthetic_coco",
    "CocoDetectionDataset", "DetectionData", "coco_datasets", "detection_collate",
    "build_detection_transform",
    "aspect_ratio_groups", "GroupedBatchSampler",
]
