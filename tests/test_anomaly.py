"""ndl.detect_anomaly(): the first NaN or infinity, forward or backward, raises FloatingPointError naming the
op, its input shapes, the phase and the caller's file and line; outside it NaN and inf propagate silently."""
import inspect
import os
import re

import numpy as np
import pytest

import needle as ndl
from needle.anomaly import AnomalyError

HERE = os.path.abspath(__file__)


def T(values):
    return ndl.Tensor(np.array(values, dtype=np.float32), requires_grad=True)


def _line_of(marker):
    """The line of this file holding `marker` (a comment), so the tests do not hard-code line numbers."""
    lines = inspect.getsource(inspect.getmodule(_line_of)).splitlines()
    return next(i for i, line in enumerate(lines, 1) if marker in line and "_line_of" not in line)


def _assert_names(error, op, phase, kind, shapes, marker, detail=""):
    message = str(error)
    assert isinstance(error, FloatingPointError)
    assert message.startswith(f"{op}: {phase} produced {kind}{detail} ("), message
    assert f"inputs {shapes}" in message, message
    assert f"called at {HERE}:{_line_of(marker)} in " in message, message
    assert (error.op, error.phase, error.kind) == (op, phase, kind)


@pytest.mark.parametrize("value, kind", [(0.0, "inf"), (-1.0, "NaN")])
def test_forward_nan_and_inf_as_a_context_manager(value, kind):
    x = T([[1.0, value], [2.0, 3.0]])
    with pytest.raises(FloatingPointError) as excinfo:
        with ndl.detect_anomaly():
            y = x * 2.0
            ndl.log(y)  # forward: log
    _assert_names(excinfo.value, "log", "forward", kind, "(2, 2)", "# forward: log")
    assert "(1 of 4 values)" in str(excinfo.value)
    assert not ndl.is_anomaly_enabled()


@pytest.mark.parametrize("scale, kind", [(1.0, "inf"), (0.0, "NaN")])
def test_backward_nan_and_inf_name_where_the_forward_op_was_called(scale, kind):
    x = ndl.Tensor(np.array([4.0, 0.0], np.float32), requires_grad=True)
    with ndl.detect_anomaly():
        y = ndl.power_scalar(x, 0.5)  # forward: power_scalar
        z = ndl.summation(y * scale)
        with pytest.raises(FloatingPointError) as excinfo:
            z.backward()  # d sqrt(x)/dx = 0.5 / sqrt(0) = inf; times a zero upstream gradient: NaN
    _assert_names(excinfo.value, "power_scalar", "backward", kind, "(2,)", "# forward: power_scalar",
                  " in the gradient of input 0")
    assert "(1 of 2 values)" in str(excinfo.value)
    assert x.grad is None


def test_forward_nan_from_finite_inputs():
    x, y = T([0.0, 1.0]), T([0.0, 2.0])
    with pytest.raises(FloatingPointError) as excinfo:
        with ndl.detect_anomaly():
            x / y  # zero by zero
    _assert_names(excinfo.value, "divide", "forward", "NaN", "(2,), (2,)", "# zero by zero")


def test_as_a_decorator_with_and_without_parentheses():
    @ndl.detect_anomaly
    def plain(x):
        return ndl.exp(x * 100.0)  # in plain

    @ndl.detect_anomaly()
    def called(x):
        return ndl.exp(x * 100.0)  # in called

    for f, marker in ((plain, "# in plain"), (called, "# in called")):
        assert f.__name__ in ("plain", "called")
        with pytest.raises(FloatingPointError) as excinfo:
            f(T([1.0, 2.0]))
        _assert_names(excinfo.value, "exp", "forward", "inf", "(2,)", marker)
        assert " in test_as_a_decorator_with_and_without_parentheses.<locals>." in str(excinfo.value)
        assert not ndl.is_anomaly_enabled()


def test_a_module_call_names_the_users_line_and_the_module():
    model = ndl.nn.Linear(2, 3)
    model.weight = ndl.nn.Parameter(np.ones((2, 3), np.float32))
    with pytest.raises(AnomalyError) as excinfo:
        with ndl.detect_anomaly():
            model(T([[3e38, 3e38], [1.0, 2.0]]))  # into Linear
    error = excinfo.value
    assert error.phase == "forward" and error.kind == "inf" and error.input_shapes[0] == "(2, 2)"
    assert error.site.startswith(f"{HERE}:{_line_of('# into Linear')} in ")
    assert error.via is not None and "nn_basic.py" in error.via and "Linear.forward" in error.via
    assert str(error).endswith(f"called at {error.site}, via {error.via}")


def test_a_fused_recurrent_op_is_named_by_its_module():
    lstm = ndl.nn.LSTM(3, 4)
    x = ndl.Tensor(np.full((2, 1, 3), np.nan, np.float32))
    with pytest.raises(AnomalyError, match=r"^LSTM: forward produced NaN"):
        with ndl.detect_anomaly():
            lstm(x)


def test_nesting_restores_the_previous_state():
    with ndl.detect_anomaly():
        with ndl.detect_anomaly():
            assert ndl.is_anomaly_enabled()
        assert ndl.is_anomaly_enabled()
        with ndl.no_grad():
            with pytest.raises(FloatingPointError):
                ndl.log(T([0.0]))
    assert not ndl.is_anomaly_enabled()


def test_outside_it_nan_and_inf_propagate_silently():
    x = T([0.0, -1.0])
    y = ndl.log(x)
    y.sum().backward()
    assert np.isneginf(y.numpy()[0]) and np.isnan(y.numpy()[1])
    assert np.isinf(x.grad.numpy()[0])


def test_a_backward_whose_forward_ran_outside_says_so():
    x = T([0.0, 1.0])
    y = ndl.power_scalar(x, 0.5)
    with ndl.detect_anomaly():
        with pytest.raises(AnomalyError, match=re.escape("its forward ran outside detect_anomaly")) as excinfo:
            y.sum().backward()
    assert excinfo.value.phase == "backward" and excinfo.value.site is None


def test_finite_work_under_it_matches_work_outside():
    rng = np.random.default_rng(0)
    a, b = (ndl.Tensor(rng.standard_normal((3, 4)).astype(np.float32), requires_grad=True) for _ in range(2))
    ndl.summation(ndl.tanh(a @ ndl.transpose(b)) * 2.0).backward()
    expected = a.grad.numpy()
    a.grad = None
    with ndl.detect_anomaly():
        ndl.summation(ndl.tanh(a @ ndl.transpose(b)) * 2.0).backward()
    np.testing.assert_array_equal(a.grad.numpy(), expected)
