"""Recurrent sequence modules: RNNCell, RNN, LSTMCell, LSTM, GRUCell, GRU and Embedding.

Weights are input-major, the transpose of PyTorch's: W_ih (input_size, G*hidden_size), W_hh (hidden_size,
G*hidden_size), bias_ih and bias_hh (G*hidden_size,), with G = 1 (RNN), 4 (LSTM: i, f, g, o) or 3 (GRU:
r, z, n). Every weight and bias is drawn from U(-sqrt(k), sqrt(k)), k = 1 / hidden_size.

The multi-layer modules have two paths with one meaning. The reference path walks the sequence time step
by time step and, within a step, layer by layer, through exactly one cell per layer (`split` along time,
`stack` of the outputs). The fused path (the default) runs one whole-sequence op per layer with a
hand-written backward (needle.ops.ops_recurrent). Modules read their cells' weights at call time, so a
replaced `cell.W_ih` receives the gradient on either path.
"""
import math
import os

from .. import init, ops
from ..autograd import Tensor
from .nn_basic import Module, Parameter

__all__ = ["RNNCell", "RNN", "LSTMCell", "LSTM", "GRUCell", "GRU", "Embedding"]


def _uniform(shape, hidden_size, device, dtype):
    bound = 1.0 / math.sqrt(hidden_size)
    return Parameter(init.rand(*shape, low=-bound, high=bound, device=device, dtype=dtype))


def _check_sizes(who, input_size, hidden_size, num_layers=1):
    for label, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{who}: {label} must be a positive int, got {value!r}")


def _check_input(who, X, ndim, input_size, layout):
    if not isinstance(X, Tensor):
        raise TypeError(f"{who}: X must be a needle Tensor, got {type(X).__name__}")
    if X.ndim != ndim:
        raise ValueError(f"{who}: X must be {ndim}-D {layout}, got {X.shape}")
    if X.shape[-1] != input_size:
        raise ValueError(f"{who}: X must have input_size {input_size} in its last axis, got {X.shape}")


def _check_state(who, label, h, shape):
    if not isinstance(h, Tensor):
        raise TypeError(f"{who}: {label} must be a needle Tensor or None, got {type(h).__name__}")
    if h.shape != shape:
        raise ValueError(f"{who}: {label} must have shape {shape}, got {h.shape}")


class _Cell(Module):
    """Shared parameters and checks of the three cells; `gates` is G."""
    gates = 1

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype="float32"):
        super().__init__()
        _check_sizes(type(self).__name__, input_size, hidden_size)
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        width = self.gates * hidden_size
        self.W_ih = _uniform((input_size, width), hidden_size, device, dtype)
        self.W_hh = _uniform((hidden_size, width), hidden_size, device, dtype)
        self.bias_ih = _uniform((width,), hidden_size, device, dtype) if bias else None
        self.bias_hh = _uniform((width,), hidden_size, device, dtype) if bias else None

    def _check(self, X):
        _check_input(type(self).__name__, X, 2, self.input_size, "(bs, input_size)")
        return X.shape[0]

    def _zeros(self, X):
        return init.zeros(X.shape[0], self.hidden_size, device=X.device, dtype=X.dtype)

    def _project(self, X, W, b):
        """X W + b, b broadcast over the batch."""
        out = ops.matmul(X, W)
        return out if b is None else out + ops.broadcast_to(ops.reshape(b, (1, b.shape[0])), out.shape)

    def _gates(self, X, h):
        """X W_ih + b_ih + h W_hh + b_hh, split into G tensors of (bs, hidden_size)."""
        pre = self._project(X, self.W_ih, self.bias_ih) + self._project(h, self.W_hh, self.bias_hh)
        return ops.split(ops.reshape(pre, (X.shape[0], self.gates, self.hidden_size)), 1)


