"""The cpu backend's threaded passes (needle/backend_ndarray/parallel_numpy.py) give numpy's results: on
arrays big enough to be split, with two threads forced on, for every broadcasting case the ops meet; and
the ops and the optimiser that use them agree with the one-thread path."""

import os
import subprocess
import sys

import numpy as np
import pytest

import needle as ndl
from needle.backend_ndarray import parallel_numpy as P
from needle.ops import softmax_cross_entropy

ROWS, COLS = 700, 1000  # 700,000 elements: split into 2 blocks (each over _MIN_ELEMENTS)


@pytest.fixture
def threads(monkeypatch):
    """Force the thread count (the machine's own may be 1); the pool is made for the forced count."""
    def use(n):
        monkeypatch.setitem(P._state, "threads", n)
        monkeypatch.setitem(P._state, "pool", None)
    use(2)
    yield use


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _big(rng, shape=(ROWS, COLS), dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def test_blocks_cover_the_rows_once(threads):
    seen = []
    P.for_rows(lambda sl: seen.append((sl.start, sl.stop)), ROWS, ROWS * COLS)
    assert sorted(seen) == [(0, 350), (350, 700)]
    seen.clear()
    P.for_rows(lambda sl: seen.append((sl.start, sl.stop)), 10, 1000)  # too small to split
    assert seen == [(0, 10)]


def test_worker_threads_do_not_split_again(threads):
    inner = []

    def outer(sl):
        inner.append(len(P._blocks(ROWS, ROWS * COLS)))

    P.for_rows(outer, ROWS, ROWS * COLS)
    assert sorted(inner) == [1, 2]  # the calling thread may split; the pool's worker does not


@pytest.mark.parametrize("other_shape", [(ROWS, COLS), (1, COLS), (COLS,), (ROWS, 1), (), "scalar"])
@pytest.mark.parametrize("ufunc", [np.add, np.subtract, np.multiply, np.true_divide, np.maximum, np.power])
def test_ewise_equals_numpy(threads, rng, ufunc, other_shape):
    a = np.abs(_big(rng)) + 0.5
    b = 1.5 if other_shape == "scalar" else np.abs(_big(rng, other_shape)) + 0.5
    for x, y in ((a, b), (b, a)):
        out = P.ewise(ufunc, x, y)
        expected = ufunc(x, y)
        assert out.dtype == expected.dtype and out.shape == expected.shape
        np.testing.assert_array_equal(out, expected)


def test_ewise_broadcasts_a_leading_one_and_strided_views(threads, rng):
    a = _big(rng, (1, 4, 200_000))
    b = _big(rng, (3, 1, 200_000))
    np.testing.assert_array_equal(P.ewise(np.add, a, b), a + b)
    t = _big(rng, (COLS, ROWS)).T  # a transposed view
    np.testing.assert_array_equal(P.ewise(np.multiply, t, 2.0), t * 2.0)


def test_ewise_keeps_numpy_promotion(threads, rng):
    a = _big(rng)
    assert P.ewise(np.add, a, 2.0).dtype == np.float32
    assert P.ewise(np.add, a, a.astype(np.float64)).dtype == np.float64
    ints = np.arange(ROWS * COLS).reshape(ROWS, COLS)
    np.testing.assert_array_equal(P.ewise(np.add, ints, 1), ints + 1)  # not split: not float


@pytest.mark.parametrize("ufunc", [np.exp, np.log, np.tanh, np.negative])
def test_unary_equals_numpy(threads, rng, ufunc):
    a = np.abs(_big(rng)) + 0.1
    np.testing.assert_array_equal(P.unary(ufunc, a), ufunc(a))


@pytest.mark.parametrize("axis", [None, 0, 1, (0,), (1,), (0, 1), -1])
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("kind", ["sum", "max"])
def test_reduce_equals_numpy(threads, rng, kind, axis, keepdims):
    a = _big(rng, dtype=np.float64)
    out = P.reduce(a, kind, axis, keepdims)
    expected = getattr(a, kind)(axis=axis, keepdims=keepdims)
    assert np.shape(out) == np.shape(expected)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-9)


def test_reduce_three_dims(threads, rng):
    a = _big(rng, (300, 20, 200), np.float64)
    for axis in [(0, 2), 1, (1, 2)]:
        np.testing.assert_allclose(P.reduce(a, "sum", axis, False), a.sum(axis=axis), rtol=1e-12, atol=1e-9)


def _loss_and_grads(logits, labels):
    x = ndl.Tensor(logits, requires_grad=True)
    loss = softmax_cross_entropy(x, ndl.Tensor(labels.astype(np.float32)))
    loss.backward()
    return loss.numpy(), x.grad.numpy()


