"""Big elementwise passes of the cpu backend on as many cores as BLAS uses.

numpy runs a GEMM on every core OpenBLAS is allowed, but a ufunc on one. On a language model's output
layer that leaves half of a 2-core machine idle for a quarter of a training step: the bias add, the
softmax and its gradient, the column sums of the bias gradient are passes over a (tokens, vocabulary)
array. ufuncs release the GIL, so such a pass split into blocks of rows runs in parallel on Python
threads: on this machine 1.75x faster on 2 cores (700 x 7596 float32: subtract, exp and row sums in
4.5 ms on one thread, 2.5 ms on two).

The same threads run the recurrent loops of independent kernels side by side (`run_phased`): a loop's
per-step GEMMs are too small to use two cores well (20 x 200 @ 200 x 800 takes about as long on one
OpenBLAS thread as on two), so two loops on one BLAS thread each, such as the two directions of a
bidirectional layer, finish sooner together than one after the other on two BLAS threads.

The thread count is NEEDLE_NUM_THREADS, else OPENBLAS_NUM_THREADS, else OMP_NUM_THREADS, else the cores
this process may run on (read once); 1 turns all of this off. A pass is split only where each block
keeps at least _MIN_ELEMENTS elements (smaller ones cost less than waking a thread), and never from
inside a worker thread.
"""
import operator
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import ThreadpoolController

from .float_errors import quiet_this_thread

__all__ = ["PARALLEL_FROM", "num_threads", "for_rows", "ewise", "unary", "reduce", "run_phased"]

_MIN_ELEMENTS = 1 << 17
PARALLEL_FROM = 2 * _MIN_ELEMENTS  # elementwise passes smaller than this run on the caller's thread
_state = {"threads": None, "pool": None, "blas": None}
_local = threading.local()


