"""The cuda backend: CuPy arrays on the GPU. Everything else is NDArray's shared code with `xp = cupy`.

Importing this module fails without CuPy, and `enabled()` is False without a GPU; `nd.cuda()` turns either
into a disabled device. It has no fused recurrent kernels yet, so RNN, LSTM and GRU run their reference
path on cuda. Run on an NVIDIA H200 (CuPy 14.2) on 2026-12-04, where the tests' cuda cases pass; this
project's CI has no GPU.
"""
import cupy
import numpy

__all__ = ["xp", "enabled", "empty", "view", "from_numpy", "to_numpy"]

xp = cupy


def enabled():
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except cupy.cuda.runtime.CUDARuntimeError:
        return False


def empty(size, dtype):
    return cupy.empty(size, dtype=dtype)


def view(buffer, shape, strides, offset):
    """The strided view (in elements) over a flat device buffer; shares its memory."""
    itemsize = buffer.itemsize
    return cupy.ndarray(shape, buffer.dtype, memptr=buffer.data + offset * itemsize,
                        strides=tuple(s * itemsize for s in strides))


def from_numpy(array):
    return cupy.asarray(numpy.ascontiguousarray(array)).reshape(-1)


def to_numpy(array):
    return cupy.asnumpy(array)
