"""Log-domain operations, written as primitives for numerical stability (each subtracts the max)."""
import numpy as np

from ..autograd import Tensor, TensorOp
from ..backend_ndarray.ndarray import NDArray, _norm_axes
from .ops_mathematic import _check_tensor

__all__ = ["LogSumExp", "LogSoftmax", "SoftmaxCrossEntropy", "logsumexp", "logsoftmax",
           "softmax_cross_entropy"]


def _logsumexp_keepdims(x, axes, xp):
    """log(sum(exp(x))) over `axes`, keeping them; an all -inf slice gives -inf, not nan."""
    m = x.max(axis=axes, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0).astype(x.dtype)
    return xp.log(xp.exp(x - m).sum(axis=axes, keepdims=True)) + m


class LogSumExp(TensorOp):
    name = "logsumexp"

    def __init__(self, axes):
        self.axes = axes

    def compute(self, a):
        out = _logsumexp_keepdims(a.x, self.axes, a.device.xp)
        return NDArray.from_xp(out.reshape(tuple(d for i, d in enumerate(a.shape) if i not in self.axes)), a.device)

    def gradient(self, out_grad, node):
        a = node.inputs[0].realize_cached_data()
        kept = tuple(1 if i in self.axes else d for i, d in enumerate(a.shape))
        softmax = (a - node.realize_cached_data().reshape(kept)).exp()
        return Tensor.make_const(out_grad.realize_cached_data().reshape(kept) * softmax)


def logsumexp(a, axes=None):
    _check_tensor("logsumexp", a)
    return LogSumExp(_norm_axes("logsumexp", axes, a.ndim))(a)


class LogSoftmax(TensorOp):
    """log softmax over the last axis."""
    name = "logsoftmax"

    def compute(self, a):
        return NDArray.from_xp(a.x - _logsumexp_keepdims(a.x, -1, a.device.xp), a.device)

    def gradient(self, out_grad, node):
        softmax = node.realize_cached_data().exp()
        g = out_grad.realize_cached_data()
        return Tensor.make_const(g - softmax * g.sum(axis=-1, keepdims=True))


def logsoftmax(a):
    _check_tensor("logsoftmax", a)
    if a.ndim < 1:
        raise ValueError(f"logsoftmax: input must be at least 1-D, got {a.shape}")
    return LogSoftmax()(a)


class SoftmaxCrossEntropy(TensorOp):
    """Mean over rows of -log softmax(logits)[row, label]: one op, so the loss over a 10,000-word
    vocabulary never builds a one-hot matrix."""
    name = "softmax_cross_entropy"

    def compute(self, logits, labels):
        xp = logits.device.xp
        x = logits.x
        log_probs = x - _logsumexp_keepdims(x, 1, xp)
        rows = xp.arange(x.shape[0])
        self._labels = labels.x.astype(np.int64)
        self._log_probs = log_probs
        return NDArray.from_xp(-log_probs[rows, self._labels].mean(dtype=x.dtype).reshape(()), logits.device)

    def gradient(self, out_grad, node):
        logits = node.inputs[0].realize_cached_data()
        xp = logits.device.xp
        grad = xp.exp(self._log_probs)
        grad[xp.arange(grad.shape[0]), self._labels] -= 1.0
        grad *= out_grad.realize_cached_data().x / grad.shape[0]
        return Tensor.make_const(NDArray.from_xp(grad, logits.device)), None


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of `logits` (N, C) against integer `labels` (N,) given as a Tensor."""
    _check_tensor("softmax_cross_entropy", logits)
    _check_tensor("softmax_cross_entropy", labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"softmax_cross_entropy: expected logits (N, C) and labels (N,), "
                         f"got {logits.shape} and {labels.shape}")
    y = labels.realize_cached_data().x
    if y.size and (y.min() < 0 or y.max() >= logits.shape[1] or (y != np.floor(y)).any()):
        raise ValueError(f"softmax_cross_entropy: labels must be integers in [0, {logits.shape[1]}), "
                         f"got values from {y.min()} to {y.max()}")
    return SoftmaxCrossEntropy()(logits, labels)
