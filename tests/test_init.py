"""Tests for needle.init: signatures, shapes, value ranges and statistics, fan-based initialisers
(PyTorch's nn.init formulas with weights stored (fan_in, fan_out)), and numpy's global RNG."""

import inspect
import math

import numpy as np
import pytest
import torch

import needle as ndl
from needle import init

SHAPED = ["rand", "randn", "constant", "ones", "zeros", "randb"]
FAN_BASED = ["xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"]
EVERY = SHAPED + FAN_BASED + ["one_hot", "zeros_like", "ones_like"]


def make(name, **kwargs):
    """Call initialiser `name` with a small valid first argument list, so every name can share one test."""
    fn = getattr(init, name)
    if name in SHAPED or name in FAN_BASED:
        return fn(3, 4, **kwargs)
    if name == "one_hot":
        return fn(4, [0, 3, 1], **kwargs)
    return fn(ndl.Tensor(np.arange(12.0).reshape(3, 4)), **kwargs)


# Signatures and keywords


def test_every_api_name_is_exported():
    for name in EVERY:
        assert name in init.__all__
        assert callable(getattr(init, name))


@pytest.mark.parametrize("name", SHAPED)
def test_shaped_signatures_match_the_api(name):
    params = inspect.signature(getattr(init, name)).parameters
    assert next(iter(params.values())).kind is inspect.Parameter.VAR_POSITIONAL
    defaults = {"device": None, "dtype": "float32", "requires_grad": False}
    defaults.update({"rand": {"low": 0.0, "high": 1.0}, "randn": {"mean": 0.0, "std": 1.0},
                     "constant": {"c": 1.0}, "randb": {"p": 0.5}}.get(name, {}))
    for keyword, default in defaults.items():
        assert params[keyword].default == default, keyword
        assert params[keyword].kind is inspect.Parameter.KEYWORD_ONLY


def test_fan_based_signatures_match_the_api():
    for name, third in [("xavier_uniform", ("gain", 1.0)), ("xavier_normal", ("gain", 1.0)),
                        ("kaiming_uniform", ("nonlinearity", "relu")), ("kaiming_normal", ("nonlinearity", "relu"))]:
        params = list(inspect.signature(getattr(init, name)).parameters.values())
        assert [p.name for p in params[:3]] == ["fan_in", "fan_out", third[0]], name
        assert params[2].default == third[1]


@pytest.mark.parametrize("name", EVERY)
def test_defaults_give_a_float32_constant_on_cpu(name):
    t = make(name)
    assert isinstance(t, ndl.Tensor)
    assert t.dtype == "float32" and t.numpy().dtype == np.float32
    assert t.device == ndl.cpu()
    assert t.requires_grad is False
    assert t.is_leaf() and t.op is None


@pytest.mark.parametrize("name", EVERY)
def test_requires_grad_keyword(name):
    t = make(name, requires_grad=True)
    assert t.requires_grad is True and t.is_leaf()


@pytest.mark.parametrize("name", EVERY)
def test_device_keyword(name, device):
    assert make(name, device=device).device == device
    assert make(name, device=ndl.cpu_numpy()).device == ndl.cpu_numpy()
    with pytest.raises(TypeError):
        make(name, device="gpu")


@pytest.mark.parametrize("name", ["constant", "ones", "zeros", "zeros_like", "ones_like"])
def test_dtype_keyword(name):
    t = make(name, dtype="float64")
    assert t.dtype == "float64" and t.numpy().dtype == np.float64


@pytest.mark.parametrize("name", ["rand", "randn", "randb", "one_hot"] + FAN_BASED)
def test_dtype_keyword_of_random_and_one_hot(name):
    t = make(name, dtype="float64")
    assert t.dtype == "float64" and t.numpy().dtype == np.float64


# Shapes and values


@pytest.mark.parametrize("shape", [(5,), (2, 3), (2, 1, 4), (3, 0)])
@pytest.mark.parametrize("name", SHAPED)
def test_shapes(name, shape):
    assert getattr(init, name)(*shape).shape == shape


@pytest.mark.parametrize("name", SHAPED)
def test_zero_dimensional(name):
    assert getattr(init, name)().shape == ()


