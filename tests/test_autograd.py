"""Autograd: Tensor construction, gradient accumulation, detach and .data, no_grad, deep graphs, freeing the
graph by reference counting, user-defined ops and TensorTuple."""

import gc
import weakref

import numpy as np
import pytest

import needle as ndl
from needle import backend_ndarray as nd
from needle.autograd import TensorOp, TensorTupleOp
from needle.ops import softmax_cross_entropy
from conftest import ATOL, RTOL


def assert_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


# The Tensor constructor


def test_tensor_from_list_numpy_ndarray_and_tensor(device):
    a = np.arange(6.0).reshape(2, 3)  # float64 in, float32 stored
    for data in ([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], a, nd.array(a, device=device)):
        t = ndl.Tensor(data, device=device)
        assert t.shape == (2, 3) and t.dtype == "float32" and t.device == device
        assert t.requires_grad and t.is_leaf() and t.op is None and t.inputs == [] and t.grad is None
        np.testing.assert_array_equal(t.numpy(), a)
    u = ndl.Tensor(t)
    assert u.shape == (2, 3) and u.dtype == "float32" and u.device == device
    np.testing.assert_array_equal(u.numpy(), a)
    assert isinstance(t.realize_cached_data(), nd.NDArray) and t.cached_data is t.realize_cached_data()


def test_tensor_copies_numpy_and_ndarray_data():
    a = np.ones(3, dtype=np.float32)
    x = nd.array([1.0, 2.0, 3.0])
    t, u = ndl.Tensor(a), ndl.Tensor(x)
    a[0] = 5.0
    x.fill(0.0)
    np.testing.assert_array_equal(t.numpy(), [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(u.numpy(), [1.0, 2.0, 3.0])
    t.numpy()[0] = 9.0  # numpy() is a copy too
    assert t.numpy()[0] == 1.0


def test_tensor_defaults_and_float64():
    t = ndl.Tensor(3.0)
    assert t.shape == () and t.dtype == "float32" and t.device == ndl.cpu()
    d = ndl.Tensor(np.random.randn(2, 2), dtype="float64")
    assert d.dtype == "float64"
    assert (d * 2.0 + d).dtype == "float64"
    assert ndl.Tensor(d).dtype == "float64"  # a Tensor's own dtype is kept
    assert ndl.Tensor(d, dtype="float32").dtype == "float32"
    assert not ndl.Tensor([1.0], requires_grad=False).requires_grad


def test_tensor_on_another_device_is_a_copy_there():
    t = ndl.Tensor([1.0, 2.0])
    u = ndl.Tensor(t, device=ndl.cpu_numpy())
    assert u.device == ndl.cpu_numpy() and t.device == ndl.cpu()
    np.testing.assert_array_equal(u.numpy(), [1.0, 2.0])
    assert ndl.Tensor(nd.array([1.0], device=ndl.cpu_numpy())).device == ndl.cpu_numpy()  # the NDArray's device
    assert t.to(ndl.cpu()) is t and t.to(ndl.cpu_numpy()).device == ndl.cpu_numpy()
    with pytest.raises(ValueError, match="cpu_numpy"):
        t + u


# Gradients: summed over uses, accumulated over backward calls


def test_gradients_sum_over_several_uses():
    a = np.random.randn(3, 4).astype(np.float32)
    x = ndl.Tensor(a)
    y = x * x + x + ndl.exp(x) * 2.0
    y.backward()
    assert_close(x.grad.numpy(), 2 * a + 1 + 2 * np.exp(a))


def test_a_gradient_handed_to_two_inputs_is_not_changed_by_summing_others_into_one():
    # backward reaches u + v first (it was made last): add hands one gradient tensor to both u and v. u then
    # receives three more (from u * u twice and u * 5), summed into a running sum of its own, partly in
    # place: v's gradient, the tensor u got first, must stay as it was
    a, b = np.random.randn(3, 4), np.random.randn(3, 4)
    x, y = ndl.Tensor(a), ndl.Tensor(b)
    u, v = x * 2.0, y * 3.0
    m = u * 5.0 + u * u
    (m + (u + v)).sum().backward()
    assert_close(x.grad.numpy(), 2.0 * (5.0 + 2.0 * 2.0 * a + 1.0))
    assert_close(y.grad.numpy(), np.full((3, 4), 3.0))


def test_gradients_sum_over_a_broadcast_use():
    x = ndl.Tensor(np.random.randn(1, 4))
    (x + ndl.broadcast_to(x, (3, 4))).sum().backward()
    assert_close(x.grad.numpy(), np.full((1, 4), 6.0))  # 3 rows through add, 3 through broadcast_to


def test_grad_accumulates_across_backward_calls():
    a = np.random.randn(5).astype(np.float32)
    x = ndl.Tensor(a)
    (x * 3.0).sum().backward()
    (x * x).sum().backward()
    assert_close(x.grad.numpy(), 3.0 + 2 * a)
    x.grad = None  # what an optimiser's reset_grad does
    (x * 3.0).sum().backward()
    assert_close(x.grad.numpy(), np.full(5, 3.0))


def test_backward_with_an_explicit_out_grad():
    a = np.random.randn(2, 3).astype(np.float32)
    g = np.random.randn(2, 3).astype(np.float32)
    x = ndl.Tensor(a)
    ndl.tanh(x).backward(ndl.Tensor(g, requires_grad=False))
    assert_close(x.grad.numpy(), g * (1 - np.tanh(a) ** 2))
    z = ndl.Tensor(a)
    (z * 2.0).backward(g)  # numpy is accepted too
    assert_close(z.grad.numpy(), 2.0 * g)
    with pytest.raises(ValueError, match=r"backward.*\(2, 3\)"):
        (z * 2.0).backward(ndl.Tensor(np.ones((3, 2))))


def test_backward_of_a_leaf_and_of_a_scalar():
    x = ndl.Tensor([1.0, 2.0])
    x.backward()
    np.testing.assert_array_equal(x.grad.numpy(), [1.0, 1.0])
    s = ndl.Tensor(3.0)
    (s * s).backward()
    assert s.grad.numpy() == 6.0


def test_only_tensors_that_require_grad_get_one():
    x = ndl.Tensor([1.0, 2.0])
    c = ndl.Tensor([3.0, 4.0], requires_grad=False)
    y = x * c
    assert y.requires_grad and not (c * c).requires_grad and (c * c).op is None
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 4.0])
    assert c.grad is None


