"""numpy's own BLAS GEMM as a function the kernels call (a ctypes function pointer, passed as an argument).

Numba's np.dot calls the OpenBLAS that scipy ships, a second library with a second thread pool beside
numpy's: the two pools handed the cores back and forth, and scipy's ran the wide per-step products
((20, 650) @ (650, 2600)) several times slower. The kernels call numpy's OpenBLAS through its CBLAS symbol
instead, so one BLAS runs everything. Passed as an argument, the pointer is not frozen into Numba's cache.
"""
import ctypes
import glob
import os

import numpy as np

__all__ = ["gemm", "ROW_MAJOR", "NO_TRANS"]

ROW_MAJOR, NO_TRANS = 101, 111
# (symbol, integer type): numpy's wheels bundle scipy-openblas with 64-bit integers and prefixed names
_NAMES = [("scipy_cblas_{}gemm64_", ctypes.c_int64), ("cblas_{}gemm64_", ctypes.c_int64),
          ("cblas_{}gemm", ctypes.c_int)]
_GEMM = {}


def _libraries():
    from threadpoolctl import threadpool_info
    numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
    paths = [i["filepath"] for i in threadpool_info() if i.get("user_api") == "blas"
             and os.path.realpath(i["filepath"]).startswith(os.path.realpath(numpy_dir))]
    paths += glob.glob(os.path.join(numpy_dir, "numpy.libs", "*blas*"))
    paths += glob.glob(os.path.join(os.path.dirname(np.__file__), ".dylibs", "*blas*"))
    return paths


def gemm(dtype):
    """The CBLAS ?gemm of numpy's BLAS for `dtype` (float32 or float64) as a ctypes function, or None."""
    dtype = np.dtype(dtype)
    if dtype in _GEMM:
        return _GEMM[dtype]
    letter, real = ("s", ctypes.c_float) if dtype == np.float32 else ("d", ctypes.c_double)
    found = None
    for path in _libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name, integer in _NAMES:
            fn = getattr(lib, name.format(letter), None)
            if fn is not None:
                fn.restype = None
                enum, n, p = ctypes.c_int, integer, ctypes.c_int64
                fn.argtypes = [enum, enum, enum, n, n, n, real, p, n, p, n, real, p, n]
                found = fn
                break
        if found is not None:
            break
    _GEMM[dtype] = found
    return found
