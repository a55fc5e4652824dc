"""Bad inputs to the core raise the documented type (ValueError for a bad value or shape, TypeError for a
wrong type) at the user's call, with a message that names the public op and shows the shapes as tuples."""

import re

import numpy as np
import pytest

import needle as ndl
from needle import backend_ndarray as nd


def T(*shape):
    return ndl.Tensor(np.random.randn(*shape))


def assert_raised_in_needle(excinfo, public_name):
    """The error comes from needle's own checks, reached from the public function, not from inside numpy."""
    last = str(excinfo.traceback[-1].path)
    assert "needle" in last and "numpy" not in last, last
    assert public_name in [entry.name for entry in excinfo.traceback]
    error = excinfo.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


# Shapes that do not fit: ValueError naming the op, with both shapes as tuples

@pytest.mark.parametrize("name, call", [
    ("add", lambda a, b: ndl.add(a, b)),
    ("add", lambda a, b: a + b),
    ("add", lambda a, b: a - b),
    ("multiply", lambda a, b: ndl.multiply(a, b)),
    ("multiply", lambda a, b: a * b),
    ("divide", lambda a, b: a / b),
    ("power", lambda a, b: ndl.power(a, b)),
    ("power", lambda a, b: a ** b),
])
def test_elementwise_shapes_that_cannot_broadcast(name, call):
    with pytest.raises(ValueError, match=rf"^{name}\b.*\(2, 3\).*\(4, 3\)") as excinfo:
        call(T(2, 3), T(4, 3))
    assert_raised_in_needle(excinfo, name)


@pytest.mark.parametrize("call", [lambda a, b: ndl.matmul(a, b), lambda a, b: a @ b], ids=["matmul", "@"])
def test_matmul_inner_dimensions(call):
    with pytest.raises(ValueError, match=re.escape("matmul: inner dimensions differ: (2, 3) @ (4, 5)")) as excinfo:
        call(T(2, 3), T(4, 5))
    assert_raised_in_needle(excinfo, "matmul")


def test_matmul_batch_dimensions_and_1d_operands():
    with pytest.raises(ValueError, match=r"^matmul\b.*\(2, 3, 4\) @ \(3, 4, 5\)"):
        T(2, 3, 4) @ T(3, 4, 5)
    with pytest.raises(ValueError, match=r"^matmul\b.*\(3,\) @ \(3, 2\)"):
        T(3) @ T(3, 2)


def test_broadcast_to_an_incompatible_shape():
    with pytest.raises(ValueError, match=r"^broadcast_to\b.*\(2, 3\).*\(4, 3\)") as excinfo:
        ndl.broadcast_to(T(2, 3), (4, 3))
    assert_raised_in_needle(excinfo, "broadcast_to")
    with pytest.raises(ValueError, match=r"^broadcast_to\b.*\(2, 3\).*\(3,\)"):
        T(2, 3).broadcast_to((3,))
    with pytest.raises(ValueError, match=r"^broadcast_to\b.*\(2, 3\).*\(2, 4\)"):
        nd.array(np.zeros((2, 3))).broadcast_to((2, 4))


def test_reshape_to_another_size():
    with pytest.raises(ValueError, match=r"^reshape\b.*\(2, 3\).*\(4, 2\)") as excinfo:
        ndl.reshape(T(2, 3), (4, 2))
    assert_raised_in_needle(excinfo, "reshape")
    with pytest.raises(ValueError, match=r"^reshape\b.*\(2, 3\).*\(4, -1\)"):
        T(2, 3).reshape((4, -1))
    with pytest.raises(ValueError, match=r"^reshape\b.*\(2, 3\).*\(7,\)"):
        nd.array(np.zeros((2, 3))).reshape((7,))


def test_stack_of_unequal_shapes():
    with pytest.raises(ValueError, match=r"^stack\b.*\(2, 3\).*\(3, 2\)") as excinfo:
        ndl.stack([T(2, 3), T(2, 3), T(3, 2)], 0)
    assert_raised_in_needle(excinfo, "stack")
    with pytest.raises(ValueError, match=r"^stack\b"):
        ndl.stack([], 0)


@pytest.mark.parametrize("name, call, axis", [
    ("summation", lambda x: ndl.summation(x, 2), 2),
    ("summation", lambda x: ndl.summation(x, (0, -3)), -3),
    ("summation", lambda x: x.sum(5), 5),
    ("split", lambda x: ndl.split(x, 2), 2),
    ("split", lambda x: ndl.split(x, -3), -3),
    ("stack", lambda x: ndl.stack([x, x], 3), 3),
    ("stack", lambda x: ndl.stack([x, x], -4), -4),
    ("transpose", lambda x: ndl.transpose(x, (0, 2)), 2),
    ("transpose", lambda x: x.transpose((-3, 1)), -3),
    ("logsumexp", lambda x: ndl.logsumexp(x, (2,)), 2),
    ("flip", lambda x: ndl.flip(x, (0, 2)), 2),
    ("dilate", lambda x: ndl.dilate(x, (2,), 1), 2),
])
def test_axis_out_of_range(name, call, axis):
    with pytest.raises(ValueError, match=rf"^{name}: axis {axis} is out of range.*\(2, 3\)") as excinfo:
        call(T(2, 3))
    assert_raised_in_needle(excinfo, name)