def test_grad_holds_no_graph():
    x = ndl.Tensor(np.random.randn(3, 3))
    (ndl.tanh(x @ x) * 2.0).sum().backward()
    (x * x).sum().backward()  # accumulated too
    assert x.grad.op is None and x.grad.inputs == [] and not x.grad.requires_grad
    assert x.grad.is_leaf() and isinstance(x.grad, ndl.Tensor)


# detach and .data


def test_detach_stops_gradients():
    a = np.random.randn(4).astype(np.float32)
    x = ndl.Tensor(a)
    d = x.detach()
    assert not d.requires_grad and d.op is None and d.inputs == []
    np.testing.assert_array_equal(d.numpy(), a)
    (x.detach() * x).sum().backward()
    assert_close(x.grad.numpy(), a)
    h = x * 2.0
    assert h.detach().op is None and h.op is not None


def test_data_gets_a_detached_tensor_and_sets_values():
    x = ndl.Tensor([1.0, 2.0])
    y = x * 3.0
    assert not y.data.requires_grad and y.data.op is None
    np.testing.assert_array_equal(y.data.numpy(), [3.0, 6.0])
    x.data = ndl.Tensor([5.0, 7.0])
    assert x.requires_grad and x.is_leaf()
    np.testing.assert_array_equal(x.numpy(), [5.0, 7.0])
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [10.0, 14.0])
    x.data = x.data - x.grad * 0.5  # an SGD step, building no graph on x
    assert x.is_leaf() and x.inputs == []
    np.testing.assert_array_equal(x.numpy(), [0.0, 0.0])
    with pytest.raises(ValueError, match="shape"):
        x.data = ndl.Tensor([1.0, 2.0, 3.0])
    with pytest.raises(TypeError):
        x.data = np.zeros(2)


# no_grad


def _assert_no_graph(t):
    assert t.requires_grad is False and t.op is None and t.inputs == []


def test_no_grad_context_manager():
    x = ndl.Tensor([1.0, 2.0])
    assert ndl.is_grad_enabled()
    with ndl.no_grad():
        assert not ndl.is_grad_enabled()
        y = ndl.tanh(x * 2.0) + x
        parts = ndl.split(ndl.stack([x, x], 0), 0)
    assert ndl.is_grad_enabled()
    _assert_no_graph(y)
    _assert_no_graph(parts)
    np.testing.assert_allclose(y.numpy(), np.tanh([2.0, 4.0]) + [1.0, 2.0], rtol=1e-6)
    assert (x * 2.0).requires_grad


