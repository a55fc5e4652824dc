"""Tensors filled by rule: constants, uniform and normal draws (numpy's global RNG), one-hot rows."""
import numpy as np

from ..autograd import Tensor
from ..backend_ndarray.ndarray import _check_device

__all__ = ["rand", "randn", "constant", "ones", "zeros", "randb", "one_hot", "zeros_like", "ones_like"]


def _tensor(array, requires_grad):
    return Tensor.make_const(array, requires_grad=requires_grad)


def rand(*shape, low=0.0, high=1.0, device=None, dtype="float32", requires_grad=False):
    """Uniform draws from [low, high)."""
    device = _check_device(device)
    x = device.rand(*shape, dtype=dtype) * (high - low) + low
    # rounding to float32 can land on `high`: min(x, top) keeps every draw in [low, high)
    top = float(np.nextafter(np.array(high, dtype=dtype), low))
    return _tensor(-(-x).maximum(-top), requires_grad)


def randn(*shape, mean=0.0, std=1.0, device=None, dtype="float32", requires_grad=False):
    """Normal draws with the given mean and standard deviation."""
    device = _check_device(device)
    return _tensor(device.randn(*shape, dtype=dtype) * std + mean, requires_grad)


def constant(*shape, c=1.0, device=None, dtype="float32", requires_grad=False):
    device = _check_device(device)
    return _tensor(device.full(shape, c, dtype=dtype), requires_grad)


def ones(*shape, device=None, dtype="float32", requires_grad=False):
    return constant(*shape, c=1.0, device=device, dtype=dtype, requires_grad=requires_grad)


def zeros(*shape, device=None, dtype="float32", requires_grad=False):
    return constant(*shape, c=0.0, device=device, dtype=dtype, requires_grad=requires_grad)


def randb(*shape, p=0.5, device=None, dtype="float32", requires_grad=False):
    """Bernoulli draws: 1.0 with probability p, else 0.0."""
    device = _check_device(device)
    return _tensor(device.rand(*shape, dtype=dtype) <= p, requires_grad)


def one_hot(n, i, device=None, dtype="float32", requires_grad=False):
    """Rows of the n x n identity picked by i (an int, a sequence or a Tensor of indices)."""
    device = _check_device(device)
    idx = np.asarray(i.numpy() if isinstance(i, Tensor) else i)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"one_hot: indices must lie in [0, {n}), got values from {idx.min()} to {idx.max()}")
    return _tensor(device.one_hot(n, idx.astype(np.int64), dtype=dtype), requires_grad)


def zeros_like(array, *, device=None, dtype=None, requires_grad=False):
    device = device if device else array.device
    return zeros(*array.shape, dtype=dtype or array.dtype, device=device, requires_grad=requires_grad)


def ones_like(array, *, device=None, dtype=None, requires_grad=False):
    device = device if device else array.device
    return ones(*array.shape, dtype=dtype or array.dtype, device=device, requires_grad=requires_grad)
