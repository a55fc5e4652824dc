"""Whole-sequence recurrent layers as single ops with a hand-written backward (BPTT).

Each fused op runs one layer over all time steps through the backend's kernels (`rnn_forward` /
`rnn_backward`, `lstm_*`, `gru_*`; numpy's are in backend_ndarray/recurrent_numpy.py): the input
projection of every step is one GEMM before the loop, and the weight gradients are one GEMM each after
it. For backward the op keeps what the kernel saved: the layer's states and gate activations, which is
O(seq_len x batch x G x hidden) per layer. A bidirectional layer is one op over two such layers, so that
the backend can run the two directions' loops side by side (run_phased). Modules fall back to their
per-step reference path (cells, `split` and `stack`) where a backend has no kernel; tests hold the two
paths equal.
"""
from ..autograd import Tensor, TensorOp, TensorTupleOp
from ..backend_ndarray.ndarray import NDArray
from .ops_indexing import reversed_sequences

__all__ = ["RNNLayer", "LSTMLayer", "GRULayer", "BidirectionalLayer", "rnn_layer", "lstm_layer", "gru_layer",
           "bidirectional_layer", "has_fused_kernels", "has_phased_kernels", "GradProbe"]


class _FusedLayer(TensorTupleOp):
    """compute(X, *states, W_ih, W_hh[, b_ih, b_hh]) -> (Y, *final_states)."""
    kernel = None      # backend entry-point prefix: "rnn", "lstm" or "gru"
    n_states = 1       # h (RNN, GRU) or h and c (LSTM)
    gates = 1          # G: W_hh is (H, G*H)

    def __init__(self, bias, lengths=None, recompute_every=None, record=None, **options):
        """lengths: (B,) in any order (the kernel runs only the sequences still going at each step);
        recompute_every: keep every k-th step's state and recompute the rest in backward; record: called
        after backward with the (seq_len, bs) squared norms of dL/dh_t."""
        self.bias = bias
        self.options = dict(options)
        if lengths is not None:
            self.options["lengths"] = lengths
        if recompute_every is not None:
            self.options["recompute_every"] = recompute_every
        self.record = record
        self.saved = self.steps = None

    def compute(self, X, *args):
        return tuple(NDArray.from_xp(out, X.device) for out in self.forward_arrays(X.device, X.x, args))

    def gradient(self, out_grad, node):
        device = node.inputs[0].device
        grads = self.backward_arrays(device, [g.x for g in out_grad.cached_data])
        return tuple(Tensor.make_const(NDArray.from_xp(g, device)) for g in grads)

    def forward_arrays(self, device, X, args, phased=False):
        """The kernel's outputs (Y, *final_states) as backend arrays, for X (a backend array) and args (the
        NDArrays of the states and weights); keeps what backward needs. phased: instead, a generator that
        yields around the recurrent loop and returns them (for the backend's run_phased)."""
        states, weights = args[:self.n_states], args[self.n_states:]
        W_ih, W_hh = weights[0].x, weights[1].x
        b_ih, b_hh = (weights[2].x, weights[3].x) if self.bias else (None, None)
        call = (X, *(s.x for s in states), W_ih, W_hh, b_ih, b_hh)
        self.steps = X.shape[:2]    # (T, B): the shape of the squared norms that backward records
        if not phased:
            *outputs, self.saved = device.kernel(self.kernel + "_forward")(*call, **self.options)
            return outputs
        return self._keep_saved(device.kernel(self.kernel + "_forward_phases")(*call, **self.options))

    def _keep_saved(self, phases):
        *outputs, self.saved = yield from phases
        return outputs

    def backward_arrays(self, device, upstream, phased=False):
        """The gradients (of X, the states, the weights and the biases if any) as backend arrays, for the
        upstream gradients of (Y, *final_states); phased as in forward_arrays."""
        squares = None
        if self.record is not None:
            squares = device.xp.zeros(self.steps, dtype=upstream[0].dtype)
        options = {} if squares is None else {"grad_sq": squares}
        if not phased:
            grads = device.kernel(self.kernel + "_backward")(*upstream, self.saved, **options)
            return self._finish_backward(device, grads, squares)
        return self._finish_phased(device, device.kernel(self.kernel + "_backward_phases")(
            *upstream, self.saved, **options), squares)

    def _finish_phased(self, device, phases, squares):
        grads = yield from phases
        return self._finish_backward(device, grads, squares)

    def _finish_backward(self, device, grads, squares):
        if squares is not None:
            self.record(device.mod.to_numpy(squares))
        return grads if self.bias else grads[:-2]