def test_no_grad_nests_and_restores_after_an_exception():
    with ndl.no_grad():
        with ndl.no_grad():
            pass
        assert not ndl.is_grad_enabled()
    assert ndl.is_grad_enabled()
    with pytest.raises(RuntimeError):
        with ndl.no_grad():
            raise RuntimeError("inside")
    assert ndl.is_grad_enabled()


@pytest.mark.parametrize("decorate", [ndl.no_grad(), ndl.no_grad], ids=["no_grad()", "no_grad"])
def test_no_grad_decorators(decorate):
    @decorate
    def step(t, scale=2.0):
        """Doc."""
        assert not ndl.is_grad_enabled()
        return t * scale

    x = ndl.Tensor([1.0])
    y = step(x, scale=3.0)
    _assert_no_graph(y)
    np.testing.assert_array_equal(y.numpy(), [3.0])
    assert ndl.is_grad_enabled() and step.__name__ == "step" and step.__doc__ == "Doc."


# Deep graphs and freeing them


def test_backward_through_a_100000_node_chain():
    x = ndl.Tensor(np.ones(2))
    y = ndl.mul_scalar(x, 1.00001)
    first = weakref.ref(y)  # the deepest node, kept alive only by the chain above it
    for _ in range(100_000 - 1):
        y = ndl.mul_scalar(y, 1.00001)
    y.sum().backward()
    # each step multiplies the gradient by float32(1.00001)
    expected = np.float64(np.float32(1.00001)) ** 100_000
    np.testing.assert_allclose(x.grad.numpy(), [expected, expected], rtol=1e-3)
    np.testing.assert_allclose(y.numpy(), [expected, expected], rtol=1e-3)
    del y  # freeing 100,000 nested nodes must not overflow the C stack
    assert first() is None


def test_a_deep_chain_of_add_and_multiply():
    x = ndl.Tensor([2.0])
    y = x
    for _ in range(20_000):
        y = y * 1.0 + 0.0
    y.backward()
    np.testing.assert_array_equal(x.grad.numpy(), [1.0])


def test_the_graph_is_freed_by_reference_counting_alone():
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        x = ndl.Tensor(np.random.randn(4, 3))
        w = ndl.Tensor(np.random.randn(3, 5))
        h = ndl.tanh(x @ w)
        parts = ndl.split(h, 0)
        mixed = ndl.stack([parts[0], parts[2]], 1)
        loss = (ndl.logsumexp(mixed, axes=(0,)).sum() + ndl.logsoftmax(h).sum()
                + softmax_cross_entropy(h, ndl.Tensor([0, 1, 2, 4], requires_grad=False)))
        refs = [weakref.ref(t) for t in (h, parts, mixed)]
        del h, parts, mixed
        loss.backward()
        assert all(r() is not None for r in refs)  # still held by loss
        del loss
        assert all(r() is None for r in refs)
        assert x.grad.op is None and w.grad.op is None
    finally:
        if was_enabled:
            gc.enable()


# User-defined ops


class Cube(TensorOp):
    """a ** 3, from outside needle."""

    def compute(self, a):
        return a * a * a

    def gradient(self, out_grad, node):
        a = node.inputs[0]
        return out_grad * a * a * 3.0


class SumAndDifference(TensorTupleOp):
    """(a + b, a - b) as one tuple op."""

    def compute(self, a, b):
        return a + b, a - b

    def gradient(self, out_grad, node):
        g_sum, g_diff = out_grad.tuple()
        return g_sum + g_diff, g_sum - g_diff


def test_a_user_defined_tensor_op():
    a = np.random.randn(3).astype(np.float32)
    x = ndl.Tensor(a)
    y = Cube()(x)
    assert isinstance(y, ndl.Tensor) and isinstance(y.op, Cube) and y.inputs == [x]
    assert_close(y.numpy(), a ** 3)
    (y * 2.0).sum().backward()
    assert_close(x.grad.numpy(), 6 * a ** 2)
    assert Cube().gradient_as_tuple(ndl.Tensor(np.ones(3)), y)[0].shape == (3,)