def test_constant_ones_zeros():
    np.testing.assert_array_equal(init.constant(2, 3, c=-2.5).numpy(), np.full((2, 3), -2.5, np.float32))
    np.testing.assert_array_equal(init.constant(2, 3).numpy(), np.ones((2, 3)))
    np.testing.assert_array_equal(init.ones(4, 1).numpy(), np.ones((4, 1)))
    np.testing.assert_array_equal(init.zeros(1, 4).numpy(), np.zeros((1, 4)))


def test_zeros_like_and_ones_like_copy_shape_device_and_dtype():
    x = ndl.Tensor(np.random.randn(2, 3, 4), device=ndl.cpu_numpy(), dtype="float64")
    for fn, value in [(init.zeros_like, 0.0), (init.ones_like, 1.0)]:
        t = fn(x)
        assert t.shape == x.shape and t.device == ndl.cpu_numpy() and t.dtype == "float64"
        np.testing.assert_array_equal(t.numpy(), np.full(x.shape, value))
        assert fn(x, device=ndl.cpu()).device == ndl.cpu()
        assert fn(x, requires_grad=True).requires_grad
        assert fn(x, dtype="float32").dtype == "float32"


def test_rand_lies_in_the_half_open_interval():
    np.random.seed(0)
    for low, high in [(0.0, 1.0), (-3.0, -1.0), (-0.5, 2.0)]:
        x = init.rand(200, 500, low=low, high=high).numpy()
        assert x.min() >= low and x.max() < high
        # both ends are reached: the draws fill the interval
        assert x.min() < low + 1e-3 * (high - low) and x.max() > high - 1e-3 * (high - low)
        assert abs(x.mean() - (low + high) / 2) < 0.01 * (high - low)
        assert abs(x.std() - (high - low) / math.sqrt(12)) < 0.01 * (high - low)


def test_rand_never_returns_high_even_when_rounding_to_float32_would(monkeypatch):
    # The largest float64 below 1 rounds to 1.0 in float32 (about one draw in 3e7).
    monkeypatch.setattr(np.random, "rand", lambda *shape: np.full(shape, np.nextafter(1.0, 0.0)))
    for low, high in [(0.0, 1.0), (-2.0, 5.0)]:
        x = init.rand(4, low=low, high=high).numpy()
        assert (x < np.float32(high)).all() and (x > np.float32(high) - 1e-5 * (high - low)).all()


def test_randn_statistics():
    np.random.seed(1)
    x = init.randn(400, 500).numpy()
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1.0) < 0.01
    y = init.randn(400, 500, mean=3.0, std=0.5).numpy()
    assert abs(y.mean() - 3.0) < 0.005 and abs(y.std() - 0.5) < 0.005


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_randb_rate_and_values(p):
    np.random.seed(2)
    x = init.randb(200, 500, p=p).numpy()
    assert set(np.unique(x)) <= {0.0, 1.0}
    assert abs(x.mean() - p) < 0.005


def test_one_hot_with_int_sequence_and_tensor_indices():
    eye = np.eye(5, dtype=np.float32)
    np.testing.assert_array_equal(init.one_hot(5, 3).numpy(), eye[3])
    assert init.one_hot(5, 3).shape == (5,)
    np.testing.assert_array_equal(init.one_hot(5, [4, 0, 0, 2]).numpy(), eye[[4, 0, 0, 2]])
    np.testing.assert_array_equal(init.one_hot(5, (1, 2)).numpy(), eye[[1, 2]])
    np.testing.assert_array_equal(init.one_hot(5, np.array([[1, 2], [3, 4]])).numpy(), eye[[[1, 2], [3, 4]]])
    idx = ndl.Tensor([2.0, 1.0, 4.0], requires_grad=False)
    np.testing.assert_array_equal(init.one_hot(5, idx).numpy(), eye[[2, 1, 4]])
    assert init.one_hot(5, []).shape == (0, 5)


@pytest.mark.parametrize("bad", [5, -1, [0, 5], [-1, 2], (7,)])
def test_one_hot_index_out_of_range_is_a_value_error(bad):
    with pytest.raises(ValueError, match="one_hot"):
        init.one_hot(5, bad)
    with pytest.raises(ValueError, match="one_hot"):
        init.one_hot(5, ndl.Tensor(np.atleast_1d(bad).astype(np.float32)))


# numpy's global RNG


