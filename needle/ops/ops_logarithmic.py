"""Log-domain operations, written as primitives for numerical stability (each subtracts the max)."""
import numpy as np

from ..autograd import Tensor, TensorOp
from ..backend_ndarray.ndarray import NDArray, _norm_axes
from .ops_mathematic import _check_tensor, _for_rows

__all__ = ["LogSumExp", "LogSoftmax", "SoftmaxCrossEntropy", "logsumexp", "logsoftmax",
           "softmax_cross_entropy"]


def _shift_by_max(x, axes, xp, out=None):
    """(x - m, m) with m the max over `axes` (kept), or 0 where that max is not finite, so an all -inf
    slice gives -inf rather than nan downstream; x - m written into `out` when given."""
    m = x.max(axis=axes, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0).astype(x.dtype)
    return xp.subtract(x, m, out=out), m


def _logsumexp_keepdims(x, axes, xp):
    """log(sum(exp(x))) over `axes`, keeping them."""
    shifted, m = _shift_by_max(x, axes, xp)
    return xp.log(xp.exp(shifted).sum(axis=axes, keepdims=True)) + m


def _log_softmax(x, axis, xp):
    """(x - max) - log(sum(exp(x - max))): exact at the max however large x is, where x - logsumexp(x)
    would lose the digits of log(sum) to the rounding of max + log(sum)."""
    shifted, _ = _shift_by_max(x, axis, xp)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


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
        # out_grad may be a strided view (e.g. summation's broadcast gradient), which reshape refuses
        return Tensor.make_const(out_grad.realize_cached_data().compact().reshape(kept) * softmax)


def logsumexp(a, axes=None):
    _check_tensor("logsumexp", a)
    return LogSumExp(_norm_axes("logsumexp", axes, a.shape))(a)


class LogSoftmax(TensorOp):
    """log softmax over the last axis."""
    name = "logsoftmax"

    def compute(self, a):
        return NDArray.from_xp(_log_softmax(a.x, -1, a.device.xp), a.device)

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

    def _softmax_parts(self, logits, labels):
        """(exp(x - max), row sums of it (N, 1), (x - max)[row, label]): as _log_softmax, in fewer passes
        over the (N, C) array, block by block of rows on the backend's threads."""
        xp = logits.device.xp
        x = logits.x
        n = x.shape[0]
        exp = xp.empty(x.shape, x.dtype)
        sums = xp.empty((n, 1), x.dtype)
        picked = xp.empty((n,), x.dtype)

        def rows(sl):
            e, _ = _shift_by_max(x[sl], 1, xp, out=exp[sl])
            picked[sl] = e[xp.arange(e.shape[0]), labels[sl]]
            xp.exp(e, out=e)
            e.sum(axis=1, keepdims=True, out=sums[sl])

        _for_rows(logits.device, rows, n, x.size)
        return exp, sums, picked

    def compute(self, logits, labels):
        # log softmax at the label is shifted[label] - log(sum(exp(shifted))); exp(shifted) is kept for
        # the gradient, which then takes one pass over it
        xp = logits.device.xp
        self._labels = labels.x.astype(np.int64)
        self._exp, self._sums, picked = self._softmax_parts(logits, self._labels)
        loss = (xp.log(self._sums[:, 0]) - picked).mean(dtype=logits.dtype)
        return NDArray.from_xp(loss.reshape(()), logits.device)

    def gradient(self, out_grad, node):
        # (softmax - one_hot(labels)) * out_grad / N, with softmax = exp / sums: one pass, written over
        # the kept exp (a second backward through this node recomputes it from the logits)
        logits = node.inputs[0].realize_cached_data()
        xp = logits.device.xp
        if self._exp is None:
            self._exp, self._sums, _ = self._softmax_parts(logits, self._labels)
        grad, sums, labels = self._exp, self._sums, self._labels
        self._exp = None
        n = grad.shape[0]
        scale = out_grad.realize_cached_data().x / max(n, 1)

        def rows(sl):
            g = grad[sl]
            xp.multiply(g, scale / sums[sl], out=g)
            g[xp.arange(g.shape[0]), labels[sl]] -= scale

        _for_rows(logits.device, rows, n, grad.size)
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
