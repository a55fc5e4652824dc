"""Index-driven ops: the embedding's row gather (scatter-add gradient, no one-hot matmul), a permutation of
the batch axis and the per-sequence time reversal used by bidirectional layers with lengths."""
import numpy as np

from ..autograd import Tensor, TensorOp
from ..backend_ndarray.ndarray import NDArray, _norm_axes
from .ops_mathematic import _check_tensor

__all__ = ["Gather", "gather_rows", "Reorder", "reorder", "ReverseSequences", "reverse_sequences",
           "reversal_index", "reversed_sequences"]


class Gather(TensorOp):
    """out[...] = table[indices[...]]: table (N, D), integer indices of any shape -> indices.shape + (D,)."""
    name = "gather_rows"

    def __init__(self, indices):
        self.indices = indices  # an int64 backend array

    def compute(self, table):
        return NDArray.from_xp(table.x[self.indices], table.device)

    def gradient(self, out_grad, node):
        table = node.inputs[0].realize_cached_data()
        xp = table.device.xp
        grad = xp.zeros(table.shape, dtype=table.x.dtype)
        indices = self.indices.reshape(-1)
        rows = out_grad.realize_cached_data().x.reshape(-1, table.shape[1])
        if indices.size:   # rows used several times receive the sum of their gradients
            add_rows = table.device.kernel("add_rows")   # the cpu's is faster than numpy's add.at
            if add_rows is not None:
                add_rows(grad, indices, rows)
            else:                                        # CuPy: one scatter of atomic adds on the device
                xp.add.at(grad, indices, rows)
        return Tensor.make_const(NDArray.from_xp(grad, table.device))


def gather_rows(table, indices, who="gather_rows"):
    """Rows of `table` (N, D) picked by `indices` (a Tensor, NDArray or array of whole numbers in [0, N))."""
    _check_tensor(who, table)
    if isinstance(indices, Tensor):
        indices = indices.realize_cached_data()
    raw = indices.numpy() if isinstance(indices, NDArray) else np.asarray(indices)
    if raw.dtype.kind not in "biuf":
        raise TypeError(f"{who}: indices must be numeric, got dtype {raw.dtype}")
    n = table.shape[0]
    if raw.size and (raw.min() < 0 or raw.max() >= n or raw.dtype.kind == "f" and (raw != np.floor(raw)).any()):
        _raise_bad_index(who, raw, n)
    return Gather(table.device.xp.asarray(raw.astype(np.int64)))(table)


def _raise_bad_index(who, raw, n):
    """ValueError naming the first index (in row-major order) that is not a whole number in [0, n)."""
    with np.errstate(invalid="ignore"):  # NaN compares False everywhere: it is caught by `whole`
        whole = np.isfinite(raw) & (raw == np.floor(raw)) if raw.dtype.kind == "f" else np.ones(raw.shape, bool)
        bad = ~whole | (raw < 0) | (raw >= n)
    position = tuple(int(i) for i in np.argwhere(bad)[0])
    value = raw[position]
    if whole[position]:
        raise ValueError(f"{who}: index {int(value)} at position {position} is outside [0, {n})")
    raise ValueError(f"{who}: index {float(value):g} at position {position} is not a whole number in [0, {n})")


class Reorder(TensorOp):
    """Reorder one axis by a permutation: out[..., j, ...] = a[..., order[j], ...]; the gradient applies the
    inverse permutation."""
    name = "reorder"

    def __init__(self, order, axis):
        self.order, self.axis = order, axis  # order: an int64 numpy array

    def compute(self, a):
        return NDArray.from_xp(a.device.xp.take(a.x, a.device.xp.asarray(self.order), axis=self.axis), a.device)

    def gradient(self, out_grad, node):
        return Reorder(np.argsort(self.order), self.axis)(out_grad)


def reorder(a, order, axis):
    """a with axis `axis` reordered by the permutation `order` (e.g. sequences sorted by length)."""
    _check_tensor("reorder", a)
    axis = _norm_axes("reorder", axis, a.shape)[0]
    order = np.asarray(order, dtype=np.int64)
    if sorted(order.tolist()) != list(range(a.shape[axis])):
        raise ValueError(f"reorder: order must be a permutation of range({a.shape[axis]}) for axis {axis} of "
                         f"{a.shape}, got {order.tolist()}")
    return Reorder(order, axis)(a)


def reversal_index(lengths, seq_len):
    """(seq_len, bs) numpy index: entry [t, b] is the step that lands at t when column b is reversed over its
    first lengths[b] steps (lengths - 1 - t there, t itself past the end). The map is its own inverse."""
    steps = np.arange(seq_len)[:, None]
    return np.where(steps < lengths, lengths - 1 - steps, steps)


def reversed_sequences(xp, A, lengths):
    """The array A (T, B, ...) with each column b reversed over its first lengths[b] steps (over all T steps
    when lengths is None), padded steps left where they are: a view without lengths, else a gather."""
    if lengths is None:
        return A[::-1]
    source = xp.asarray(reversal_index(lengths, A.shape[0]))
    return A[source, xp.arange(A.shape[1])[None, :]]


class ReverseSequences(TensorOp):
    """Reverse each column b of X (T, B, ...) within its own length: out[t, b] = X[lengths[b] - 1 - t, b] for
    t < lengths[b]; padded steps stay where they are. The map is its own inverse, and so is the gradient."""
    name = "reverse_sequences"

    def __init__(self, lengths):
        self.lengths = lengths  # an int64 numpy array of shape (B,)

    def compute(self, X):
        return NDArray.from_xp(reversed_sequences(X.device.xp, X.x, self.lengths), X.device)

    def gradient(self, out_grad, node):
        return ReverseSequences(self.lengths)(out_grad)


def reverse_sequences(X, lengths):
    """X (T, B, ...) with every sequence b reversed over its first lengths[b] steps."""
    _check_tensor("reverse_sequences", X)
    lengths = np.asarray(lengths, dtype=np.int64)
    if X.ndim < 2 or lengths.shape != (X.shape[1],):
        raise ValueError(f"reverse_sequences: expected X (T, B, ...) and {X.shape[1] if X.ndim > 1 else '?'} "
                         f"lengths, got X {X.shape} and lengths of shape {lengths.shape}")
    return ReverseSequences(lengths)(X)