def num_threads():
    """How many threads a big pass may use (see the module docstring)."""
    if _state["threads"] is None:
        n = None
        for name in ("NEEDLE_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
            value = os.environ.get(name, "").strip()
            if value.isdigit() and int(value) > 0:
                n = int(value)
                break
        if n is None:
            n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        _state["threads"] = max(1, min(n, 16))
    return _state["threads"]


def _start_worker():
    _local.worker = True
    quiet_this_thread()  # a needle thread: NaN and inf pass without numpy's warnings, as on the caller's


def _pool():
    if _state["pool"] is None:
        _state["pool"] = ThreadPoolExecutor(num_threads() - 1, thread_name_prefix="needle",
                                            initializer=_start_worker)
    return _state["pool"]


def _forget_pool():
    # a forked child has none of its parent's threads: it starts a pool of its own when it needs one
    _state["pool"] = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _blocks(rows, elements):
    n = min(num_threads(), rows, elements // _MIN_ELEMENTS)
    if n <= 1 or getattr(_local, "worker", False):
        return [slice(0, rows)]
    return [slice(i * rows // n, (i + 1) * rows // n) for i in range(n)]


def for_rows(fn, rows, elements):
    """fn(block) for consecutive blocks (slices) of range(rows) covering it, in parallel where `elements`
    (the work's size) is big enough; returns the results in block order. fn must touch only its rows."""
    blocks = _blocks(rows, elements)
    if len(blocks) == 1:
        return [fn(blocks[0])]
    futures = [_pool().submit(fn, b) for b in blocks[1:]]
    first = fn(blocks[0])
    return [first] + [f.result() for f in futures]


def _rows_of(a, block, ndim, rows):
    """The rows `block` of operand a as broadcast against a result of `ndim` dims and `rows` rows."""
    if isinstance(a, np.ndarray) and a.ndim == ndim and a.shape[0] == rows and rows != 1:
        return a[block]
    return a  # a scalar, fewer dims or a leading 1: the same for every block


def ewise(ufunc, a, b):
    """ufunc(a, b) with numpy's broadcasting, over row blocks of the result in parallel when it is big."""
    # the result has at most size(a) * size(b) elements: small operands (most calls) leave at once
    if getattr(a, "size", 1) * getattr(b, "size", 1) < PARALLEL_FROM or not isinstance(ufunc, np.ufunc):
        return ufunc(a, b)
    shape = np.broadcast_shapes(np.shape(a), np.shape(b))
    size = 1
    for d in shape:
        size *= d
    if len(shape) == 0 or size < PARALLEL_FROM or num_threads() == 1:
        return ufunc(a, b)
    dtype = np.result_type(a, b)
    if dtype.kind not in "fc":
        return ufunc(a, b)
    out = np.empty(shape, dtype)
    rows = shape[0]
    ndim = len(shape)

    def block(sl):
        ufunc(_rows_of(a, sl, ndim, rows), _rows_of(b, sl, ndim, rows), out=out[sl])

    for_rows(block, rows, size)
    return out


def unary(ufunc, a):
    """ufunc(a) (exp, log, tanh, negative) over row blocks in parallel when a is big."""
    if a.ndim == 0 or a.size < PARALLEL_FROM or num_threads() == 1 or a.dtype.kind not in "fc":
        return ufunc(a)
    out = np.empty(a.shape, a.dtype)
    for_rows(lambda sl: ufunc(a[sl], out=out[sl]), a.shape[0], a.size)
    return out


_REDUCE_COMBINE = {"sum": operator.add, "max": np.maximum}


def reduce(a, kind, axis, keepdims):
    """a.sum / a.max over `axis` (None, int or tuple), over row blocks in parallel when a is big: blocks
    reduced on their own, then combined (over axis 0) or concatenated (when axis 0 is kept)."""
    plain = getattr(a, kind)
    if a.ndim == 0 or a.size < PARALLEL_FROM or num_threads() == 1 or a.dtype.kind not in "fc":
        return plain(axis=axis, keepdims=keepdims)
    axes = tuple(range(a.ndim)) if axis is None else (axis,) if isinstance(axis, int) else tuple(axis)
    axes = tuple(x % a.ndim for x in axes)
    parts = for_rows(lambda sl: getattr(a[sl], kind)(axis=axes, keepdims=True), a.shape[0], a.size)
    if 0 in axes:
        out = parts[0]
        for p in parts[1:]:
            out = _REDUCE_COMBINE[kind](out, p)
    else:
        out = np.concatenate(parts, axis=0)
    if not keepdims:
        out = out.reshape(tuple(d for i, d in enumerate(out.shape) if i not in axes))
    return out


# Side by side only where a step's gate matrix (batch x gates x hidden) has at least this many
# elements: below it a step is a few microseconds of Python, and two threads passing the GIL back and
# forth are slower than one (tiny workloads: 2x slower).
_SIDE_BY_SIDE_MIN = 1 << 11


def _blas():
    """threadpoolctl's controller of the BLAS libraries numpy loaded (made on first use: it scans the
    process's libraries), or False where it finds none it can limit."""
    if _state["blas"] is None:
        blas = ThreadpoolController().select(user_api="blas")
        _state["blas"] = blas if blas.lib_controllers else False
    return _state["blas"]


def _advance(kernel):
    """Run a phased kernel to its next yield: (True, None), or (False, its result) once it has returned."""
    try:
        next(kernel)
        return True, None
    except StopIteration as done:
        return False, done.value


def run_phased(kernels, step_elements):
    """Run phased kernels (generators that yield just before and just after their recurrent loop, as
    compiler.fused.CompiledLayer's phased forward and backward do) and return their results in order. Each
    kernel's part before its loop (the input projection GEMM) and after it (the weight-gradient GEMMs) runs
    in turn on every BLAS thread;
    the loops run side by side, one thread each with one BLAS thread, where there are two kernels or more,
    two threads or more, and `step_elements` (the elements of a step's gate matrix) reaches
    _SIDE_BY_SIDE_MIN."""
    results = [None] * len(kernels)
    live = []
    for i, kernel in enumerate(kernels):                 # up to the loops, one after the other
        going, results[i] = _advance(kernel)
        if going:
            live.append(i)
    side_by_side = (len(live) > 1 and step_elements >= _SIDE_BY_SIDE_MIN and num_threads() > 1
                    and not getattr(_local, "worker", False) and _blas())
    if side_by_side:
        _local.worker = True                             # no nested splitting from the loops
        try:
            with _blas().limit(limits=1):
                futures = [_pool().submit(_advance, kernels[i]) for i in live[1:]]
                outcomes = [_advance(kernels[live[0]])] + [f.result() for f in futures]
        finally:
            _local.worker = False
    else:
        outcomes = [_advance(kernels[i]) for i in live]
    for i, (going, result) in zip(live, outcomes):       # after the loops, one after the other
        while going:
            going, result = _advance(kernels[i])
        results[i] = result
    return results
