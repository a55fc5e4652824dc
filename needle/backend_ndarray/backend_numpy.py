"""The cpu backend: flat numpy buffers and the few functions a device must provide.

A backend owns flat 1-D buffers; `NDArray` owns shape, strides and offset and asks the backend for a
strided view over a buffer, then computes with the backend's array module `xp`. A CuPy backend is this
module with `xp = cupy` and its own `view`, `from_numpy` and `to_numpy`.

Optional entry points are looked up on the backend with a fallback, so a backend without them still runs
every op: fused recurrent kernels (`rnn_forward`, `lstm_forward`, ..., and their phased forms, which
`run_phased` runs side by side), here big elementwise passes and reductions split over threads
(`ewise`, `unary`, `reduce`, `for_rows`: parallel_numpy.py), and `add_rows` for an embedding's gradient.
"""
import numpy

from .parallel_numpy import ewise, for_rows, reduce, run_phased, unary
from .recurrent_numpy import (gru_backward, gru_backward_phases, gru_forward, gru_forward_phases, lstm_backward,
                              lstm_backward_phases, lstm_forward, lstm_forward_phases, rnn_backward,
                              rnn_backward_phases, rnn_forward, rnn_forward_phases)

__all__ = ["xp", "enabled", "empty", "view", "from_numpy", "to_numpy", "ewise", "unary", "reduce", "for_rows",
           "add_rows",
           "rnn_forward", "rnn_backward", "lstm_forward", "lstm_backward", "gru_forward", "gru_backward",
           "run_phased", "rnn_forward_phases", "rnn_backward_phases", "lstm_forward_phases", "lstm_backward_phases",
           "gru_forward_phases", "gru_backward_phases"]

xp = numpy


def enabled():
    return True


def empty(size, dtype):
    """A new flat buffer of `size` elements."""
    return xp.empty(size, dtype=dtype)


def view(buffer, shape, strides, offset):
    """The strided view (shape, strides and offset in elements) over a flat buffer; shares its memory."""
    itemsize = buffer.itemsize
    return xp.ndarray(shape, buffer.dtype, buffer=buffer, offset=offset * itemsize,
                      strides=tuple(s * itemsize for s in strides))


def from_numpy(array):
    """A flat buffer holding a copy of a numpy array, in C order."""
    return xp.array(array, order="C").reshape(-1)


def to_numpy(array):
    """A numpy copy of a backend array (here: already numpy)."""
    return numpy.array(array)


def add_rows(out, indices, rows):
    """out[indices[i]] += rows[i] for every i, rows of repeated indices summed (xp.add.at's meaning).
    Sorting the indices and summing each run of equal ones with one reduceat is faster than numpy's
    unbuffered add.at scatter."""
    order = xp.argsort(indices, kind="stable")
    sorted_indices = indices[order]
    run_starts = xp.flatnonzero(xp.concatenate(([True], sorted_indices[1:] != sorted_indices[:-1])))
    out[sorted_indices[run_starts]] += xp.add.reduceat(rows[order], run_starts, axis=0)
