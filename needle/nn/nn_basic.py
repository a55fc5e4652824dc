"""Modules: Parameter, Module and the basic layers and losses."""
import warnings

import numpy as np

from .. import init, ops
from ..autograd import Tensor

__all__ = ["Parameter", "Module", "Identity", "Linear", "Flatten", "ReLU", "Tanh", "Sigmoid", "Sequential",
           "SoftmaxLoss", "BatchNorm1d", "LayerNorm1d", "Dropout", "Residual"]


class Parameter(Tensor):
    """A Tensor that `Module.parameters()` finds."""


def _unpack_params(value):
    if isinstance(value, Parameter):
        return [value]
    if isinstance(value, Module):
        return value.parameters()
    if isinstance(value, dict):
        return [p for v in value.values() for p in _unpack_params(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _unpack_params(v)]
    return []


def _child_modules(value):
    if isinstance(value, Module):
        return [value] + _child_modules(value.__dict__)
    if isinstance(value, dict):
        return [m for v in value.values() for m in _child_modules(v)]
    if isinstance(value, (list, tuple)):
        return [m for v in value for m in _child_modules(v)]
    return []


class Module:
    """Base class of layers: `parameters()` finds every Parameter in attributes, lists, tuples, dicts and
    sub-modules; `train()` / `eval()` set `training` on the module and all its sub-modules."""

    def __init__(self):
        self.training = True

    def parameters(self):
        params, seen = [], set()
        for p in _unpack_params(self.__dict__):
            if id(p) not in seen:  # a shared parameter (tied weights) is listed once
                seen.add(id(p))
                params.append(p)
        return params

    def _children(self):
        return _child_modules(self.__dict__)

    def eval(self):
        self.training = False
        for m in self._children():
            m.training = False
        return self

    def train(self, mode=True):
        self.training = mode
        for m in self._children():
            m.training = mode
        return self

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class Identity(Module):
    def forward(self, x):
        return x


def _check_features(name, x, dim):
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a needle Tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[-1] != dim:
        raise ValueError(f"{name}: expected input with last dimension {dim}, got shape {x.shape}")


class Linear(Module):
    """y = x W + b.

    Args: in_features, out_features, bias=True, device=None, dtype="float32".
    Shapes: x (..., in_features) -> (..., out_features).
    Init: W (in_features, out_features) Kaiming-uniform with fan_in = in_features; b (1, out_features)
    Kaiming-uniform with fan_in = out_features (the course's rule).
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype="float32"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(init.kaiming_uniform(in_features, out_features, device=device, dtype=dtype))
        self.bias = Parameter(init.kaiming_uniform(out_features, 1, device=device, dtype=dtype)
                              .reshape((1, out_features))) if bias else None

    def forward(self, X):
        _check_features("Linear", X, self.in_features)
        flat = X.ndim == 2  # the common case needs no reshape on either side of the matmul
        X2 = X if flat else X.reshape((-1, self.in_features))
        if self.bias is not None and self.bias.shape in ((1, self.out_features), (self.out_features,)):
            out = ops.affine(X2, self.weight, self.bias)          # the bias added in place: one (n, out) array
        else:
            out = ops.matmul(X2, self.weight)
            if self.bias is not None:
                out = out + ops.broadcast_to(self.bias, out.shape)
        return out if flat else out.reshape(X.shape[:-1] + (self.out_features,))


class Flatten(Module):
    """(B, ...) -> (B, prod(...))."""

    def forward(self, X):
        return X.reshape((X.shape[0], -1))


class ReLU(Module):
    def forward(self, x):
        return ops.relu(x)


class Tanh(Module):
    def forward(self, x):
        return ops.tanh(x)


class Sigmoid(Module):
    def forward(self, x):
        return ops.sigmoid(x)


class Sequential(Module):
    def __init__(self, *modules):
        super().__init__()
        self.modules = modules

    def forward(self, x):
        for module in self.modules:
            x = module(x)
        return x


class SoftmaxLoss(Module):
    """Mean cross-entropy of logits (batch, classes) against integer labels y (batch,)."""

    def forward(self, logits, y):
        return ops.softmax_cross_entropy(logits, y)


class BatchNorm1d(Module):
    """y = weight * (x - mean) / sqrt(var + eps) + bias over the batch axis of x (batch, dim).

    Training uses the batch's mean and biased variance and updates `running_mean` and `running_var`
    (unbiased, as PyTorch) by running = (1 - momentum) * running + momentum * batch; eval uses them.
    """

    def __init__(self, dim, eps=1e-5, momentum=0.1, device=None, dtype="float32"):
        super().__init__()
        self.dim, self.eps, self.momentum = dim, eps, momentum
        self.weight = Parameter(init.ones(dim, device=device, dtype=dtype))
        self.bias = Parameter(init.zeros(dim, device=device, dtype=dtype))
        self.running_mean = init.zeros(dim, device=device, dtype=dtype)
        self.running_var = init.ones(dim, device=device, dtype=dtype)

    def forward(self, x):
        _check_features("BatchNorm1d", x, self.dim)
        if x.ndim != 2:
            raise ValueError(f"BatchNorm1d: expected input (batch, {self.dim}), got shape {x.shape}")
        n = x.shape[0]
        if self.training:
            mean = x.sum((0,)) / n
            centred = x - mean.reshape((1, self.dim)).broadcast_to(x.shape)
            var = (centred ** 2).sum((0,)) / n
            m = self.momentum
            unbiased = var.detach() * (n / max(n - 1, 1))
            self.running_mean = (self.running_mean * (1 - m) + mean.detach() * m).detach()
            self.running_var = (self.running_var * (1 - m) + unbiased * m).detach()
        else:
            mean, var = self.running_mean, self.running_var
            centred = x - mean.reshape((1, self.dim)).broadcast_to(x.shape)
        std = ((var + self.eps) ** 0.5).reshape((1, self.dim)).broadcast_to(x.shape)
        w = self.weight.reshape((1, self.dim)).broadcast_to(x.shape)
        b = self.bias.reshape((1, self.dim)).broadcast_to(x.shape)
        return w * centred / std + b


class LayerNorm1d(Module):
    """y = weight * (x - mean) / sqrt(var + eps) + bias over the last axis (biased variance)."""

    def __init__(self, dim, eps=1e-5, device=None, dtype="float32"):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = Parameter(init.ones(dim, device=device, dtype=dtype))
        self.bias = Parameter(init.zeros(dim, device=device, dtype=dtype))

    def forward(self, x):
        _check_features("LayerNorm1d", x, self.dim)
        kept = x.shape[:-1] + (1,)
        mean = (x.sum((x.ndim - 1,)) / self.dim).reshape(kept).broadcast_to(x.shape)
        centred = x - mean
        var = ((centred ** 2).sum((x.ndim - 1,)) / self.dim).reshape(kept).broadcast_to(x.shape)
        return self.weight.broadcast_to(x.shape) * centred / (var + self.eps) ** 0.5 + self.bias.broadcast_to(x.shape)


class Dropout(Module):
    """In training, zero each element with probability p and scale the rest by 1 / (1 - p)."""

    def __init__(self, p=0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must lie in [0, 1), got {p!r}")
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        mask = init.randb(*x.shape, p=1 - self.p, device=x.device, dtype=x.dtype)
        return x * mask / (1 - self.p)


class Residual(Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x
