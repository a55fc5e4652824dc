"""Every op against torch: the forward pass (and numpy's where natural) and each input's gradient under a
random upstream gradient, on several shapes, broadcasting and saturating inputs; float64 gradcheck of every
op; and gradcheck's own behaviour."""

from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import needle as ndl
from needle.autograd import TensorOp
from needle.ops import softmax_cross_entropy
from needle.testing import GradcheckError, gradcheck
from conftest import ATOL, GRADCHECK, RTOL


def helper_test_op(inputs, needle_fn, torch_fn, numpy_fn=None, params=None, atol=ATOL, rtol=RTOL):
    """Run `needle_fn` and `torch_fn` on the same float32 inputs (numpy arrays); compare the outputs (and
    numpy_fn's, when given), then every input's gradient under one random upstream gradient."""
    params = params or {}
    ndl_inputs = [ndl.Tensor(x) for x in inputs]
    torch_inputs = [torch.tensor(x, requires_grad=True) for x in inputs]
    out = needle_fn(*ndl_inputs, **params)
    expected = torch_fn(*torch_inputs, **params)
    assert out.dtype == "float32"
    assert out.shape == tuple(expected.shape)
    np.testing.assert_allclose(out.numpy(), expected.detach().numpy(), rtol=rtol, atol=atol, err_msg="forward")
    if numpy_fn is not None:
        np.testing.assert_allclose(out.numpy(), numpy_fn(*inputs, **params), rtol=rtol, atol=atol,
                                   err_msg="forward against numpy")

    upstream = np.asarray(np.random.randn(*out.shape), dtype=np.float32)
    out.backward(ndl.Tensor(upstream, requires_grad=False))
    expected.backward(torch.tensor(upstream))
    for i, (x, t) in enumerate(zip(ndl_inputs, torch_inputs)):
        expected_grad = np.zeros(x.shape, np.float32) if t.grad is None else t.grad.numpy()
        assert x.grad is not None, f"input {i} got no gradient"
        assert x.grad.shape == x.shape and x.grad.dtype == "float32"
        np.testing.assert_allclose(x.grad.numpy(), expected_grad, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of input {i}")


# Inputs: each domain draws float32 values of one shape from numpy's global RNG

def _away_from_zero(shape):
    return np.random.choice([-1.0, 1.0], shape) * np.random.uniform(0.2, 2.0, shape)


DOMAINS = {
    "real": lambda shape: np.random.randn(*shape),
    "positive": lambda shape: np.random.uniform(0.5, 2.0, shape),
    "away_from_zero": _away_from_zero,  # relu's kink, division and reciprocals
    "wide": lambda shape: np.random.uniform(-10.0, 10.0, shape),
    "saturating": lambda shape: _away_from_zero(shape) * 25.0,  # |x| in [5, 50]
}


def draw_inputs(domains, shapes):
    domains = [domains] * len(shapes) if isinstance(domains, str) else domains
    return [np.asarray(DOMAINS[d](s), dtype=np.float32) for d, s in zip(domains, shapes)]


# The table: one row per op, one case per shape (plus keyword arguments given to all three functions)

Row = namedtuple("Row", "needle torch numpy domains cases")


def case(*shapes, **params):
    return shapes, params


BINARY_SHAPES = [case((3, 4), (3, 4)), case((2, 3, 4), (4,)), case((3, 1), (1, 4)), case((5,), (2, 1, 5)),
                 case((), (3,)), case((2, 1, 3), (4, 1))]
UNARY_SHAPES = [case((3, 4)), case((2, 3, 4)), case((5,)), case(())]
MATMUL_SHAPES = [case((3, 4), (4, 5)), case((2, 3, 4), (2, 4, 5)), case((2, 1, 3, 4), (5, 4, 2)),
                 case((3, 4), (2, 4, 5)), case((2, 3, 4), (4, 2)), case((1, 1), (1, 1))]
LOGSUMEXP_SHAPES = [case((3, 4), axes=None), case((3, 4), axes=1), case((2, 3, 4), axes=(0, 2)),
                    case((5,), axes=0), case((2, 3, 4), axes=-1)]
LOGSOFTMAX_SHAPES = [case((3, 4)), case((1, 5)), case((6, 2))]
CROSS_ENTROPY_SHAPES = [case((4, 5)), case((1, 3)), case((8, 10))]


def _labels(n, c):
    return (np.arange(n) * 7 + 3) % c


def _np_logsumexp(x, axes=None, keepdims=False):
    x = x.astype(np.float64)
    m = x.max(axis=axes, keepdims=True)
    out = np.log(np.exp(x - m).sum(axis=axes, keepdims=True)) + m
    return out if keepdims else out.reshape(np.sum(x, axis=axes).shape)


def _np_cross_entropy(logits):
    n, c = logits.shape
    log_probs = logits - _np_logsumexp(logits, axes=1, keepdims=True)
    return -log_probs[np.arange(n), _labels(n, c)].mean()


def _dilated_shape_and_index(shape, axes, dilation):
    axes = [a % len(shape) for a in axes]
    out_shape = tuple(d * (dilation + 1) if i in axes else d for i, d in enumerate(shape))
    return out_shape, tuple(slice(None, None, dilation + 1) if i in axes else slice(None) for i in range(len(shape)))


def _np_dilate(a, axes, dilation):
    """dilate built by hand: zeros, then every (dilation+1)-th entry along `axes` set from `a`."""
    shape, index = _dilated_shape_and_index(a.shape, axes, dilation)
    out = np.zeros(shape, a.dtype)
    out[index] = a
    return out


def _torch_dilate(a, axes, dilation):
    shape, index = _dilated_shape_and_index(tuple(a.shape), axes, dilation)
    out = a.new_zeros(shape)
    out[index] = a
    return out


def _undilate(a, axes, dilation):  # numpy and torch alike
    return a[_dilated_shape_and_index(tuple(a.shape), axes, dilation)[1]]


def _all_axes(axes, ndim):
    return tuple(range(ndim)) if axes is None else (axes,) if isinstance(axes, int) else axes


OPS = {
    # elementwise, broadcasting
    "add": Row(ndl.add, torch.add, np.add, "real", BINARY_SHAPES),
    "add_scalar": Row(lambda a: ndl.add_scalar(a, 2.5), lambda a: a + 2.5, lambda a: a + 2.5, "real", UNARY_SHAPES),
    "multiply": Row(ndl.multiply, torch.mul, np.multiply, "real", BINARY_SHAPES),
    "mul_scalar": Row(lambda a: ndl.mul_scalar(a, -1.5), lambda a: a * -1.5, lambda a: a * -1.5, "real",
                      UNARY_SHAPES),
    "divide": Row(ndl.divide, torch.div, np.divide, ("real", "away_from_zero"), BINARY_SHAPES),
    "divide_scalar": Row(lambda a: ndl.divide_scalar(a, 4.0), lambda a: a / 4.0, lambda a: a / 4.0, "real",
                         UNARY_SHAPES),
    "power": Row(ndl.power, torch.pow, np.power, ("positive", "real"), BINARY_SHAPES),
    "power_scalar": Row(lambda a: ndl.power_scalar(a, 3), lambda a: a ** 3, lambda a: a ** 3, "real", UNARY_SHAPES),
    "power_scalar_fractional": Row(lambda a: ndl.power_scalar(a, -1.5), lambda a: a ** -1.5, lambda a: a ** -1.5,
                                   "positive", UNARY_SHAPES),
    "negate": Row(ndl.negate, torch.neg, np.negative, "real", UNARY_SHAPES),
    "log": Row(ndl.log, torch.log, np.log, "positive", UNARY_SHAPES),
    "exp": Row(ndl.exp, torch.exp, np.exp, "real", UNARY_SHAPES),
    "exp_wide": Row(ndl.exp, torch.exp, np.exp, "wide", [case((3, 4))]),
    "relu": Row(ndl.relu, torch.relu, lambda a: np.maximum(a, 0.0), "away_from_zero", UNARY_SHAPES),
    "tanh": Row(ndl.tanh, torch.tanh, np.tanh, "real", UNARY_SHAPES),
    "tanh_saturating": Row(ndl.tanh, torch.tanh, np.tanh, "saturating", UNARY_SHAPES[:2]),
    "sigmoid": Row(ndl.sigmoid, torch.sigmoid, lambda a: 1 / (1 + np.exp(-a)), "real", UNARY_SHAPES),
    "sigmoid_saturating": Row(ndl.sigmoid, torch.sigmoid, lambda a: 1 / (1 + np.exp(-a.astype(np.float64))),
                              "saturating", UNARY_SHAPES[:2]),
    # linear algebra
    "matmul": Row(ndl.matmul, torch.matmul, np.matmul, "real", MATMUL_SHAPES),
    "affine": Row(ndl.ops.affine, lambda x, w, b: x @ w + b, lambda x, w, b: x @ w + b, "real",
                  [case((3, 4), (4, 5), (1, 5)), case((3, 4), (4, 5), (5,)), case((1, 1), (1, 1), (1, 1)),
                   case((6, 2), (2, 1), (1,))]),
    # reductions and shapes
    "summation": Row(lambda a, axes: ndl.summation(a, axes), lambda a, axes: a.sum(dim=_all_axes(axes, a.ndim)),
                     lambda a, axes: np.sum(a, axis=axes), "real",
                     [case((3, 4), axes=None), case((2, 3, 4), axes=1), case((2, 3, 4), axes=(0, 2)),
                      case((2, 3, 4), axes=-1), case((2, 3, 4), axes=(-1, -3)), case((5,), axes=0),
                      case((5,), axes=None)]),
    "broadcast_to": Row(ndl.broadcast_to, lambda a, shape: a.broadcast_to(shape), np.broadcast_to, "real",
                        [case((3, 1), shape=(2, 3, 4)), case((1,), shape=(5,)), case((4,), shape=(3, 4)),
                         case((), shape=(2, 2)), case((2, 1, 3), shape=(2, 4, 3))]),
    "reshape": Row(ndl.reshape, torch.reshape, np.reshape, "real",
                   [case((3, 4), shape=(4, 3)), case((2, 3, 4), shape=(6, -1)), case((6,), shape=(1, 2, 3)),
                    case((2, 3), shape=(-1,)), case((1,), shape=())]),
    "reshape_of_a_view": Row(lambda a: ndl.reshape(ndl.transpose(a), (-1,)), lambda a: a.transpose(-1, -2).reshape(-1),
                             lambda a: np.swapaxes(a, -1, -2).reshape(-1), "real", [case((3, 4)), case((2, 3, 4))]),
    "transpose": Row(ndl.transpose, lambda a, axes: a.transpose(*(axes or (-2, -1))),
                     lambda a, axes: np.swapaxes(a, *(axes or (-2, -1))), "real",
                     [case((3, 4), axes=None), case((2, 3, 4), axes=None), case((2, 3, 4), axes=(0, 2)),
                      case((2, 3, 4), axes=(-1, 0)), case((2, 3), axes=(1, 1))]),
    "flip": Row(ndl.flip, lambda a, axes: torch.flip(a, _all_axes(axes, a.ndim)), lambda a, axes: np.flip(a, axes),
                "real",
                [case((3, 4), axes=(0,)), case((2, 3, 4), axes=(0, 2)), case((5,), axes=None),
                 case((2, 3, 4), axes=-1)]),
    "stack": Row(lambda *ts, axis: ndl.stack(ts, axis), lambda *ts, axis: torch.stack(ts, axis),
                 lambda *xs, axis: np.stack(xs, axis), "real",
                 [case((3, 4), (3, 4), axis=0), case((3, 4), (3, 4), (3, 4), axis=1), case((3, 4), (3, 4), axis=2),
                  case((3, 4), (3, 4), axis=-1), case((2,), (2,), (2,), (2,), axis=-2), case((), (), axis=0),
                  case((2, 3), axis=1)]),
    # split's outputs stacked back in reverse order: every output carries a gradient
    "split": Row(lambda a, axis: ndl.stack(list(ndl.split(a, axis))[::-1], 0),
                 lambda a, axis: torch.stack(torch.unbind(a, axis)[::-1], 0),
                 lambda a, axis: np.flip(np.moveaxis(a, axis, 0), 0), "real",
                 [case((3, 4), axis=0), case((3, 4), axis=1), case((2, 3, 4), axis=-1), case((1, 2), axis=0)]),
    # only some outputs used: the others get zero gradients (the first and last coincide for size 1)
    "split_some_outputs": Row(lambda a, axis: ndl.split(a, axis)[0] * 2.0 + ndl.split(a, axis)[-1],
                              lambda a, axis: torch.unbind(a, axis)[0] * 2.0 + torch.unbind(a, axis)[-1],
                              lambda a, axis: np.take(a, 0, axis) * 2.0 + np.take(a, -1, axis), "real",
                              [case((3, 4), axis=0), case((2, 3, 4), axis=1), case((2, 3, 4), axis=-1),
                               case((1, 4), axis=0)]),
    "dilate": Row(ndl.dilate, _torch_dilate, _np_dilate, "real",
                  [case((3, 4), axes=(0,), dilation=1), case((2, 3), axes=(0, 1), dilation=2),
                   case((3,), axes=(0,), dilation=0), case((2, 3, 2), axes=(1, -1), dilation=1)]),
    "undilate": Row(ndl.undilate, _undilate, _undilate, "real",
                    [case((6, 4), axes=(0,), dilation=1), case((6, 9), axes=(0, 1), dilation=2),
                     case((3,), axes=(0,), dilation=0), case((2, 4, 2), axes=(1, -1), dilation=1)]),
    # log-domain
    "logsumexp": Row(ndl.logsumexp, lambda a, axes: torch.logsumexp(a, _all_axes(axes, a.ndim)), _np_logsumexp,
                     "real", LOGSUMEXP_SHAPES),
    "logsumexp_saturating": Row(ndl.logsumexp, lambda a, axes: torch.logsumexp(a, _all_axes(axes, a.ndim)),
                                _np_logsumexp, "saturating", LOGSUMEXP_SHAPES),
    # the upstream gradient reaches logsumexp as a strided view: summation's broadcast, a transpose
    "logsumexp_then_sum": Row(lambda a: ndl.summation(ndl.logsumexp(a, axes=(1,))),
                              lambda a: torch.logsumexp(a, 1).sum(), lambda a: _np_logsumexp(a, 1).sum(), "real",
                              [case((3, 4)), case((2, 3, 4))]),
    "logsumexp_then_transpose": Row(lambda a: ndl.transpose(ndl.logsumexp(a, axes=(0,))),
                                    lambda a: torch.logsumexp(a, 0).transpose(0, 1),
                                    lambda a: _np_logsumexp(a, 0).T, "real", [case((2, 3, 4))]),
    "logsoftmax": Row(ndl.logsoftmax, lambda a: torch.log_softmax(a, dim=-1),
                      lambda a: a - _np_logsumexp(a, -1, keepdims=True), "real", LOGSOFTMAX_SHAPES),
    "logsoftmax_saturating": Row(ndl.logsoftmax, lambda a: torch.log_softmax(a, dim=-1),
                                 lambda a: a - _np_logsumexp(a, -1, keepdims=True), "saturating", LOGSOFTMAX_SHAPES),
    "softmax_cross_entropy": Row(
        lambda a: softmax_cross_entropy(a, ndl.Tensor(_labels(*a.shape), requires_grad=False)),
        lambda a: F.cross_entropy(a, torch.tensor(_labels(*a.shape))), _np_cross_entropy, "real",
        CROSS_ENTROPY_SHAPES),
    "softmax_cross_entropy_saturating": Row(
        lambda a: softmax_cross_entropy(a, ndl.Tensor(_labels(*a.shape), requires_grad=False)),
        lambda a: F.cross_entropy(a, torch.tensor(_labels(*a.shape))), _np_cross_entropy, "saturating",
        CROSS_ENTROPY_SHAPES),
    # Tensor operators: one lambda serves needle, torch and numpy
    "operator_add": Row(*[lambda a, b: a + b] * 3, "real", BINARY_SHAPES[:3]),
    "operator_sub": Row(*[lambda a, b: a - b] * 3, "real", BINARY_SHAPES[:3]),
    "operator_mul": Row(*[lambda a, b: a * b] * 3, "real", BINARY_SHAPES[:3]),
    "operator_div": Row(*[lambda a, b: a / b] * 3, ("real", "away_from_zero"), BINARY_SHAPES[:3]),
    "operator_pow": Row(*[lambda a, b: a ** b] * 3, ("positive", "real"), BINARY_SHAPES[:3]),
    "operator_pow_scalar": Row(*[lambda a: a ** 2] * 3, "real", UNARY_SHAPES[:2]),
    "operator_matmul": Row(*[lambda a, b: a @ b] * 3, "real", MATMUL_SHAPES[:3]),
    "operator_neg": Row(*[lambda a: -a] * 3, "real", UNARY_SHAPES[:2]),
    "operator_scalars": Row(*[lambda a: (a + 1.5) * 2.0 - 0.5 / 4.0] * 3, "real", UNARY_SHAPES[:2]),
    "operator_reflected": Row(*[lambda a: 2.0 + 3.0 * a + (2.0 - a) + 3.0 / a] * 3, "away_from_zero",
                              UNARY_SHAPES[:2]),
    "operator_numpy_scalar": Row(*[lambda a: a * np.float64(1.5) + np.float64(0.5) - a / np.sqrt(4.0)] * 3, "real",
                                 UNARY_SHAPES[:2]),
    "operator_expression": Row(lambda a, b: ((a * b - a / (b * b + 1.0)) ** 2) @ (b - 1.0).transpose(),
                               lambda a, b: ((a * b - a / (b * b + 1.0)) ** 2) @ (b - 1.0).transpose(-1, -2), None,
                               "real", [case((3, 4), (3, 4)), case((2, 3, 4), (3, 4))]),
}

CASES = [pytest.param(name, shapes, params, id=f"{name}-{','.join(map(str, shapes))}"
                      + "".join(f"-{k}={v}" for k, v in params.items()))
         for name, row in OPS.items() for shapes, params in row.cases]


@pytest.mark.parametrize("name, shapes, params", CASES)
def test_op_against_torch(name, shapes, params):
    row = OPS[name]
    helper_test_op(draw_inputs(row.domains, shapes), row.needle, row.torch, row.numpy, params)


@pytest.mark.parametrize("name, shapes, params", CASES)
def test_op_gradcheck_float64(name, shapes, params):
    row = OPS[name]
    inputs = [ndl.Tensor(x, dtype="float64") for x in draw_inputs(row.domains, shapes)]
    assert row.needle(*inputs, **params).dtype == "float64"
    assert gradcheck(lambda *ts: row.needle(*ts, **params), *inputs, **GRADCHECK)


# Hypothesis: random shapes and axes through the same helper

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=4).map(tuple)


