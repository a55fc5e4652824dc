"""Whole-sequence recurrent layers as single ops with a hand-written backward (BPTT).

Each fused op runs one layer over all time steps through the backend's kernels (`rnn_forward` /
`rnn_backward`, `lstm_*`, `gru_*`; numpy's are in backend_ndarray/recurrent_numpy.py): the input
projection of every step is one GEMM before the loop, and the weight gradients are one GEMM each after
it. For backward the op keeps what the kernel saved: the layer's states and gate activations, which is
O(seq_len x batch x G x hidden) per layer. Modules fall back to their per-step reference path (cells,
`split` and `stack`) where a backend has no kernel; tests hold the two paths equal.
"""
from ..autograd import Tensor, TensorOp, TensorTupleOp
from ..backend_ndarray.ndarray import NDArray

__all__ = ["RNNLayer", "LSTMLayer", "GRULayer", "rnn_layer", "lstm_layer", "gru_layer", "has_fused_kernels",
           "GradProbe"]


class _FusedLayer(TensorTupleOp):
    """compute(X, *states, W_ih, W_hh[, b_ih, b_hh]) -> (Y, *final_states)."""
    kernel = None      # backend entry-point prefix: "rnn", "lstm" or "gru"
    n_states = 1       # h (RNN, GRU) or h and c (LSTM)

    def __init__(self, bias, lengths=None, recompute_every=None, record=None, **options):
        """lengths: sorted longest first (the kernel runs only the sequences still going at each step);
        recompute_every: keep every k-th step's state and recompute the rest in backward; record: called
        after backward with the (seq_len, bs) squared norms of dL/dh_t."""
        self.bias = bias
        self.options = dict(options)
        if lengths is not None:
            self.options["lengths"] = lengths
        if recompute_every is not None:
            self.options["recompute_every"] = recompute_every
        self.record = record
        self.saved = None

    def compute(self, X, *args):
        device = X.device
        states, weights = args[:self.n_states], args[self.n_states:]
        W_ih, W_hh = weights[0].x, weights[1].x
        b_ih, b_hh = (weights[2].x, weights[3].x) if self.bias else (None, None)
        forward = device.kernel(self.kernel + "_forward")
        *outputs, self.saved = forward(X.x, *(s.x for s in states), W_ih, W_hh, b_ih, b_hh, **self.options)
        return tuple(NDArray.from_xp(out, device) for out in outputs)

    def gradient(self, out_grad, node):
        device = node.inputs[0].device
        backward = device.kernel(self.kernel + "_backward")
        upstream = [g.x for g in out_grad.cached_data]
        if self.record is None:
            grads = backward(*upstream, self.saved)
        else:
            squares = device.xp.zeros(node.inputs[0].shape[:2], dtype=upstream[0].dtype)
            grads = backward(*upstream, self.saved, grad_sq=squares)
            self.record(device.mod.to_numpy(squares))
        if not self.bias:
            grads = grads[:-2]
        return tuple(Tensor.make_const(NDArray.from_xp(g, device)) for g in grads)


class RNNLayer(_FusedLayer):
    """One Elman layer over a whole sequence: h_t = f(x_t W_ih + b_ih + h_{t-1} W_hh + b_hh)."""
    name = "RNN"
    kernel = "rnn"


class LSTMLayer(_FusedLayer):
    """One LSTM layer over a whole sequence (gates i, f, g, o): outputs (Y, h_n, c_n)."""
    name = "LSTM"
    kernel = "lstm"
    n_states = 2


class GRULayer(_FusedLayer):
    """One GRU layer over a whole sequence (gates r, z, n as in PyTorch): outputs (Y, h_n)."""
    name = "GRU"
    kernel = "gru"


def has_fused_kernels(device, kind):
    """Whether `device`'s backend has the whole-sequence kernels of `kind` ('rnn', 'lstm' or 'gru')."""
    return device.kernel(kind + "_forward") is not None and device.kernel(kind + "_backward") is not None


def _weights(W_ih, W_hh, b_ih, b_hh):
    return (W_ih, W_hh) if b_ih is None else (W_ih, W_hh, b_ih, b_hh)


def rnn_layer(X, h0, W_ih, W_hh, b_ih=None, b_hh=None, nonlinearity="tanh", **options):
    """X (T, B, I), h0 (B, H) -> TensorTuple (Y (T, B, H), h_n (B, H)); weights input-major.
    options: lengths, recompute_every, record (see _FusedLayer)."""
    return RNNLayer(b_ih is not None, nonlinearity=nonlinearity, **options)(X, h0, *_weights(W_ih, W_hh, b_ih, b_hh))


def lstm_layer(X, h0, c0, W_ih, W_hh, b_ih=None, b_hh=None, **options):
    """X (T, B, I), h0 and c0 (B, H) -> TensorTuple (Y, h_n, c_n); weights (., 4H), gates i, f, g, o."""
    return LSTMLayer(b_ih is not None, **options)(X, h0, c0, *_weights(W_ih, W_hh, b_ih, b_hh))


def gru_layer(X, h0, W_ih, W_hh, b_ih=None, b_hh=None, **options):
    """X (T, B, I), h0 (B, H) -> TensorTuple (Y, h_n); weights (., 3H), gates r, z, n."""
    return GRULayer(b_ih is not None, **options)(X, h0, *_weights(W_ih, W_hh, b_ih, b_hh))


class GradProbe(TensorOp):
    """The identity, whose backward hands `record` the squared norm of each row's gradient (summed over
    the last axis): how the reference path observes dL/dh_t without retaining gradients."""
    name = "grad_probe"

    def __init__(self, record):
        self.record = record

    def compute(self, a):
        return a

    def gradient(self, out_grad, node):
        g = out_grad.realize_cached_data()
        self.record(g.device.mod.to_numpy((g.x * g.x).sum(axis=-1)))
        return out_grad

