"""NaN and infinity propagate silently, as in PyTorch: no numpy RuntimeWarning (overflow, invalid value,
divide by zero) escapes from inside needle, forward or backward, while the user's own numpy code keeps its
error state."""
import warnings

import numpy as np
import pytest

import needle as ndl
from needle.backend_ndarray import float_errors, parallel_numpy


def T(value, shape=(3, 4)):
    return ndl.Tensor(np.full(shape, value, dtype=np.float32), requires_grad=True)


# Each builds a result that is NaN or infinite somewhere, from finite or non-finite inputs.
FORWARD = {
    "exp overflow": lambda: ndl.exp(T(1e3)),
    "multiply overflow": lambda: T(1e30) * T(1e30),
    "mul_scalar overflow": lambda: T(1e30) * 1e30,
    "log of zero": lambda: ndl.log(T(0.0)),
    "log of a negative": lambda: ndl.log(T(-1.0)),
    "divide by zero": lambda: T(1.0) / T(0.0),
    "zero by zero": lambda: T(0.0) / T(0.0),
    "inf minus inf": lambda: T(np.inf) - T(np.inf),
    "inf times zero": lambda: T(np.inf) * T(0.0),
    "summation overflow": lambda: ndl.summation(T(3e38)),
    "matmul overflow": lambda: T(1e30) @ ndl.transpose(T(1e30)),
    "power_scalar of a negative": lambda: ndl.power_scalar(T(-1.0), 0.5),
    "power_scalar overflow": lambda: ndl.power_scalar(T(1e30), 3),
    "logsumexp of inf": lambda: ndl.logsumexp(T(np.inf), (1,)),
    "logsoftmax of inf": lambda: ndl.logsoftmax(T(np.inf)),
    "softmax_cross_entropy of inf": lambda: ndl.ops.softmax_cross_entropy(T(np.inf), ndl.Tensor([0, 1, 2])),
    "sigmoid of nan": lambda: ndl.sigmoid(T(np.nan)),
    "tanh of nan": lambda: ndl.tanh(T(np.nan)),
    "relu of nan": lambda: ndl.relu(T(np.nan)),
    "LSTM of inf": lambda: ndl.nn.LSTM(4, 5)(T(np.inf, (3, 2, 4)))[0],
    "GRU on the reference path": lambda: ndl.nn.GRU(4, 5, fused=False)(T(np.inf, (3, 2, 4)))[0],
    "Linear of inf": lambda: ndl.nn.Linear(4, 2)(T(np.inf)),
    "a big parallel pass": lambda: T(3e38, (700, 500)) + T(3e38, (700, 500)),
}


@pytest.mark.parametrize("build", FORWARD.values(), ids=FORWARD.keys())
def test_no_warning_forward_or_backward(build):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = build()
        assert not np.isfinite(out.numpy()).all()
        out.sum().backward()  # gradients through overflow, inf and NaN


def test_a_big_pass_on_the_worker_threads(monkeypatch):
    monkeypatch.setitem(parallel_numpy._state, "threads", 2)  # split the pass in two: one block per thread
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = T(3e38, (700, 500)) + T(3e38, (700, 500))
        assert np.isinf(out.numpy()).all()
        ndl.exp(out).sum().backward()
    assert parallel_numpy._state["pool"] is not None


def test_no_warning_from_optimisers_and_clipping():
    for make in (lambda p: ndl.optim.SGD(p, lr=1e38, momentum=0.9), lambda p: ndl.optim.Adam(p, lr=1e38)):
        w = T(1e30)
        opt = make([w])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for grad in (3e38, np.inf, np.nan):
                w.grad = ndl.Tensor(np.full(w.shape, grad, np.float32))
                opt.clip_grad_norm(0.25)
                opt.step()
        assert not np.isfinite(w.numpy()).all()


def test_data_too_big_for_float32_becomes_inf_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isinf(ndl.Tensor(np.array([1e300, -1e300])).numpy()).all()


def test_the_users_own_numpy_error_state_is_left_alone():
    before = np.geterr()
    with np.errstate(over="raise"):
        ndl.exp(T(1e3)).sum().backward()  # quiet inside needle, even under the user's errstate
        assert np.geterr()["over"] == "raise"
        with pytest.raises(FloatingPointError):
            np.exp(np.float32(1e3))
    assert np.geterr() == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="overflow"):
            np.exp(np.full(3, 1e3, np.float32))


def test_the_public_fallback_switches_the_same_way():
    """numpy < 2 (or a numpy that renamed its context variable) gets np.seterr behind the same interface."""
    state = float_errors._SeterrState()
    before = np.geterr()
    token = state.set({"all": "ignore"})
    try:
        assert set(np.geterr().values()) == {"ignore"}
    finally:
        state.reset(token)
    assert np.geterr() == before
