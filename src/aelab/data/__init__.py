"""Datasets as uint8 tensors: the built-in shapes, CIFAR-10/100 and image folders.

`prepare` builds one dataset into a directory (train/val/test tensors + meta.json) once;
training code reads it back with `load_split` and `load_meta`.
"""

from .cifar import write_cifar_archive
from .errors import DataError
from .prepare import (DATASETS, data_digest, label_subset, load_meta, load_split, prepare,
                      prepare_from_config)
from .shapes import SHAPES_CLASSES, make_shapes

__all__ = [
    "DATASETS", "DataError", "SHAPES_CLASSES", "data_digest", "label_subset", "load_meta", "load_split", "make_shapes",
    "prepare", "prepare_from_config", "write_cifar_archive",
]