def test_cross_entropy_and_optimiser_agree_with_one_thread(threads, rng):
    logits = _big(rng) * 5
    labels = rng.integers(0, COLS, ROWS)
    loss2, grad2 = _loss_and_grads(logits, labels)
    threads(1)
    loss1, grad1 = _loss_and_grads(logits, labels)
    np.testing.assert_allclose(loss2, loss1, rtol=1e-6)
    np.testing.assert_array_equal(grad2, grad1)

    w, g = _big(rng), _big(rng)
    results = []
    for n in (2, 1):
        threads(n)
        p = ndl.Tensor(w, requires_grad=True)
        p.grad = ndl.Tensor(g)
        ndl.optim.SGD([p], lr=0.1).step()
        results.append(p.numpy())
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], w - np.float32(0.1) * g)


def test_cross_entropy_backward_twice(threads, rng):
    """The gradient is written over the op's kept exp; a second backward recomputes it."""
    logits = _big(rng)
    labels = rng.integers(0, COLS, ROWS)
    x = ndl.Tensor(logits, requires_grad=True)
    loss = softmax_cross_entropy(x, ndl.Tensor(labels.astype(np.float32)))
    loss.backward()
    first = x.grad.numpy()
    x.grad = None
    loss.backward()
    np.testing.assert_allclose(x.grad.numpy(), first, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("given, expected", [(None, "18"), ("30", "30")])
def test_import_sets_openblas_thread_timeout_unless_the_user_did(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if given is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = given
    out = subprocess.run([sys.executable, "-c", "import needle, os; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == expected


_FAULTS = """
import resource, numpy as np, needle
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(4 * 2 ** 20, np.float32); del a
f0 = faults()
for _ in range(10):
    a = np.ones(4 * 2 ** 20, np.float32)   # 16 MiB, written, freed
    del a
print(faults() - f0)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="malloc tuning is for glibc")
def test_import_keeps_freed_memory_unless_told_not_to():
    """A 16 MiB array allocated and freed ten times: with needle's malloc settings its pages stay in the
    process (no page faults after the first); NEEDLE_MALLOC_TUNING=0 leaves glibc's defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}

    def faults(**extra):
        return int(subprocess.run([sys.executable, "-c", _FAULTS], env=dict(env, **extra), capture_output=True,
                                  text=True, check=True).stdout)

    tuned, default = faults(), faults(NEEDLE_MALLOC_TUNING="0")
    assert tuned <= 10 and default > tuned, (tuned, default)


def _phased(log, name, value, fail=False):
    """A phased kernel: set-up, a loop (between its two yields) and a finish; logs each part's thread."""
    import threading
    log.append((name, "set-up", threading.current_thread().name))
    yield
    log.append((name, "loop", threading.current_thread().name))
    if fail:
        raise ValueError(f"{name} failed")
    yield
    log.append((name, "finish", threading.current_thread().name))
    return value


def test_run_phased_loops_side_by_side_then_in_order(threads):
    from threadpoolctl import threadpool_info
    before = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    log = []
    assert P.run_phased([_phased(log, "a", 1), _phased(log, "b", 2)], P._SIDE_BY_SIDE_MIN) == [1, 2]
    parts = [(name, part) for name, part, _ in log]
    assert parts[:2] == [("a", "set-up"), ("b", "set-up")]
    assert sorted(parts[2:4]) == [("a", "loop"), ("b", "loop")]
    assert parts[4:] == [("a", "finish"), ("b", "finish")]
    loops = {name: thread for name, part, thread in log if part == "loop"}
    assert loops["a"] != loops["b"]                      # the two loops ran on two threads
    assert {thread for _, part, thread in log if part != "loop"} == {loops["a"]}  # the rest on the caller's
    assert [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"] == before


def test_run_phased_small_work_one_thread_and_errors(threads):
    log = []
    assert P.run_phased([_phased(log, "a", 1), _phased(log, "b", 2)], P._SIDE_BY_SIDE_MIN - 1) == [1, 2]
    assert len({thread for _, _, thread in log}) == 1     # below the threshold: one thread, in order
    assert [(n, p) for n, p, _ in log] == [("a", "set-up"), ("b", "set-up"), ("a", "loop"), ("b", "loop"),
                                           ("a", "finish"), ("b", "finish")]

    def whole():          # a kernel that never yields (recompute_every) runs through in its set-up
        return 3
        yield
    assert P.run_phased([whole(), _phased([], "b", 2)], P._SIDE_BY_SIDE_MIN) == [3, 2]
    with pytest.raises(ValueError, match="b failed"):
        P.run_phased([_phased([], "a", 1), _phased([], "b", 2, fail=True)], P._SIDE_BY_SIDE_MIN)


def test_run_phased_one_thread_when_needle_has_one(threads):
    threads(1)                                        # NEEDLE_NUM_THREADS=1 (or one BLAS thread, as under MPI)
    log = []
    assert P.run_phased([_phased(log, "a", 1), _phased(log, "b", 2)], 1 << 30) == [1, 2]
    assert len({thread for _, _, thread in log}) == 1
