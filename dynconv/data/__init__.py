"""Datasets: a generated shapes-and-textures set that needs no download (:mod:`.synthetic`)."""
from .synthetic import CLASSES as SYNTHETIC_CLASSES
from .synthetic import make_synthetic_dataset, synthetic_datasets, synthetic_transform

__all__ = ["SYNTHETIC_CLASSES", "make_synthetic_dataset", "synthetic_datasets", "synthetic_transform"]