@st.composite
def broadcast_pairs(draw):
    """Two shapes that broadcast: the second drops leading axes and sets some axes of the first to 1."""
    shape = draw(shapes)
    other = tuple(1 if draw(st.booleans()) else d for d in shape[draw(st.integers(0, len(shape))):])
    return (shape, other) if draw(st.booleans()) else (other, shape)


@settings(deadline=None, max_examples=30)
@given(pair=broadcast_pairs(), name=st.sampled_from(["add", "multiply", "divide", "power"]))
def test_hypothesis_broadcasting_gradients(pair, name):
    row = OPS[name]
    helper_test_op(draw_inputs(row.domains, pair), row.needle, row.torch, row.numpy)


@settings(deadline=None, max_examples=30)
@given(data=st.data(), shape=shapes)
def test_hypothesis_summation_and_logsumexp_axes(data, shape):
    axes = tuple(data.draw(st.lists(st.integers(-len(shape), len(shape) - 1), unique_by=lambda a: a % len(shape))
                           if shape else st.just([])))
    for name in ("summation", "logsumexp"):
        row = OPS[name]
        helper_test_op(draw_inputs("real", [shape]), row.needle, row.torch, row.numpy,
                       dict(axes=axes if axes else None))


@settings(deadline=None, max_examples=30)
@given(data=st.data(), shape=shapes.filter(lambda s: len(s) >= 2))
def test_hypothesis_transpose_then_reshape(data, shape):
    i, j = data.draw(st.integers(0, len(shape) - 1)), data.draw(st.integers(-len(shape), -1))
    target = data.draw(st.sampled_from([(-1,), (shape[0], -1), (-1, shape[-1]), shape[::-1]]))
    helper_test_op(draw_inputs("real", [shape]),
                   lambda a: ndl.reshape(ndl.transpose(a, (i, j)), target) * 2.0,
                   lambda a: a.transpose(i, j).reshape(target) * 2.0)