class RNNCell(_Cell):
    """An Elman RNN cell: h' = f(X W_ih + b_ih + h W_hh + b_hh), f = tanh or relu.

    Args:
        input_size, hidden_size: feature sizes of X and h.
        bias: whether to add bias_ih and bias_hh (default True).
        nonlinearity: 'tanh' (default) or 'relu'.
        device, dtype: where and how parameters are stored (default cpu, "float32").
    Shapes: X (bs, input_size), h (bs, hidden_size) or None (zeros) -> h' (bs, hidden_size).
    Init: W_ih, W_hh, bias_ih, bias_hh ~ U(-sqrt(k), sqrt(k)), k = 1 / hidden_size.

    >>> import needle as ndl, numpy as np
    >>> cell = ndl.nn.RNNCell(3, 5)
    >>> cell(ndl.Tensor(np.ones((2, 3)))).shape
    (2, 5)
    """

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device=None, dtype="float32"):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNNCell: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(input_size, hidden_size, bias, device, dtype)
        self.nonlinearity = nonlinearity

    def forward(self, X, h=None):
        bs = self._check(X)
        if h is None:
            h = self._zeros(X)
        _check_state("RNNCell", "h", h, (bs, self.hidden_size))
        pre = self._project(X, self.W_ih, self.bias_ih) + self._project(h, self.W_hh, self.bias_hh)
        return ops.tanh(pre) if self.nonlinearity == "tanh" else ops.relu(pre)


class LSTMCell(_Cell):
    """A long short-term memory cell (PyTorch's equations, gate order i, f, g, o):

        i, f, o = sigmoid(X W_ih + b_ih + h W_hh + b_hh) (their blocks), g = tanh(its block)
        c' = f * c + i * g;   h' = o * tanh(c')

    Args: input_size, hidden_size, bias=True, device=None, dtype="float32".
    Shapes: X (bs, input_size), h = (h0, c0) each (bs, hidden_size), or None (zeros) -> (h', c').
    Init: W_ih (input_size, 4*hidden_size), W_hh (hidden_size, 4*hidden_size), biases (4*hidden_size,),
    all ~ U(-sqrt(k), sqrt(k)), k = 1 / hidden_size.
    """
    gates = 4

    def forward(self, X, h=None):
        bs = self._check(X)
        h0, c0 = (self._zeros(X), self._zeros(X)) if h is None else h
        _check_state("LSTMCell", "h0", h0, (bs, self.hidden_size))
        _check_state("LSTMCell", "c0", c0, (bs, self.hidden_size))
        i, f, g, o = self._gates(X, h0)
        c = ops.sigmoid(f) * c0 + ops.sigmoid(i) * ops.tanh(g)
        return ops.sigmoid(o) * ops.tanh(c), c


class GRUCell(_Cell):
    """A gated recurrent unit (PyTorch's equations, gate order r, z, n):

        r = sigmoid(X W_ir + b_ir + h W_hr + b_hr);  z = sigmoid(X W_iz + b_iz + h W_hz + b_hz)
        n = tanh(X W_in + b_in + r * (h W_hn + b_hn));  h' = (1 - z) * n + z * h

    Args: input_size, hidden_size, bias=True, device=None, dtype="float32".
    Shapes: X (bs, input_size), h (bs, hidden_size) or None (zeros) -> h' (bs, hidden_size).
    Init: W_ih (input_size, 3*hidden_size), W_hh (hidden_size, 3*hidden_size), biases (3*hidden_size,),
    all ~ U(-sqrt(k), sqrt(k)), k = 1 / hidden_size.
    """
    gates = 3

    def forward(self, X, h=None):
        bs = self._check(X)
        if h is None:
            h = self._zeros(X)
        _check_state("GRUCell", "h", h, (bs, self.hidden_size))
        shape = (bs, 3, self.hidden_size)
        x_r, x_z, x_n = ops.split(ops.reshape(self._project(X, self.W_ih, self.bias_ih), shape), 1)
        h_r, h_z, h_n = ops.split(ops.reshape(self._project(h, self.W_hh, self.bias_hh), shape), 1)
        r = ops.sigmoid(x_r + h_r)
        z = ops.sigmoid(x_z + h_z)
        n = ops.tanh(x_n + r * h_n)
        return (1.0 - z) * n + z * h


def _fused_default(fused):
    if fused is None:
        return os.environ.get("NEEDLE_FUSED", "1") != "0"
    return bool(fused)


