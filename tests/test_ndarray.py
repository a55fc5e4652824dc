"""NDArray: construction copies, views share memory with the right strides, arithmetic and reductions
match numpy (also on non-contiguous views), and the devices."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import needle as ndl
from needle import backend_ndarray as nd
from conftest import ATOL, RTOL


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    assert actual.shape == np.shape(expected)
    np.testing.assert_allclose(actual.numpy(), expected, rtol=rtol, atol=atol)


def pair(*shape, device=None):
    """A random float32 numpy array and an NDArray copy of it."""
    a = np.random.randn(*shape).astype(np.float32)
    return a, nd.array(a, device=device)


# Construction: always a copy, float32 unless float64 is asked for


def test_array_from_numpy_copies_and_defaults_to_float32(device):
    a = np.arange(6.0).reshape(2, 3)  # float64 in, float32 stored
    x = nd.array(a, device=device)
    a[0, 0] = 100.0
    assert x.dtype == "float32" and x.device == device
    assert x.shape == (2, 3) and x.strides == (3, 1) and x.offset == 0
    assert x.ndim == 2 and x.size == 6 and len(x) == 2
    assert x.is_compact()
    np.testing.assert_array_equal(x.numpy(), np.arange(6.0).reshape(2, 3))


def test_array_from_list_and_from_ints_and_bools():
    x = nd.array([[1, 2], [3, 4]])
    assert x.shape == (2, 2) and x.dtype == "float32"
    np.testing.assert_array_equal(x.numpy(), [[1.0, 2.0], [3.0, 4.0]])
    y = nd.array([True, False])
    np.testing.assert_array_equal(y.numpy(), [1.0, 0.0])
    assert nd.array(3.5).shape == ()


def test_array_from_ndarray_copies(device):
    x = nd.array([1.0, 2.0, 3.0], device=device)
    for y in (nd.array(x), nd.NDArray(x)):
        y.fill(7.0)
        np.testing.assert_array_equal(x.numpy(), [1.0, 2.0, 3.0])
        assert y.device == device


def test_numpy_returns_a_copy():
    x = nd.array([1.0, 2.0])
    x.numpy()[0] = 5.0
    np.testing.assert_array_equal(x.numpy(), [1.0, 2.0])


def test_float64_is_allowed_and_kept():
    a = np.random.randn(3, 2)
    for dtype in ("float64", np.float64):
        x = nd.array(a, dtype=dtype)
        assert x.dtype == "float64"
        np.testing.assert_array_equal(x.numpy(), a)
    x = nd.array(a, dtype="float64")
    assert (x + 1.0).dtype == "float64" and (x @ x.permute((1, 0))).dtype == "float64"
    assert nd.NDArray(x).dtype == "float64"  # a copy keeps the dtype
    assert nd.array(x).dtype == "float32"  # array()'s dtype defaults to float32


def test_other_dtypes_are_refused():
    with pytest.raises(ValueError, match="dtype"):
        nd.array([1.0], dtype="int32")


def test_empty_full_and_fill(device):
    assert nd.empty((2, 3), device=device).shape == (2, 3)
    x = nd.full((2, 3), 1.5, device=device)
    np.testing.assert_array_equal(x.numpy(), np.full((2, 3), 1.5))
    x.fill(-2.0)
    np.testing.assert_array_equal(x.numpy(), np.full((2, 3), -2.0))
    assert nd.full((4,), 0.0, dtype="float64").dtype == "float64"


def test_to_same_device_is_self_and_to_another_copies():
    x = nd.array([1.0, 2.0])
    assert x.to(ndl.cpu()) is x
    y = x.to(ndl.cpu_numpy())
    assert y.device == ndl.cpu_numpy()
    y.fill(0.0)
    np.testing.assert_array_equal(x.numpy(), [1.0, 2.0])


def test_device_helpers():
    dev = ndl.cpu()
    assert dev.randn(2, 3).shape == (2, 3) and dev.randn(2, 3).dtype == "float32"
    r = dev.rand(100).numpy()
    assert ((0.0 <= r) & (r < 1.0)).all()
    np.testing.assert_array_equal(dev.one_hot(4, [1, 3]).numpy(), np.eye(4)[[1, 3]])
    assert dev.empty((3,)).shape == (3,)
    np.testing.assert_array_equal(dev.full((2,), 4.0).numpy(), [4.0, 4.0])


# Devices


def test_device_repr_and_equality():
    assert repr(ndl.cpu()) == "cpu()"
    assert repr(ndl.cpu_numpy()) == "cpu_numpy()"
    assert ndl.cpu() == nd.BackendDevice("cpu", None)
    assert hash(ndl.cpu()) == hash(nd.BackendDevice("cpu", None))
    assert ndl.cpu() != ndl.cpu_numpy()
    assert ndl.cpu() != "cpu"
    assert nd.default_device() == ndl.cpu() and ndl.cpu is nd.cpu


def test_cuda_exists_and_says_whether_it_runs():
    cuda = ndl.cuda()  # never raises, GPU or not
    assert repr(cuda) == "cuda()"
    if cuda.enabled():
        pytest.skip("a CUDA device is available here")
    assert cuda.enabled() is False
    with pytest.raises(ValueError, match="cuda"):
        nd.array([1.0], device=cuda)


def test_all_devices():
    devices = nd.all_devices()
    assert ndl.cpu() in devices and ndl.cpu_numpy() in devices and ndl.cuda() in devices
    assert all(isinstance(d, nd.BackendDevice) for d in devices)
    assert ndl.all_devices() == devices


# Views: share the buffer, with the right strides and offset


def test_reshape_is_a_view(device):
    x = nd.array(np.arange(12.0), device=device)
    y = x.reshape((3, 4))
    assert y.shape == (3, 4) and y.strides == (4, 1) and y.offset == 0
    z = x.reshape((2, -1, 3))
    assert z.shape == (2, 2, 3) and z.strides == (6, 3, 1)
    x[5] = 100.0
    assert y.numpy()[1, 1] == 100.0 and z.numpy()[0, 1, 2] == 100.0
    y[2, 3] = -1.0
    assert x.numpy()[11] == -1.0


def test_views_of_a_computed_array_share_its_buffer(device):
    # an array made by arithmetic wraps the backend's result and makes its flat buffer and strides on first
    # use: its views must still be views of that memory, with the layout of any other array's
    x = nd.array(np.arange(12.0), device=device) + 0.0
    assert x.strides == (1,) and x.offset == 0 and x.is_compact()
    y = x.reshape((3, 4))
    z = y.permute((1, 0))
    w = x[2:8:2]
    assert y.strides == (4, 1) and z.strides == (1, 4) and (w.shape, w.strides, w.offset) == ((3,), (2,), 2)
    y[1, 0] = 100.0
    assert x.numpy()[4] == 100.0 and z.numpy()[0, 1] == 100.0 and w.numpy()[1] == 100.0
    x.flat[11] = -1.0
    assert y.numpy()[2, 3] == -1.0 and z.numpy()[3, 2] == -1.0
    assert z.compact().is_compact() and not z.is_compact()


def test_reshape_refuses_a_non_compact_array():
    x = nd.array(np.arange(6.0).reshape(2, 3)).permute((1, 0))
    with pytest.raises(ValueError, match="reshape"):
        x.reshape((6,))
    np.testing.assert_array_equal(x.compact().reshape((6,)).numpy(), [0, 3, 1, 4, 2, 5])


def test_flat_is_a_view():
    x = nd.array(np.arange(6.0).reshape(2, 3))
    f = x.flat
    assert f.shape == (6,) and f.strides == (1,)
    x[1, 0] = 9.0
    assert f.numpy()[3] == 9.0


def test_permute_is_a_view(device):
    a, x = pair(2, 3, 4, device=device)
    y = x.permute((2, 0, 1))
    assert y.shape == (4, 2, 3) and y.strides == (1, 12, 4) and y.offset == 0
    assert_close(y, a.transpose(2, 0, 1))
    x[1, 2, 3] = 50.0
    assert y.numpy()[3, 1, 2] == 50.0
    y[0, 0, 0] = -50.0  # and back the other way
    assert x.numpy()[0, 0, 0] == -50.0


def test_broadcast_to_is_a_view_with_zero_strides(device):
    a, x = pair(3, 1, device=device)
    y = x.broadcast_to((2, 3, 4))
    assert y.shape == (2, 3, 4) and y.strides == (0, 1, 0)
    assert_close(y, np.broadcast_to(a, (2, 3, 4)))
    x[1, 0] = 8.0
    assert (y.numpy()[:, 1, :] == 8.0).all()
    assert not y.is_compact()


def test_slicing_is_a_view_keeping_ndim(device):
    a = np.arange(120.0, dtype=np.float32).reshape(4, 5, 6)
    x = nd.array(a, device=device)
    y = x[2, 1:5:2, :]
    assert y.shape == (1, 2, 6) and y.strides == (30, 12, 1) and y.offset == 66
    assert_close(y, a[2:3, 1:5:2, :])
    z = x[-1, -3:, ::4]
    assert z.shape == (1, 3, 2) and z.strides == (30, 6, 4) and z.offset == 3 * 30 + 2 * 6
    assert_close(z, a[-1:, -3:, ::4])
    assert_close(x[1:3], a[1:3])  # missing axes are whole
    assert x[3:1].shape == (0, 5, 6)
    assert x[4:, 5:].shape == (0, 0, 6) and x[4:, 5:].numpy().shape == (0, 0, 6)  # empty at the very end
    x[2, 3, 0] = -7.0
    assert y.numpy()[0, 1, 0] == -7.0


def test_slicing_errors():
    x = nd.array(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="step"):
        x[::-1]
    with pytest.raises(IndexError):
        x[2]
    with pytest.raises(ValueError):
        x[0, 0, 0]


def test_flip_is_a_view_with_negative_strides(device):
    a, x = pair(3, 4, device=device)
    y = x.flip((0, 1))
    assert y.strides == (-4, -1) and y.offset == 11
    assert_close(y, a[::-1, ::-1])
    assert_close(x.flip(1), a[:, ::-1])
    assert_close(x.flip(-2), a[::-1])
    x[0, 0] = 42.0
    assert y.numpy()[2, 3] == 42.0
    assert_close(y.compact(), np.flip(np.where(np.arange(12).reshape(3, 4) == 0, 42.0, a)))


def test_as_strided_is_a_view():
    a = np.arange(10.0, dtype=np.float32)
    x = nd.array(a)
    windows = x.as_strided((8, 3), (1, 1))
    assert windows.shape == (8, 3) and windows.strides == (1, 1)
    np.testing.assert_array_equal(windows.numpy(), np.lib.stride_tricks.sliding_window_view(a, 3))
    x[4] = -1.0
    assert windows.numpy()[2, 2] == -1.0 and windows.numpy()[4, 0] == -1.0
    with pytest.raises(ValueError):
        x.as_strided((2, 2), (1,))


def test_views_of_views_compose():
    a, x = pair(4, 6)
    y = x.permute((1, 0))[1:5:2, ::3].flip(1)
    expected = a.T[1:5:2, ::3][:, ::-1]
    assert_close(y, expected)
    assert_close(y.compact().reshape((4,)), expected.reshape(4))


def test_setitem_writes_arrays_and_scalars_through_views(device):
    a, x = pair(4, 5, device=device)
    a = a.copy()
    x[1:3, ::2] = 0.5
    a[1:3, ::2] = 0.5
    assert_close(x, a)
    b = np.random.randn(2, 3).astype(np.float32)
    x[0:4:2, 1:4] = nd.array(b, device=device)
    a[0:4:2, 1:4] = b
    assert_close(x, a)
    x[3, :] = nd.array(np.ones((1, 5)), device=device)
    a[3, :] = 1.0
    assert_close(x, a)
    # through a permuted view and a flipped view, into the base
    v = x.permute((1, 0))
    v[0, 1:3] = -3.0
    a.T[0, 1:3] = -3.0
    w = x.flip(0)
    w[0, 4] = 9.0
    a[3, 4] = 9.0
    assert_close(x, a)


def test_compact_copies_only_when_needed():
    a, x = pair(3, 4)
    assert x.is_compact() and x.compact() is x
    r = x.reshape((4, 3))
    assert r.is_compact() and r.compact() is r
    for view, expected in [(x.permute((1, 0)), a.T), (x[:, 1:3], a[:, 1:3]), (x.flip(0), a[::-1]),
                           (x[0:1].broadcast_to((2, 4)), np.broadcast_to(a[0:1], (2, 4)))]:
        assert not view.is_compact()
        c = view.compact()
        assert c.is_compact() and c.strides == (c.shape[1], 1)
        assert_close(c, expected)
        c.fill(0.0)  # a copy: the base is untouched
        assert_close(x, a)


# Arithmetic and reductions, on compact arrays and on views


def _operands():
    a, x = pair(3, 4)
    b, y = pair(4, 3)
    return (a, x), (b.T, y.permute((1, 0)))  # the second operand is a non-contiguous view


BINARY = {
    "add": lambda p, q: p + q,
    "sub": lambda p, q: p - q,
    "mul": lambda p, q: p * q,
    "div": lambda p, q: p / (q * q + 1.0),
    "eq": lambda p, q: p == q,
    "ne": lambda p, q: p != q,
    "lt": lambda p, q: p < q,
    "le": lambda p, q: p <= q,
    "gt": lambda p, q: p > q,
    "ge": lambda p, q: p >= q,
}


@pytest.mark.parametrize("name", BINARY)
def test_binary_against_numpy(name):
    (a, x), (b, y) = _operands()
    fn = BINARY[name]
    out = fn(x, y)
    assert out.dtype == "float32"
    assert_close(out, fn(a, b).astype(np.float32))
    y2 = x.permute((1, 0)).permute((1, 0))  # equal values: comparisons give both 1.0 and 0.0
    assert_close(fn(x, y2), fn(a, a).astype(np.float32))


SCALAR = {
    "add": lambda p: p + 1.5, "radd": lambda p: 1.5 + p, "sub": lambda p: p - 1.5, "rsub": lambda p: 2.0 - p,
    "mul": lambda p: p * -2.0, "rmul": lambda p: 3.0 * p, "div": lambda p: p / 4.0,
    "rdiv": lambda p: 2.0 / (p * p + 1.0), "neg": lambda p: -p, "pow2": lambda p: p ** 2,
    "pow_half": lambda p: (p * p) ** 0.5, "eq": lambda p: p == 0.0, "lt": lambda p: p < 0.25,
    "ge": lambda p: p >= 0.25,
}


@pytest.mark.parametrize("name", SCALAR)
def test_scalar_and_unary_against_numpy(name):
    a, x = pair(3, 4)
    fn = SCALAR[name]
    assert_close(fn(x), fn(a).astype(np.float32))
    assert_close(fn(x.permute((1, 0))), fn(a.T).astype(np.float32))
    assert fn(x).dtype == "float32"


def test_maximum_log_exp_tanh():
    a, x = pair(3, 4)
    b, y = pair(3, 4)
    assert_close(x.maximum(y), np.maximum(a, b))
    assert_close(x.maximum(0.0), np.maximum(a, 0.0))
    assert_close(x.flip(0).maximum(y), np.maximum(a[::-1], b))
    assert_close((x * x + 0.1).log(), np.log(a * a + 0.1))
    assert_close(x.exp(), np.exp(a))
    assert_close(x.permute((1, 0)).tanh(), np.tanh(a.T))


def test_numpy_scalars_keep_float32():
    x = nd.array([1.0, 2.0])
    for out in (x * np.float64(2.0), x + np.float64(1.0), x / np.sqrt(4.0), np.float64(2.0) - x, x ** np.int64(2)):
        assert out.dtype == "float32"
    np.testing.assert_array_equal((x * np.float64(2.0)).numpy(), [2.0, 4.0])


def test_zero_d_results_are_arrays_that_can_be_written():
    x = nd.array(2.0)
    for out in (x + 1.0, -x, x.exp(), x * x):
        assert out.shape == ()
        out.fill(5.0)
        assert out.numpy() == 5.0
        out[()] = 6.0
        assert out.numpy() == 6.0


@pytest.mark.parametrize("shapes", [((3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 1, 3, 4), (5, 4, 2)),
                                    ((3, 4), (2, 4, 5)), ((1, 1), (1, 1))])
def test_matmul_against_numpy(shapes, device):
    (a, x), (b, y) = pair(*shapes[0], device=device), pair(*shapes[1], device=device)
    assert_close(x @ y, a @ b)
    # a transposed (non-contiguous) right operand
    yt = nd.array(np.ascontiguousarray(np.swapaxes(b, -1, -2)), device=device)
    yt = yt.permute(tuple(range(yt.ndim - 2)) + (yt.ndim - 1, yt.ndim - 2))
    assert_close(x @ yt, a @ b)


@pytest.mark.parametrize("axis", [None, 0, 1, -1, (0, 2), (0, 1, 2)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_sum_and_max_against_numpy(axis, keepdims):
    a, x = pair(2, 3, 4)
    assert_close(x.sum(axis=axis, keepdims=keepdims), a.sum(axis=axis, keepdims=keepdims))
    assert_close(x.max(axis=axis, keepdims=keepdims), a.max(axis=axis, keepdims=keepdims))
    v = x.permute((2, 1, 0))
    assert_close(v.sum(axis=axis, keepdims=keepdims), a.transpose(2, 1, 0).sum(axis=axis, keepdims=keepdims))
    assert_close(v.max(axis=axis, keepdims=keepdims), a.transpose(2, 1, 0).max(axis=axis, keepdims=keepdims))


def test_pad():
    a, x = pair(2, 3)
    y = x.pad(((1, 0), (2, 1)))
    assert y.shape == (3, 6) and y.is_compact()
    assert_close(y, np.pad(a, ((1, 0), (2, 1))))
    assert_close(x.permute((1, 0)).pad(((0, 1), (0, 0))), np.pad(a.T, ((0, 1), (0, 0))))
    y.fill(1.0)  # a new array
    assert_close(x, a)
    with pytest.raises(ValueError, match="pad"):
        x.pad(((1, 1),))


# Hypothesis: broadcasting, reshape and permute against numpy, also on non-contiguous views

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=4).map(tuple)


@st.composite
def arrays(draw, shape):
    """(NDArray, numpy array) with equal values; the NDArray is a compact array or one kind of view."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    kind = draw(st.sampled_from(["compact", "sliced", "permuted", "flipped", "broadcast"]))
    if kind == "sliced":
        starts = [draw(st.integers(0, 2)) for _ in shape]
        steps = [draw(st.integers(1, 3)) for _ in shape]
        base_shape = tuple(o + (d - 1) * s + 1 + draw(st.integers(0, 2)) for d, o, s in zip(shape, starts, steps))
        base = rng.standard_normal(base_shape).astype(np.float32)
        index = tuple(slice(o, o + (d - 1) * s + 1, s) for d, o, s in zip(shape, starts, steps))
        return nd.array(base)[index], base[index]
    if kind == "permuted":
        perm = draw(st.permutations(range(len(shape))))
        base = rng.standard_normal(tuple(shape[perm.index(i)] for i in range(len(shape)))).astype(np.float32)
        return nd.array(base).permute(perm), base.transpose(perm)
    if kind == "flipped":
        axes = tuple(i for i in range(len(shape)) if draw(st.booleans()))
        base = rng.standard_normal(shape).astype(np.float32)
        return nd.array(base).flip(axes), np.flip(base, axes)
    if kind == "broadcast":
        small = tuple(1 if draw(st.booleans()) else d for d in shape)
        base = rng.standard_normal(small).astype(np.float32)
        return nd.array(base).broadcast_to(shape), np.broadcast_to(base, shape)
    base = rng.standard_normal(shape).astype(np.float32)
    return nd.array(base), base