@pytest.mark.parametrize("name", ["rand", "randn", "randb"] + FAN_BASED)
def test_same_seed_gives_same_values(name):
    np.random.seed(123)
    a = make(name).numpy()
    b = make(name).numpy()
    np.random.seed(123)
    c = make(name).numpy()
    np.testing.assert_array_equal(a, c)
    assert not np.array_equal(a, b)


def test_draws_come_from_numpys_global_rng():
    np.random.seed(7)
    u, z = np.random.rand(3, 4), np.random.randn(2, 5)
    np.random.seed(7)
    x = init.rand(3, 4, low=-1.0, high=3.0).numpy()
    y = init.randn(2, 5, mean=1.0, std=2.0).numpy()
    np.testing.assert_allclose(x, u * 4.0 - 1.0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, z * 2.0 + 1.0, rtol=1e-6, atol=1e-6)


# Fan-based initialisers: PyTorch's formulas, weights (fan_in, fan_out)


def torch_draw(fill, fan_in, fan_out, **kwargs):
    """PyTorch's initialiser on its (out, in) layout, transposed to needle's (in, out)."""
    torch.manual_seed(0)
    w = torch.empty(fan_out, fan_in)
    fill(w, **kwargs)
    return w.T.numpy()


@pytest.mark.parametrize("fan_in, fan_out", [(300, 200), (50, 800)])
@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_xavier_uniform_bound(fan_in, fan_out, gain):
    np.random.seed(3)
    w = init.xavier_uniform(fan_in, fan_out, gain=gain).numpy()
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    assert w.shape == (fan_in, fan_out)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    reference = torch_draw(torch.nn.init.xavier_uniform_, fan_in, fan_out, gain=gain)
    assert np.abs(reference).max() == pytest.approx(np.abs(w).max(), rel=0.01)
    assert w.std() == pytest.approx(reference.std(), rel=0.03)


@pytest.mark.parametrize("fan_in, fan_out", [(300, 200), (50, 800)])
@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_xavier_normal_std(fan_in, fan_out, gain):
    np.random.seed(4)
    w = init.xavier_normal(fan_in, fan_out, gain=gain).numpy()
    std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    assert w.shape == (fan_in, fan_out)
    assert abs(w.mean()) < 0.03 * std and w.std() == pytest.approx(std, rel=0.03)
    reference = torch_draw(torch.nn.init.xavier_normal_, fan_in, fan_out, gain=gain)
    assert w.std() == pytest.approx(reference.std(), rel=0.03)


@pytest.mark.parametrize("fan_in, fan_out", [(300, 200), (50, 800)])
@pytest.mark.parametrize("nonlinearity", ["relu", "linear", "tanh", "sigmoid"])
def test_kaiming_uniform_bound(fan_in, fan_out, nonlinearity):
    np.random.seed(5)
    w = init.kaiming_uniform(fan_in, fan_out, nonlinearity=nonlinearity).numpy()
    bound = torch.nn.init.calculate_gain(nonlinearity) * math.sqrt(3.0 / fan_in)
    assert w.shape == (fan_in, fan_out)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    reference = torch_draw(torch.nn.init.kaiming_uniform_, fan_in, fan_out, nonlinearity=nonlinearity)
    assert np.abs(reference).max() == pytest.approx(np.abs(w).max(), rel=0.01)


@pytest.mark.parametrize("fan_in, fan_out", [(300, 200), (50, 800)])
@pytest.mark.parametrize("nonlinearity", ["relu", "linear", "tanh"])
def test_kaiming_normal_std(fan_in, fan_out, nonlinearity):
    np.random.seed(6)
    w = init.kaiming_normal(fan_in, fan_out, nonlinearity=nonlinearity).numpy()
    std = torch.nn.init.calculate_gain(nonlinearity) / math.sqrt(fan_in)
    assert w.shape == (fan_in, fan_out)
    assert abs(w.mean()) < 0.03 * std and w.std() == pytest.approx(std, rel=0.03)
    reference = torch_draw(torch.nn.init.kaiming_normal_, fan_in, fan_out, nonlinearity=nonlinearity)
    assert w.std() == pytest.approx(reference.std(), rel=0.03)


@pytest.mark.parametrize("name", ["kaiming_uniform", "kaiming_normal"])
def test_kaiming_unknown_nonlinearity_is_a_value_error_naming_the_callee(name):
    with pytest.raises(ValueError, match=name):
        getattr(init, name)(3, 4, nonlinearity="swish")