def test_other_bad_axes_and_arguments():
    with pytest.raises(ValueError, match=r"^summation\b.*repeated"):
        ndl.summation(T(2, 3), (1, -1))
    with pytest.raises(ValueError, match=r"^transpose\b.*\(3,\)"):
        ndl.transpose(T(3))
    with pytest.raises(ValueError, match=r"^transpose\b.*pair"):
        ndl.transpose(T(2, 3, 4), (0, 1, 2))
    with pytest.raises(ValueError, match=r"^undilate\b.*\(5, 4\)"):
        ndl.undilate(T(5, 4), (0,), 1)
    with pytest.raises(ValueError, match=r"^dilate\b.*dilation"):
        ndl.dilate(T(5, 4), (0,), -1)
    with pytest.raises(ValueError, match=r"^softmax_cross_entropy\b.*\(3, 4\).*\(2,\)"):
        ndl.ops.softmax_cross_entropy(T(3, 4), ndl.Tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^softmax_cross_entropy\b.*labels"):
        ndl.ops.softmax_cross_entropy(T(2, 4), ndl.Tensor([0, 4]))


# Devices


@pytest.mark.parametrize("name, call", [
    ("add", lambda a, b: a + b),
    ("multiply", lambda a, b: ndl.multiply(a, b)),
    ("matmul", lambda a, b: a @ b.transpose()),
    ("stack", lambda a, b: ndl.stack([a, b], 0)),
])
def test_tensors_on_different_devices(name, call):
    a = ndl.Tensor(np.ones((2, 3)), device=ndl.cpu())
    b = ndl.Tensor(np.ones((2, 3)), device=ndl.cpu_numpy())
    assert a.device != b.device
    with pytest.raises(ValueError, match=rf"^{name}\b") as excinfo:
        call(a, b)
    assert "cpu()" in str(excinfo.value) and "cpu_numpy()" in str(excinfo.value)
    assert_raised_in_needle(excinfo, name)


@pytest.mark.parametrize("call", [
    lambda: ndl.Tensor([1.0], device="gpu"),
    lambda: ndl.Tensor(ndl.Tensor([1.0]), device="gpu"),
    lambda: ndl.Tensor([1.0]).to("gpu"),
    lambda: nd.array([1.0], device="gpu"),
    lambda: nd.array([1.0]).to("gpu"),
    lambda: nd.empty((2,), device="gpu"),
    lambda: nd.full((2,), 1.0, device="gpu"),
], ids=["Tensor", "Tensor(Tensor)", "Tensor.to", "array", "NDArray.to", "empty", "full"])
def test_a_device_given_as_a_string(call):
    with pytest.raises(TypeError, match="'gpu'"):
        call()


# Data that is not numeric


@pytest.mark.parametrize("data", ["abc", None, {"a": 1.0}, object(), [1.0, "x"], [[1.0], None], 1 + 2j],
                         ids=["str", "None", "dict", "object", "list with str", "list with None", "complex"])
def test_non_numeric_data(data):
    with pytest.raises(TypeError, match="^Tensor: data must be numeric") as excinfo:
        ndl.Tensor(data)
    assert_raised_in_needle(excinfo, "__init__")
    with pytest.raises(TypeError, match="numeric"):
        nd.array(data)


@pytest.mark.parametrize("call, name", [
    (lambda x: ndl.add_scalar(x, "1"), "add_scalar"),
    (lambda x: x * "2", "mul_scalar"),
    (lambda x: x / None, "divide_scalar"),
    (lambda x: x ** [2], "power_scalar"),
    (lambda x: x + np.ones(3), "add_scalar"),
    (lambda x: ndl.add(x, 1.0), "add"),
    (lambda x: ndl.matmul(x, np.ones((3, 3))), "matmul"),
    (lambda x: ndl.summation(np.ones(3)), "summation"),
    (lambda x: ndl.exp(np.ones(3)), "exp"),
])
def test_wrong_types_to_ops(call, name):
    with pytest.raises(TypeError, match=rf"^{name}\b"):
        call(T(3))


# Embedding indices: the first bad one, as a whole number, and its position


@pytest.mark.parametrize("indices, message", [
    ([[1, 2], [3, 12]], "Embedding: index 12 at position (1, 1) is outside [0, 10)"),
    ([[1, 12], [-3, 40]], "Embedding: index 12 at position (0, 1) is outside [0, 10)"),
    ([[0, -1]], "Embedding: index -1 at position (0, 1) is outside [0, 10)"),
    ([[10.0]], "Embedding: index 10 at position (0, 0) is outside [0, 10)"),
    ([[2, 1.5]], "Embedding: index 1.5 at position (0, 1) is not a whole number in [0, 10)"),
    ([[2], [np.nan]], "Embedding: index nan at position (1, 0) is not a whole number in [0, 10)"),
    ([[np.inf, 1]], "Embedding: index inf at position (0, 0) is not a whole number in [0, 10)"),
])
def test_embedding_indices_out_of_range(indices, message):
    embedding = ndl.nn.Embedding(10, 3)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$") as excinfo:
        embedding(ndl.Tensor(np.array(indices), requires_grad=False))
    assert_raised_in_needle(excinfo, "forward")
