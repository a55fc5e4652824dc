"""Row gather with a scatter-add gradient: the embedding lookup, without a one-hot matmul."""
import numpy as np

from ..autograd import Tensor, TensorOp
from ..backend_ndarray.ndarray import NDArray
from .ops_mathematic import _check_tensor

__all__ = ["Gather", "gather_rows"]


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
        # rows used several times receive the sum of their gradients
        xp.add.at(grad, self.indices.reshape(-1), out_grad.realize_cached_data().x.reshape(-1, table.shape[1]))
        return Tensor.make_const(NDArray.from_xp(grad, table.device))


def gather_rows(table, indices, who="gather_rows"):
    """Rows of `table` (N, D) picked by `indices` (a Tensor, NDArray or array of whole numbers in [0, N))."""
    _check_tensor(who, table)
    if isinstance(indices, Tensor):
        indices = indices.realize_cached_data()
    raw = indices.numpy() if isinstance(indices, NDArray) else np.asarray(indices)
    if raw.dtype.kind not in "biuf":
        raise TypeError(f"{who}: indices must be numeric, got dtype {raw.dtype}")
    idx = raw.astype(np.int64)
    n = table.shape[0]
    if idx.size and (idx.min() < 0 or idx.max() >= n or (idx != raw).any()):
        raise ValueError(f"{who}: indices must be whole numbers in [0, {n}), got values from {raw.min()} "
                         f"to {raw.max()}")
    return Gather(table.device.xp.asarray(idx))(table)
