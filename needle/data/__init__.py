"""Data loading: array datasets with a batching DataLoader, and word-level corpora for language models."""

from .corpus import Corpus, Dictionary, batchify, get_batch
from .dataset import DataLoader, Dataset, NDArrayDataset

__all__ = [
    "Dataset",
    "DataLoader",
    "NDArrayDataset",
    "Dictionary",
    "Corpus",
    "batchify",
    "get_batch",
]