@st.composite
def broadcast_pairs(draw):
    """Two shapes that broadcast: the second drops leading axes and sets some axes of the first to 1."""
    shape = draw(shapes)
    lead = draw(st.integers(0, len(shape)))
    other = tuple(1 if draw(st.booleans()) else d for d in shape[lead:])
    return (shape, other) if draw(st.booleans()) else (other, shape)


@settings(deadline=None, max_examples=30)
@given(data=st.data())
def test_hypothesis_broadcasting_elementwise(data):
    shape_a, shape_b = data.draw(broadcast_pairs())
    x, a = data.draw(arrays(shape_a))
    y, b = data.draw(arrays(shape_b))
    for fn in (lambda p, q: p + q, lambda p, q: p * q, lambda p, q: p - q, lambda p, q: p < q):
        assert_close(fn(x, y), fn(a, b).astype(np.float32))
    assert_close(x.maximum(y), np.maximum(a, b))


@settings(deadline=None, max_examples=30)
@given(data=st.data())
def test_hypothesis_broadcast_to(data):
    small, target = data.draw(broadcast_pairs().filter(lambda p: np.broadcast_shapes(*p) == p[1]))
    x, a = data.draw(arrays(small))
    y = x.broadcast_to(target)
    assert_close(y, np.broadcast_to(a, target))
    lead = len(target) - len(small)
    for i, d in enumerate(target):
        if i < lead or (small[i - lead] == 1 and d != 1):
            assert y.strides[i] == 0
        else:
            assert y.strides[i] == x.strides[i - lead]