class _Recurrent(Module):
    """A stack of `num_layers` cells, one per layer, each shared by all time steps.

    Subclasses set `kind` (the op family), `cells_name` (the list attribute) and `n_states`.
    """
    kind = None
    cells_name = None
    n_states = 1

    def __init__(self, input_size, hidden_size, num_layers, device, dtype, fused, make_cell):
        super().__init__()
        _check_sizes(type(self).__name__, input_size, hidden_size, num_layers)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.device, self.dtype = device, dtype
        setattr(self, self.cells_name,
                [make_cell(input_size if layer == 0 else hidden_size) for layer in range(num_layers)])
        self.fused = _fused_default(fused)

    @property
    def _cells(self):
        return getattr(self, self.cells_name)

    def _initial_states(self, X, h0):
        """Per layer, the tuple of initial states ((h,) or (h, c)); None where h0 is None."""
        who, shape = type(self).__name__, (self.num_layers, X.shape[1], self.hidden_size)
        if h0 is None:
            return [None] * self.num_layers
        if self.n_states > 1 and (not isinstance(h0, (tuple, list)) or len(h0) != 2):
            raise ValueError(f"{who}: h must be a pair (h0, c0) or None, got {type(h0).__name__}")
        parts = h0 if self.n_states > 1 else (h0,)
        for label, state in zip(("h0", "c0"), parts):
            _check_state(who, label, state, shape)
        per_state = [ops.split(state, 0).tuple() for state in parts]
        return [tuple(states[layer] for states in per_state) for layer in range(self.num_layers)]

    def forward(self, X, h0=None):
        _check_input(type(self).__name__, X, 3, self.input_size, "(seq_len, bs, input_size)")
        states = self._initial_states(X, h0)
        use_fused = self.fused and ops.has_fused_kernels(X.device, self.kind)
        output, finals = (self._forward_fused if use_fused else self._forward_reference)(X, states)
        stacked = tuple(ops.stack([f[k] for f in finals], 0) for k in range(self.n_states))
        return output, (stacked if self.n_states > 1 else stacked[0])

    def _forward_reference(self, X, states):
        """Time step by time step, layer by layer, through one cell per layer."""
        finals = list(states)
        outputs = []
        for x in ops.split(X, 0).tuple():
            for layer, cell in enumerate(self._cells):
                state = finals[layer]
                new = cell(x, None if state is None else (state if self.n_states > 1 else state[0]))
                finals[layer] = new if self.n_states > 1 else (new,)
                x = finals[layer][0]
            outputs.append(x)
        return ops.stack(outputs, 0), finals

    def _forward_fused(self, X, states):
        """One whole-sequence op per layer."""
        finals = []
        for cell, state in zip(self._cells, states):
            if state is None:
                zeros = init.zeros(X.shape[1], self.hidden_size, device=X.device, dtype=X.dtype)
                state = (zeros,) * self.n_states
            result = self._layer_op(cell, X, state).tuple()
            X = result[0]
            finals.append(result[1:])
        return X, finals

    def _layer_op(self, cell, X, state):
        raise NotImplementedError()


