"""Datasets, from where they are stored to the batches the training loop reads.

    core      ImageData (train/test arrays (N, C, H, W), labels, factors), to_unit, the held-out split
    idx       the IDX format (MNIST, Fashion-MNIST)
    cache     the decoded cache: decoded datasets as memory-mapped .npy files with a manifest
    arrays    .npy (memory-mapped) and .npz files
    folders   image folders: any Pillow format and mode, one size, bad files
    shapes    the generated `shapes` dataset with its factors
    archives  CIFAR-10's Python archive, dSprites' .npz, a local CelebA
    named     the registry of named datasets, where they are looked for, the download
    load      load_dataset: a name or a path -> ImageData
    batches   StoredImages and BatchSource: batches gathered from mapped data in a background thread
    prepare   prepare_data: ImageData -> what the loop and the evaluation use
"""

from ..errors import DataError
from .batches import BatchSource, StoredImages
from .core import TEST_FRACTION, ImageData, binarize_static, to_unit
from .idx import read_idx
from .load import load_dataset
from .named import NAMES, REGISTRY, NamedDataset, RemoteFile, cache_dir, download, get_spec, locate, verify
from .prepare import Prepared, prepare_data

__all__ = ["NAMES", "REGISTRY", "TEST_FRACTION", "BatchSource", "DataError", "ImageData", "NamedDataset", "Prepared",
           "RemoteFile", "StoredImages", "binarize_static", "cache_dir", "download", "get_spec", "load_dataset",
           "locate", "prepare_data", "read_idx", "to_unit", "verify"]
