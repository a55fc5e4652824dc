"""Tests for needle.data: datasets, the DataLoader, word corpora, batchify and get_batch."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from needle.data import (
    Corpus,
    DataLoader,
    Dataset,
    Dictionary,
    NDArrayDataset,
    batchify,
    get_batch,
)

try:
    import needle.autograd  # noqa: F401

    _AUTOGRAD_ERROR = None
except ImportError as error:
    _AUTOGRAD_ERROR = error

# Only the tests that build Tensors depend on autograd; the numpy ones always run.
needs_tensor = pytest.mark.skipif(
    _AUTOGRAD_ERROR is not None, reason=f"needle.autograd does not import: {_AUTOGRAD_ERROR}"
)


def write_corpus(directory, train, test, valid=None):
    directory.mkdir(exist_ok=True)
    (directory / "train.txt").write_text(train, encoding="utf-8")
    (directory / "test.txt").write_text(test, encoding="utf-8")
    if valid is not None:
        (directory / "valid.txt").write_text(valid, encoding="utf-8")
    return directory


# Dictionary and Corpus


def test_dictionary_ids_are_consecutive_and_stable():
    d = Dictionary()
    assert [d.add_word(w) for w in ["the", "cat", "the", "sat", "cat"]] == [0, 1, 0, 2, 1]
    assert len(d) == 3
    assert d.idx2word == ["the", "cat", "sat"]
    assert d.word2idx == {"the": 0, "cat": 1, "sat": 2}


def test_corpus_appends_eos_to_every_line(tmp_path):
    # The blank line still contributes an <eos>; extra whitespace is ignored.
    root = write_corpus(tmp_path / "c", "a b c\n  b c   d \n\n", "a e\n")
    corpus = Corpus(root)
    a, b, c, eos, d, e = range(6)
    assert corpus.train == [a, b, c, eos, b, c, d, eos, eos]
    assert corpus.test == [a, e, eos]
    assert corpus.dictionary.idx2word == ["a", "b", "c", "<eos>", "d", "e"]
    assert corpus.valid is None


def test_corpus_last_line_without_newline(tmp_path):
    corpus = Corpus(write_corpus(tmp_path / "c", "x y\nz", "y"))
    x, y, eos, z = range(4)
    assert corpus.train == [x, y, eos, z, eos]
    assert corpus.test == [y, eos]


def test_corpus_reads_valid_after_train_and_test(tmp_path):
    root = write_corpus(tmp_path / "c", "a b\n", "c\n", valid="d a\n")
    corpus = Corpus(root)
    a, b, eos, c, d = range(5)
    assert corpus.train == [a, b, eos]
    assert corpus.test == [c, eos]
    assert corpus.valid == [d, a, eos]
    assert len(corpus.dictionary) == 5


def test_corpus_max_lines_limits_each_file(tmp_path):
    root = write_corpus(tmp_path / "c", "a b\nc d\ne f\n", "g\nh\n", valid="i\nj\n")
    corpus = Corpus(root, max_lines=1)
    a, b, eos, g, i = range(5)
    assert corpus.train == [a, b, eos]
    assert corpus.test == [g, eos]
    assert corpus.valid == [i, eos]
    assert Corpus(root, max_lines=0).train == []
    assert len(Corpus(root, max_lines=10).train) == 9


def test_tokenize_extends_the_shared_dictionary(tmp_path):
    root = write_corpus(tmp_path / "c", "a\n", "b\n")
    corpus = Corpus(root)
    extra = tmp_path / "extra.txt"
    extra.write_text("b new\nmore\n", encoding="utf-8")
    b, eos = corpus.dictionary.word2idx["b"], corpus.dictionary.word2idx["<eos>"]
    assert corpus.tokenize(extra, max_lines=1) == [b, 3, eos]
    assert corpus.dictionary.idx2word[3] == "new"


def test_corpus_missing_directory_or_file(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Corpus(missing)
    root = tmp_path / "half"
    root.mkdir()
    (root / "train.txt").write_text("a\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="test.txt"):
        Corpus(root)


# batchify


def test_batchify_layout_is_column_major():
    out = batchify(list(range(11)), 3, None, "float32")
    # nbatch = 11 // 3 = 3; id 9 and 10 are dropped; column j is data[3j:3j+3].
    expected = np.array([[0, 3, 6], [1, 4, 7], [2, 5, 8]], dtype=np.float32)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


@settings(deadline=None, max_examples=50)
@given(st.integers(1, 60), st.integers(1, 8))
def test_batchify_columns_are_contiguous_runs(n, batch_size):
    if n < batch_size:
        return
    data = list(range(100, 100 + n))
    out = batchify(data, batch_size, None, "float32")
    nbatch = n // batch_size
    assert out.shape == (nbatch, batch_size)
    for j in range(batch_size):
        np.testing.assert_array_equal(out[:, j], data[j * nbatch:(j + 1) * nbatch])


def test_batchify_keeps_large_ids_exact():
    data = [2**24 - 1, 2**24 - 2, 7, 2**23 + 1]
    out = batchify(data, 2, None, "float32")
    assert out.astype(np.int64).T.reshape(-1).tolist() == data


def test_batchify_errors():
    with pytest.raises(ValueError, match="batch_size"):
        batchify([1, 2, 3], 0, None, "float32")
    with pytest.raises(ValueError, match="at least"):
        batchify([1, 2], 3, None, "float32")
    with pytest.raises(ValueError, match="2\\*\\*24"):
        batchify([2**24, 1], 1, None, "float32")


# get_batch


@needs_tensor
def test_get_batch_shapes_and_contents():
    batches = batchify(list(range(20)), 2, None, "float32")  # (10, 2)
    data, target = get_batch(batches, 3, 4)
    assert data.shape == (4, 2) and target.shape == (8,)
    np.testing.assert_array_equal(data.numpy(), batches[3:7])
    np.testing.assert_array_equal(target.numpy(), batches[4:8].reshape(-1))
    # The target of each position is the next id in its column.
    np.testing.assert_array_equal(target.numpy().reshape(4, 2), data.numpy() + 1)
    assert not data.requires_grad and not target.requires_grad


@needs_tensor
def test_get_batch_last_window_is_shortened():
    batches = batchify(list(range(20)), 2, None, "float32")  # nbatch = 10
    data, target = get_batch(batches, 7, 4)  # L = min(4, 10 - 1 - 7) = 2
    assert data.shape == (2, 2) and target.shape == (4,)
    np.testing.assert_array_equal(target.numpy(), batches[8:10].reshape(-1))
    data, target = get_batch(batches, 8, 4)
    assert data.shape == (1, 2) and target.shape == (2,)


@needs_tensor
def test_get_batch_out_of_range():
    batches = batchify(list(range(20)), 2, None, "float32")
    for i in (-1, 9, 10):
        with pytest.raises(ValueError, match="get_batch"):
            get_batch(batches, i, 4)


# Datasets and the DataLoader


def test_ndarray_dataset_items_and_length():
    x = np.arange(12.0).reshape(4, 3)
    y = np.array([0, 1, 0, 1])
    ds = NDArrayDataset(x, y)
    assert len(ds) == 4
    xi, yi = ds[2]
    np.testing.assert_array_equal(xi, x[2])
    assert yi == 0


def test_ndarray_dataset_length_mismatch():
    with pytest.raises(ValueError, match=r"\[4, 3\]"):
        NDArrayDataset(np.zeros((4, 2)), np.zeros(3))


def test_dataset_base_and_transforms():
    ds = Dataset(transforms=[lambda v: v + 1, lambda v: v * 10])
    assert ds.apply_transforms(np.array(1)) == 20
    assert Dataset().apply_transforms(5) == 5
    with pytest.raises(NotImplementedError):
        len(ds)


def test_loader_len_counts_the_partial_batch():
    ds = NDArrayDataset(np.zeros((10, 3)))
    assert len(DataLoader(ds, batch_size=4)) == 3
    assert len(DataLoader(ds, batch_size=5)) == 2
    assert len(DataLoader(ds)) == 10
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(ds, batch_size=0)


@needs_tensor
def test_loader_batches_in_order():
    x = np.arange(30.0).reshape(10, 3)
    y = np.arange(10)
    batches = list(DataLoader(NDArrayDataset(x, y), batch_size=4))
    assert [b[0].shape for b in batches] == [(4, 3), (4, 3), (2, 3)]
    assert [b[1].shape for b in batches] == [(4,), (4,), (2,)]
    np.testing.assert_array_equal(np.concatenate([b[0].numpy() for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b[1].numpy() for b in batches]), y)


@needs_tensor
def test_loader_shuffle_uses_global_rng_each_epoch():
    y = np.arange(10)
    loader = DataLoader(NDArrayDataset(y), batch_size=3, shuffle=True)
    np.random.seed(0)
    first = np.concatenate([b[0].numpy() for b in loader])
    second = np.concatenate([b[0].numpy() for b in loader])
    np.random.seed(0)
    expected_first = np.random.permutation(10)
    expected_second = np.random.permutation(10)
    np.testing.assert_array_equal(first, expected_first)
    np.testing.assert_array_equal(second, expected_second)
    assert not np.array_equal(first, second)