def test_every_public_op_has_a_row():
    core = ndl.ops.ops_mathematic.__all__ + ndl.ops.ops_logarithmic.__all__
    names = {name for name in core if name[0].islower()}
    names -= {"make_tuple", "tuple_get_item"}  # tested through split and in test_autograd
    assert names <= set(OPS)


# Ops that return several tensors, and forward values beyond the table


def test_split_gives_a_tensor_tuple_of_slices():
    a = np.random.randn(2, 3, 4).astype(np.float32)
    parts = ndl.split(ndl.Tensor(a), 1)
    assert isinstance(parts, ndl.TensorTuple) and len(parts) == 3
    for i, part in enumerate(parts):
        assert part.shape == (2, 4)
        np.testing.assert_array_equal(part.numpy(), a[:, i, :])
    np.testing.assert_array_equal(ndl.stack(parts, 1).numpy(), a)  # stack takes the TensorTuple itself


def test_dilate_puts_zeros_after_every_element():
    a = ndl.Tensor([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(ndl.dilate(a, (0,), 1).numpy(), [[1, 2], [0, 0], [3, 4], [0, 0]])
    np.testing.assert_array_equal(ndl.dilate(a, (1,), 2).numpy(), [[1, 0, 0, 2, 0, 0], [3, 0, 0, 4, 0, 0]])
    d = ndl.dilate(a, (0, 1), 1)
    assert d.shape == (4, 4)
    np.testing.assert_array_equal(ndl.undilate(d, (0, 1), 1).numpy(), a.numpy())


def test_logsumexp_and_logsoftmax_stay_finite_at_extremes():
    x = np.array([[1000.0, 1000.0, -1000.0], [-1000.0, -1000.0, -1000.0]], np.float32)
    np.testing.assert_allclose(ndl.logsumexp(ndl.Tensor(x), axes=(1,)).numpy(), [1000 + np.log(2), -1000 + np.log(3)],
                               rtol=1e-6)
    out = ndl.logsoftmax(ndl.Tensor(x)).numpy()
    np.testing.assert_allclose(out, torch.log_softmax(torch.tensor(x), -1).numpy(), rtol=1e-6)
    loss = softmax_cross_entropy(ndl.Tensor(x), ndl.Tensor([0, 2])).numpy()
    np.testing.assert_allclose(loss, F.cross_entropy(torch.tensor(x), torch.tensor([0, 2])).numpy(), rtol=1e-6)
    assert np.isfinite(ndl.sigmoid(ndl.Tensor(x)).numpy()).all()


def test_relu_gradient_is_zero_below_zero():
    x = ndl.Tensor([-2.0, -0.5, 0.5, 3.0])
    ndl.relu(x).backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0.0, 0.0, 1.0, 1.0])