def test_a_user_defined_tuple_op():
    a, b = ndl.Tensor([1.0, 2.0]), ndl.Tensor([3.0, 5.0])
    out = SumAndDifference()(a, b)
    assert isinstance(out, ndl.TensorTuple) and len(out) == 2
    (out[0] * 2.0 + out[1] * 3.0).sum().backward()
    np.testing.assert_array_equal(a.grad.numpy(), [5.0, 5.0])
    np.testing.assert_array_equal(b.grad.numpy(), [-1.0, -1.0])
    c = ndl.Tensor([1.0, 1.0])
    SumAndDifference()(c, c)[1].sum().backward()  # one output used; c is both inputs
    np.testing.assert_array_equal(c.grad.numpy(), [0.0, 0.0])


# TensorTuple


def test_tensor_tuple_len_indexing_tuple_and_detach():
    a, b, c = (ndl.Tensor(np.full(2, v)) for v in (1.0, 2.0, 3.0))
    t = ndl.make_tuple(a, b, c)
    assert isinstance(t, ndl.TensorTuple) and len(t) == 3
    np.testing.assert_array_equal(t[1].numpy(), [2.0, 2.0])
    np.testing.assert_array_equal(t[-1].numpy(), [3.0, 3.0])
    assert [p.numpy()[0] for p in t.tuple()] == [1.0, 2.0, 3.0]
    assert [p.numpy()[0] for p in t] == [1.0, 2.0, 3.0]
    assert isinstance(t.tuple(), tuple)
    d = t.detach()
    assert isinstance(d, ndl.TensorTuple) and d.op is None and not d.requires_grad and len(d) == 3
    assert not d[0].requires_grad
    with pytest.raises(IndexError):
        t[3]
    (t[0] * 1.0 + t[2] * 2.0 + ndl.tuple_get_item(t, 0)).sum().backward()
    np.testing.assert_array_equal(a.grad.numpy(), [2.0, 2.0])
    assert b.grad is None or (b.grad.numpy() == 0).all()
    np.testing.assert_array_equal(c.grad.numpy(), [2.0, 2.0])


def test_split_outputs_used_twice_and_unused():
    x = ndl.Tensor(np.arange(6.0).reshape(3, 2))
    parts = ndl.split(x, 0)
    (parts[1] * parts[1] + parts[1]).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[0, 0], [2 * 2 + 1, 2 * 3 + 1], [0, 0]])


# ---- the per-op fast paths agree with the general ones ------------------------------------------------------

def test_an_input_that_needs_no_gradient_gets_none_and_the_rest_are_unchanged():
    a, w = np.random.randn(4, 3), np.random.randn(3, 2)
    w_grads = []
    for x_grad in (True, False):
        x, W, c = ndl.Tensor(a, requires_grad=x_grad), ndl.Tensor(w), ndl.Tensor(a @ w, requires_grad=x_grad)
        ((x @ W) * c / (c * c + 3.0)).sum().backward()
        assert (x.grad is not None) == x_grad and (c.grad is not None) == x_grad
        w_grads.append(W.grad.numpy())
    assert_close(w_grads[0], w_grads[1])
    y = ndl.Tensor(a, requires_grad=False) * ndl.Tensor(a, requires_grad=False)
    assert y.op is None and y.inputs == [] and not y.requires_grad


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ops_on_views_and_float64_agree_with_compact_copies(dtype):
    a = np.random.randn(5, 4)
    base = ndl.Tensor(a, dtype=dtype)
    view = ndl.ops.transpose(ndl.Tensor(a.T.copy(), dtype=dtype))  # strided, not compact
    other = ndl.Tensor(np.random.randn(5, 4), dtype=dtype)
    for x in (base, view):
        y = (x * other + 2.0) / (other * other + 1.0)
        assert y.dtype == dtype and y.cached_data.is_compact()
        assert_close(y.numpy(), (a * other.numpy() + 2.0) / (other.numpy() ** 2 + 1.0))
        y.sum().backward()
    assert_close(base.grad.numpy(), 1.0 / (other.numpy() ** 2 + 1.0) * other.numpy())
    assert base.grad.dtype == dtype and base.grad.op is None and base.grad.inputs == []


def test_a_node_takes_attributes_beside_its_slots():
    x = ndl.Tensor([1.0, 2.0])
    x.note = "kept"
    y = x * x
    y.note = 3
    assert x.note == "kept" and y.note == 3 and x.grad is None
