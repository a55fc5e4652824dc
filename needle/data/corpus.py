"""Word-level corpora (Penn Treebank layout) and the batching used for truncated BPTT.

A corpus directory holds ``train.txt``, ``test.txt`` and optionally ``valid.txt``; each line
is split on whitespace and ends with an ``<eos>`` token. ``batchify`` lays the id stream out
as ``batch_size`` parallel columns and ``get_batch`` cuts (input, next-word target) windows.
"""

import os

import numpy as np

__all__ = ["Dictionary", "Corpus", "batchify", "get_batch"]

EOS = "<eos>"


class Dictionary:
    """A two-way map between words and consecutive integer ids (0, 1, 2, ... in order of first use)."""

    def __init__(self):
        self.word2idx = {}
        self.idx2word = []

    def add_word(self, word):
        """Return the id of ``word``, giving it the next free id if it is new."""
        if word not in self.word2idx:
            self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)
        return self.word2idx[word]

    def __len__(self):
        return len(self.idx2word)


class Corpus:
    """Token ids of the splits in ``base_dir``, sharing one Dictionary.

    Args:
        base_dir (str or path): directory with ``train.txt`` and ``test.txt`` (``valid.txt`` optional).
        max_lines (int, default None): read at most this many lines from each file.

    Attributes: ``dictionary``, ``train``, ``test`` and ``valid`` (lists of ids; ``valid`` is None
    when the file is absent). Files are read train, test, then valid, so the ids of train and
    test words do not depend on whether a validation split exists.
    """

    def __init__(self, base_dir, max_lines=None):
        base_dir = os.fspath(base_dir)
        if not os.path.isdir(base_dir):
            raise FileNotFoundError(f"Corpus: directory not found: {base_dir}")
        self.dictionary = Dictionary()
        self.train = self.tokenize(os.path.join(base_dir, "train.txt"), max_lines)
        self.test = self.tokenize(os.path.join(base_dir, "test.txt"), max_lines)
        valid_path = os.path.join(base_dir, "valid.txt")
        self.valid = self.tokenize(valid_path, max_lines) if os.path.isfile(valid_path) else None

    def tokenize(self, path, max_lines=None):
        """Read up to ``max_lines`` lines of ``path``, add their words, return their ids (with ``<eos>``)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Corpus: file not found: {path}")
        if max_lines is not None and max_lines < 0:
            raise ValueError(f"Corpus: max_lines must be >= 0 or None, got {max_lines}")
        ids = []
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f):
                if max_lines is not None and line_number >= max_lines:
                    break
                ids.extend(self.dictionary.add_word(word) for word in line.split() + [EOS])
        return ids


def batchify(data, batch_size, device=None, dtype="float32"):
    """Lay a stream of ids out as ``batch_size`` contiguous columns.

    Args:
        data (sequence of int): the token ids.
        batch_size (int): number of columns, bs.
        device: unused; accepted for the course signature (the result is a numpy array).
        dtype (str, default "float32"): numpy dtype of the result.

    Returns a numpy array of shape (nbatch, bs) with nbatch = len(data) // bs, where column j is
    ``data[j*nbatch:(j+1)*nbatch]``; the last ``len(data) % bs`` ids are dropped.
    """
    if batch_size < 1:
        raise ValueError(f"batchify: batch_size must be >= 1, got {batch_size}")
    if len(data) < batch_size:
        raise ValueError(f"batchify: data must hold at least batch_size={batch_size} ids, got {len(data)}")
    nbatch = len(data) // batch_size
    ids = np.asarray(data[: nbatch * batch_size])
    if np.dtype(dtype) == np.float32 and ids.size and ids.max() >= 2**24:
        # float32 has a 24-bit mantissa: larger ids would silently merge.
        raise ValueError(f"batchify: ids must be < 2**24 to be exact in float32, got max id {ids.max()}")
    # Row j of the (bs, nbatch) reshape is column j of the result.
    return np.ascontiguousarray(ids.reshape(batch_size, nbatch).T, dtype=dtype)


def get_batch(batches, i, bptt, device=None, dtype=None):
    """Cut the input/target window starting at row ``i`` of a batchified array.

    Args:
        batches (array of shape (nbatch, bs)): output of ``batchify``.
        i (int): first row, in [0, nbatch - 2].
        bptt (int): window length; shortened to L = min(bptt, nbatch - 1 - i) at the end.
        device, dtype: passed to the Tensors.

    Returns ``(data, target)`` Tensors with requires_grad=False: data (L, bs) is rows i..i+L-1 and
    target (L*bs,) is rows i+1..i+L flattened row by row, the next word for each entry of data.
    """
    from ..autograd import Tensor  # lazy: keeps needle.data importable on its own

    batches = np.asarray(batches)
    if batches.ndim != 2:
        raise ValueError(f"get_batch: batches must be 2-D (nbatch, bs), got shape {batches.shape}")
    if not 0 <= i <= len(batches) - 2:
        raise ValueError(f"get_batch: i must be in [0, {len(batches) - 2}], got {i}")
    if bptt < 1:
        raise ValueError(f"get_batch: bptt must be >= 1, got {bptt}")
    length = min(bptt, len(batches) - 1 - i)
    data = batches[i : i + length]
    target = batches[i + 1 : i + 1 + length].reshape(-1)
    return (
        Tensor(data, device=device, dtype=dtype, requires_grad=False),
        Tensor(target, device=device, dtype=dtype, requires_grad=False),
    )
