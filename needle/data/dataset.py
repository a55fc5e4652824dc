"""Datasets of numpy arrays and a DataLoader that batches them into needle Tensors.

A dataset item is a tuple of numpy arrays (e.g. ``(x, y)``); the loader stacks the i-th
field of ``batch_size`` items along a new first axis and wraps each stack in a Tensor.
"""

import numpy as np

__all__ = ["Dataset", "DataLoader", "NDArrayDataset"]


class Dataset:
    """Base class: subclasses implement ``__getitem__`` and ``__len__``.

    Args:
        transforms (list of callables, default None): applied in order to an input by
            ``apply_transforms``; a subclass decides which field to transform.
    """

    def __init__(self, transforms=None):
        self.transforms = transforms

    def __getitem__(self, index):
        raise NotImplementedError

    def __len__(self):
        raise NotImplementedError

    def apply_transforms(self, x):
        for transform in self.transforms or ():
            x = transform(x)
        return x


class DataLoader:
    """Iterate over a dataset in batches of Tensors.

    Args:
        dataset (Dataset): items are tuples of numpy arrays (a bare array counts as a 1-tuple).
        batch_size (int, default 1): items per batch; the last, partial batch is kept.
        shuffle (bool, default False): draw a fresh ``np.random.permutation`` on every ``iter``.

    Each batch is a tuple with one Tensor per item field, of shape (B, *field_shape) where
    B = batch_size (or the remainder for the last batch). ``len(loader)`` is the number of batches.
    """

    def __init__(self, dataset, batch_size=1, shuffle=False):
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool):
            raise TypeError(f"DataLoader: batch_size must be an int, got {type(batch_size).__name__}")
        if batch_size < 1:
            raise ValueError(f"DataLoader: batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle

    def __len__(self):
        return -(-len(self.dataset) // self.batch_size)  # ceil: the partial batch counts

    def __iter__(self):
        from ..autograd import Tensor  # lazy: keeps needle.data importable on its own

        n = len(self.dataset)
        # One permutation per epoch, from numpy's global RNG so np.random.seed reproduces it.
        order = np.random.permutation(n) if self.shuffle else np.arange(n)
        for start in range(0, n, self.batch_size):
            items = [self.dataset[int(i)] for i in order[start:start + self.batch_size]]
            items = [item if isinstance(item, tuple) else (item,) for item in items]
            fields = zip(*items)
            yield tuple(Tensor(np.stack(field), requires_grad=False) for field in fields)


class NDArrayDataset(Dataset):
    """A dataset over equal-length arrays: item i is ``(arrays[0][i], arrays[1][i], ...)``.

    Args:
        *arrays (array-likes): indexed along their first axis; all must have the same length.
    """

    def __init__(self, *arrays):
        super().__init__()
        if not arrays:
            raise ValueError("NDArrayDataset: needs at least one array, got none")
        lengths = [len(a) for a in arrays]
        if len(set(lengths)) != 1:
            raise ValueError(f"NDArrayDataset: all arrays must have the same length, got lengths {lengths}")
        self.arrays = arrays

    def __len__(self):
        return len(self.arrays[0])

    def __getitem__(self, index):
        return tuple(np.asarray(a[index]) for a in self.arrays)