# gradcheck itself


class _WrongSquare(TensorOp):
    """a * a with a gradient missing its factor 2."""

    def compute(self, a):
        return a * a

    def gradient(self, out_grad, node):
        return out_grad * node.inputs[0]


class _WrongSecondInput(TensorOp):
    """a * b with b's gradient negated."""

    def compute(self, a, b):
        return a * b

    def gradient(self, out_grad, node):
        a, b = node.inputs
        return out_grad * b, -(out_grad * a)


def test_gradcheck_passes_a_correct_op_and_leaves_inputs_alone():
    x = ndl.Tensor(np.random.randn(3, 2), dtype="float64")
    before = x.numpy()
    x.grad = ndl.Tensor(np.ones((3, 2)), dtype="float64", requires_grad=False)
    assert gradcheck(lambda t: ndl.tanh(t) * t, x, **GRADCHECK) is True
    np.testing.assert_array_equal(x.numpy(), before)
    np.testing.assert_array_equal(x.grad.numpy(), np.ones((3, 2)))  # its .grad is restored


def test_gradcheck_raises_naming_input_index_and_values():
    x = ndl.Tensor(np.random.randn(2, 3) + 3.0, dtype="float64")
    with pytest.raises(GradcheckError) as excinfo:
        gradcheck(lambda t: _WrongSquare()(t), x, **GRADCHECK)
    message = str(excinfo.value)
    assert isinstance(excinfo.value, AssertionError)
    assert "input 0" in message and "index (" in message
    assert "backward" in message and "numeric" in message
    worst = tuple(int(i) for i in message.split("index (")[1].split(")")[0].split(","))
    assert len(worst) == 2 and all(0 <= i < d for i, d in zip(worst, x.shape))


def test_gradcheck_names_the_input_that_is_wrong():
    a = ndl.Tensor(np.random.randn(4), dtype="float64")
    b = ndl.Tensor(np.random.randn(4), dtype="float64")
    with pytest.raises(GradcheckError, match="input 1"):
        gradcheck(lambda s, t: _WrongSecondInput()(s, t), a, b, **GRADCHECK)


def test_gradcheck_returns_false_without_raising():
    x = ndl.Tensor(np.random.randn(3) + 3.0, dtype="float64")
    assert gradcheck(lambda t: _WrongSquare()(t), x, raise_exception=False, **GRADCHECK) is False


def test_gradcheck_float32_defaults():
    x = ndl.Tensor(np.random.randn(3, 3))
    assert gradcheck(lambda t: ndl.logsoftmax(t * 2.0), x)
    with pytest.raises(GradcheckError):
        gradcheck(lambda t: _WrongSquare()(t + 3.0), x)