class RNN(_Recurrent):
    """A multi-layer Elman RNN: for every step t and layer l, h_t^(l) = cell_l(x_t^(l), h_{t-1}^(l)), with
    x_t^(1) = x_t and x_t^(l) = h_t^(l-1) for l >= 2, and cell_l(x, h) = f(x W_ih + b_ih + h W_hh + b_hh).

    Args:
        input_size, hidden_size: feature sizes of X and of every layer's state.
        num_layers: stacked layers (default 1), one RNNCell each in `rnn_cells`.
        bias: default True. nonlinearity: 'tanh' (default) or 'relu'.
        device, dtype: default cpu, "float32".
        fused: True runs one whole-sequence op per layer (hand-written BPTT); False the per-step reference
            path; None (default) reads NEEDLE_FUSED ("0" means False). Changeable at any time.
    Shapes: X (seq_len, bs, input_size), h0 (num_layers, bs, hidden_size) or None (zeros) ->
        output (seq_len, bs, hidden_size), the last layer's h_t for every t, and
        h_n (num_layers, bs, hidden_size), each layer's final state.
    Init: as RNNCell's, per layer (layer 0 takes input_size inputs, the others hidden_size).

    >>> import needle as ndl, numpy as np
    >>> rnn = ndl.nn.RNN(4, 6, num_layers=2)
    >>> out, h_n = rnn(ndl.Tensor(np.ones((5, 3, 4))))
    >>> out.shape, h_n.shape
    ((5, 3, 6), (2, 3, 6))
    """
    kind, cells_name = "rnn", "rnn_cells"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, nonlinearity="tanh", device=None,
                 dtype="float32", fused=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.bias, self.nonlinearity = bias, nonlinearity
        super().__init__(input_size, hidden_size, num_layers, device, dtype, fused,
                         lambda size: RNNCell(size, hidden_size, bias, nonlinearity, device, dtype))

    def _layer_op(self, cell, X, state):
        return ops.rnn_layer(X, state[0], cell.W_ih, cell.W_hh, cell.bias_ih, cell.bias_hh,
                             nonlinearity=cell.nonlinearity)


class LSTM(_Recurrent):
    """A multi-layer LSTM: LSTMCell per layer in `lstm_cells`, stacked as in RNN.

    Args: input_size, hidden_size, num_layers=1, bias=True, device=None, dtype="float32", fused=None
        (as RNN's).
    Shapes: X (seq_len, bs, input_size), h = (h0, c0) each (num_layers, bs, hidden_size), or None (zeros)
        -> (output (seq_len, bs, hidden_size), (h_n, c_n) each (num_layers, bs, hidden_size)).
    Init: as LSTMCell's, per layer.
    """
    kind, cells_name, n_states = "lstm", "lstm_cells", 2

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, device=None, dtype="float32",
                 fused=None):
        self.bias = bias
        super().__init__(input_size, hidden_size, num_layers, device, dtype, fused,
                         lambda size: LSTMCell(size, hidden_size, bias, device, dtype))

    def forward(self, X, h=None):
        return super().forward(X, h)

    def _layer_op(self, cell, X, state):
        return ops.lstm_layer(X, state[0], state[1], cell.W_ih, cell.W_hh, cell.bias_ih, cell.bias_hh)


class GRU(_Recurrent):
    """A multi-layer GRU: GRUCell per layer in `gru_cells`, stacked as in RNN.

    Args: input_size, hidden_size, num_layers=1, bias=True, device=None, dtype="float32", fused=None
        (as RNN's).
    Shapes: X (seq_len, bs, input_size), h0 (num_layers, bs, hidden_size) or None (zeros) ->
        (output (seq_len, bs, hidden_size), h_n (num_layers, bs, hidden_size)).
    Init: as GRUCell's, per layer.
    """
    kind, cells_name = "gru", "gru_cells"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, device=None, dtype="float32",
                 fused=None):
        self.bias = bias
        super().__init__(input_size, hidden_size, num_layers, device, dtype, fused,
                         lambda size: GRUCell(size, hidden_size, bias, device, dtype))

    def _layer_op(self, cell, X, state):
        return ops.gru_layer(X, state[0], cell.W_ih, cell.W_hh, cell.bias_ih, cell.bias_hh)


class Embedding(Module):
    """A lookup table: row x[t, b] of `weight` for every index.

    Args: num_embeddings (vocabulary size), embedding_dim, device=None, dtype="float32".
    Shapes: x (seq_len, bs) of whole numbers in [0, num_embeddings) -> (seq_len, bs, embedding_dim).
    Init: weight (num_embeddings, embedding_dim) ~ N(0, 1).
    The gradient scatter-adds into the used rows (no one-hot matmul).
    """

    def __init__(self, num_embeddings, embedding_dim, device=None, dtype="float32"):
        super().__init__()
        for label, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Embedding: {label} must be a positive int, got {value!r}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(init.randn(num_embeddings, embedding_dim, device=device, dtype=dtype))

    def forward(self, x):
        return ops.gather_rows(self.weight, x, who="Embedding")
