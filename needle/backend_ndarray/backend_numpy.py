"""The cpu backend: flat numpy buffers and the few functions a device must provide.

A backend owns flat 1-D buffers; `NDArray` owns shape, strides and offset and asks the backend for a
strided view over a buffer, then computes with the backend's array module `xp`. A CuPy backend is this
module with `xp = cupy` and its own `view`, `from_numpy` and `to_numpy`.

Optional entry points are looked up on the backend with a fallback, so a backend without them still runs
every op: here big elementwise passes and reductions split over threads (`ewise`, `unary`, `reduce`,
`for_rows`: parallel_numpy.py), `run_phased` (the recurrent loops of a bidirectional layer's two compiled
directions side by side) and `add_rows` for an embedding's gradient.
"""
import numpy

from .parallel_numpy import PARALLEL_FROM, ewise, for_rows, reduce, run_phased, unary

__all__ = ["xp", "PARALLEL_FROM", "enabled", "empty", "view", "from_numpy", "to_numpy", "ewise", "unary", "reduce",
           "for_rows", "add_rows", "run_phased"]

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