@st.composite
def reshapes(draw):
    """A shape and another shape of the same size (its dims shuffled and regrouped), maybe with one -1."""
    shape = draw(shapes)
    factors = draw(st.permutations(list(shape)))
    cuts = sorted(draw(st.lists(st.integers(0, len(factors)), max_size=3)))
    bounds = [0] + cuts + [len(factors)]
    target = [int(np.prod(factors[lo:hi])) for lo, hi in zip(bounds, bounds[1:])]
    if target and draw(st.booleans()):
        target[draw(st.integers(0, len(target) - 1))] = -1
    return shape, tuple(target)


@settings(deadline=None, max_examples=30)
@given(data=st.data(), shapes_pair=reshapes())
def test_hypothesis_reshape(data, shapes_pair):
    shape, target = shapes_pair
    x, a = data.draw(arrays(shape))
    expected = a.reshape(target)
    compact = x.compact()
    y = compact.reshape(target)
    assert_close(y, expected)
    assert y.is_compact() and y.strides == tuple(int(s) // 4 for s in np.empty(expected.shape, np.float32).strides)
    compact.fill(3.0)  # a view of the compact array
    assert (y.numpy() == 3.0).all()


@settings(deadline=None, max_examples=30)
@given(data=st.data(), shape=shapes)
def test_hypothesis_permute(data, shape):
    x, a = data.draw(arrays(shape))
    perm = data.draw(st.permutations(range(len(shape))))
    y = x.permute(perm)
    assert_close(y, a.transpose(perm))
    assert y.strides == tuple(x.strides[p] for p in perm) and y.offset == x.offset
    assert_close(y.permute(tuple(int(i) for i in np.argsort(perm))), a)  # permuting back
    assert_close(y.compact(), a.transpose(perm))


@settings(deadline=None, max_examples=30)
@given(data=st.data(), shape=shapes.filter(lambda s: len(s) > 0))
def test_hypothesis_slicing_and_setitem(data, shape):
    x, a = data.draw(arrays(shape))
    x, a = x.compact(), a.copy()  # writable
    index = tuple(slice(data.draw(st.integers(-d, d)), data.draw(st.integers(-d, d)), data.draw(st.integers(1, 3)))
                  for d in shape)
    assert_close(x[index], a[index])
    x[index] = 4.0
    a[index] = 4.0
    assert_close(x, a)
