"""NaN and infinity propagate silently through needle, as they do through PyTorch: numpy's floating-point
warnings (overflow, invalid value, divide by zero) are switched off while needle computes, and only there.

numpy keeps its error state in a context variable (numpy >= 2: `_extobj_contextvar` in
numpy._core._ufunc_config, a private name), so the cheapest switch is to set that variable to a prepared
"ignore everything" value and reset it afterwards: about 0.1 us, against 1 us for `np.errstate`
(benchmarks/bench_op_overhead.py). Where that name is missing, the switch falls back to the public np.seterr
(slower, the same effect). `STATE.set(QUIET)` / `STATE.reset(token)` is the switch on the per-op path
(autograd's `make_from_op`); `quiet()` wraps it as a context manager and decorator for the coarser places (a
backward walk, an optimiser step). The user's own numpy code keeps its error state: nothing is changed
globally. needle's worker threads (parallel_numpy.py) run no user code and switch the warnings off once, at
start.
"""
import functools

import numpy as np

__all__ = ["STATE", "QUIET", "quiet", "quiet_this_thread"]


class _SeterrState:
    """numpy < 2 keeps the error state per thread, behind np.seterr: the same set/reset interface."""

    @staticmethod
    def set(value):
        return np.seterr(**value)

    @staticmethod
    def reset(token):
        np.seterr(**token)


try:
    from numpy._core._ufunc_config import _extobj_contextvar as STATE
    with np.errstate(all="ignore"):
        QUIET = STATE.get()
except (ImportError, AttributeError):  # numpy < 2, or a numpy that moved it: the public, slower way
    STATE, QUIET = _SeterrState(), {"all": "ignore"}


class quiet:
    """`with quiet(): ...` runs numpy with every floating-point warning off; `@quiet()` decorates."""

    __slots__ = ("_token",)

    def __call__(self, func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            with quiet():
                return func(*args, **kwargs)
        return wrapper

    def __enter__(self):
        self._token = STATE.set(QUIET)
        return self

    def __exit__(self, *exc):
        STATE.reset(self._token)
        return False


def quiet_this_thread():
    """Switch the warnings off for the rest of the calling thread's life (for needle's own threads)."""
    np.seterr(all="ignore")