class RNNLayer(_FusedLayer):
    """One Elman layer over a whole sequence: h_t = f(x_t W_ih + b_ih + h_{t-1} W_hh + b_hh)."""
    name = "RNN"
    kernel = "rnn"


class LSTMLayer(_FusedLayer):
    """One LSTM layer over a whole sequence (gates i, f, g, o): outputs (Y, h_n, c_n)."""
    name = "LSTM"
    kernel = "lstm"
    n_states = 2
    gates = 4


class GRULayer(_FusedLayer):
    """One GRU layer over a whole sequence (gates r, z, n as in PyTorch): outputs (Y, h_n)."""
    name = "GRU"
    kernel = "gru"
    gates = 3


class BidirectionalLayer(TensorTupleOp):
    """A bidirectional layer as one op: `forward` (a fused layer op) reads X from first step to last,
    `reverse` (another) reads it backwards, each sequence from its own last step when `lengths` is given.
    compute(X, *forward_inputs, *reverse_inputs) -> (Y, *forward_finals, *reverse_finals), Y (T, B, 2H) =
    [forward's h_t, reverse's h_t] at each t. The two directions are independent, so the backend's
    run_phased runs their recurrent loops side by side, in forward and in backward."""
    name = "bidirectional"

    def __init__(self, forward, reverse, n_forward_inputs, lengths=None):
        self.forward, self.reverse = forward, reverse
        self.split = n_forward_inputs
        self.lengths = lengths      # as the layers' own lengths option

    def _reversed(self, xp, A):
        """A (T, B, ...) with every sequence reversed within its length; the map is its own inverse."""
        return reversed_sequences(xp, A, self.lengths)

    def _step_elements(self, B, H):
        return B * self.forward.gates * H    # a step's gate matrix: how much work each loop step has

    def compute(self, X, *args):
        device, xp = X.device, X.device.xp
        forward, reverse = device.kernel("run_phased")(
            [self.forward.forward_arrays(device, X.x, args[:self.split], phased=True),
             self.reverse.forward_arrays(device, self._reversed(xp, X.x), args[self.split:], phased=True)],
            self._step_elements(X.shape[1], args[0].shape[-1]))
        Y = xp.concatenate([forward[0], self._reversed(xp, reverse[0])], axis=2)
        return tuple(NDArray.from_xp(a, device) for a in (Y, *forward[1:], *reverse[1:]))

    def gradient(self, out_grad, node):
        device, xp = node.inputs[0].device, node.inputs[0].device.xp
        dY, *finals = [g.x for g in out_grad.cached_data]
        H, n = dY.shape[2] // 2, self.forward.n_states
        forward, reverse = device.kernel("run_phased")(
            [self.forward.backward_arrays(device, [dY[:, :, :H], *finals[:n]], phased=True),
             self.reverse.backward_arrays(device, [self._reversed(xp, dY[:, :, H:]), *finals[n:]], phased=True)],
            self._step_elements(dY.shape[1], H))
        dX = forward[0] + self._reversed(xp, reverse[0])
        return tuple(Tensor.make_const(NDArray.from_xp(g, device)) for g in (dX, *forward[1:], *reverse[1:]))


def bidirectional_layer(X, forward, forward_inputs, reverse, reverse_inputs, lengths=None):
    """X (T, B, I) through two fused layer ops, `forward` applied to (X, *forward_inputs) and `reverse` to X
    reversed (within `lengths`) and *reverse_inputs -> TensorTuple (Y (T, B, 2H), *forward_finals,
    *reverse_finals)."""
    return BidirectionalLayer(forward, reverse, len(forward_inputs), lengths)(X, *forward_inputs, *reverse_inputs)


def has_fused_kernels(device, kind):
    """Whether `device`'s backend has the whole-sequence kernels of `kind` ('rnn', 'lstm' or 'gru')."""
    return device.kernel(kind + "_forward") is not None and device.kernel(kind + "_backward") is not None


def has_phased_kernels(device, kind):
    """Whether `device`'s backend can run two `kind` layers' loops side by side (run_phased)."""
    return device.kernel("run_phased") is not None and device.kernel(kind + "_forward_phases") is not None \
        and device.kernel(kind + "_backward_phases") is not None


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

