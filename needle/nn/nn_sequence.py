"""Recurrent sequence modules: RNNCell, RNN, LSTMCell, LSTM, GRUCell, GRU and Embedding.

Weights are input-major, the transpose of PyTorch's: W_ih (input_size, G*hidden_size), W_hh (hidden_size,
G*hidden_size), bias_ih and bias_hh (G*hidden_size,), with G = 1 (RNN), 4 (LSTM: i, f, g, o) or 3 (GRU:
r, z, n). Every weight and bias is drawn from U(-sqrt(k), sqrt(k)), k = 1 / hidden_size.

The multi-layer modules have two paths with one meaning. The reference path walks the sequence time step
by time step and, within a step, layer by layer, through exactly one cell per layer (`split` along time,
`stack` of the outputs). The fused path (the default) runs one whole-sequence op per layer: the layer's
cell compiled (needle.compiler: the cell's `forward` traced once, its BPTT derived from the trace, both
rendered as whole-sequence kernels), the same for RNN, LSTM, GRU and any cell given to Recurrent. Modules
read their cells' weights at call time, so a replaced `cell.W_ih` receives the gradient on either path.
"""
import math
import os
import warnings

import numpy as np

from .. import init, ops
from ..autograd import Tensor
from .nn_basic import Module, Parameter

__all__ = ["RNNCell", "RNN", "LSTMCell", "LSTM", "GRUCell", "GRU", "Recurrent", "Embedding"]


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
    """Shared parameters and checks of the three cells; `gates` is G, `num_states` 1 (h) or 2 (h, c)."""
    gates = 1
    num_states = 1

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
        """X W + b, b broadcast over the batch (one affine op: three fewer ops a projection than matmul,
        reshape, broadcast_to and add, the same rounding)."""
        return ops.matmul(X, W) if b is None else ops.affine(X, W, b)

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
    num_states = 2

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


def _lengths_array(who, lengths, seq_len, bs):
    """lengths (a list, numpy array or Tensor) as an int64 numpy array of bs values in [1, seq_len]."""
    raw = np.asarray(lengths.numpy() if isinstance(lengths, Tensor) else lengths)
    if raw.dtype.kind not in "biuf":
        raise TypeError(f"{who}: lengths must be numbers, got dtype {raw.dtype}")
    if raw.shape != (bs,):
        raise ValueError(f"{who}: lengths must hold bs={bs} values, got shape {raw.shape}")
    values = raw.astype(np.int64)
    if (values != raw).any() or values.min() < 1 or values.max() > seq_len:
        raise ValueError(f"{who}: lengths must be whole numbers in [1, seq_len={seq_len}], got {raw.tolist()}")
    return values


class _GradFlow:
    """Squared norms of dL/dh_t per (layer, direction) row, step and sequence, filled during backward.

    Rows are in h_n's order. Reverse-direction rows are kept in processing order and mapped back to input
    steps when read; a sorted batch (fused path with lengths) is mapped back to the caller's order on entry.
    """

    def __init__(self, rows, seq_len, bs, lengths, order):
        self.squares = np.zeros((rows, seq_len, bs))
        self.reversed_rows = set()
        self.filled = False
        self.lengths, self.order = lengths, order

    def record_block(self, row, reverse, squares):
        """squares (seq_len, bs) in processing order of the (possibly sorted) batch."""
        squares = np.asarray(squares, dtype=np.float64)
        if self.order is not None:
            self.squares[row][:, self.order] = squares
        else:
            self.squares[row] = squares
        self._mark(row, reverse)

    def block_recorder(self, row, reverse):
        """A fused op's callback: (seq_len, bs) squared norms of `row`, in processing order."""
        def record(squares):
            self.record_block(row, reverse, squares)
        return record

    def step_recorder(self, row, step, reverse):
        """A probe's callback: (bs,) squared norms of processing step `step` of `row`."""
        def record(squares):
            self.squares[row, step] = squares
            self._mark(row, reverse)
        return record

    def _mark(self, row, reverse):
        if reverse:
            self.reversed_rows.add(row)
        self.filled = True

    def result(self):
        squares = self.squares.copy()
        seq_len, bs = squares.shape[1:]
        lengths = np.full(bs, seq_len) if self.lengths is None else self.lengths
        columns = np.arange(bs)[None, :]
        for row in self.reversed_rows:
            squares[row] = squares[row][ops.reversal_index(lengths, seq_len), columns]
        return np.sqrt(squares.sum(axis=2))


class _Recurrent(Module):
    """A stack of `num_layers` layers of one cell per direction, each cell shared by all time steps.

    Subclasses set `cells_name` (the list attribute) and `n_states`. The fused path runs each layer's cell
    compiled (compiler.fused.CompiledLayer) where the device's arrays are numpy's; elsewhere the reference path.
    """
    cells_name = None
    n_states = 1

    def __init__(self, input_size, hidden_size, num_layers, device, dtype, fused, make_cell, batch_first=False,
                 dropout=0.0, bidirectional=False, recompute_every=None, record_grad_flow=False):
        super().__init__()
        who = type(self).__name__
        _check_sizes(who, input_size, hidden_size, num_layers)
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"{who}: dropout must be a number in [0, 1), got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(f"{who}: dropout={dropout} acts between layers, so it has no effect with num_layers=1",
                          UserWarning, stacklevel=3)
        if recompute_every is not None and (not isinstance(recompute_every, int) or isinstance(recompute_every, bool)
                                            or recompute_every < 1):
            raise ValueError(f"{who}: recompute_every must be a positive int or None, got {recompute_every!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.device, self.dtype = device, dtype
        self.batch_first, self.dropout, self.bidirectional = batch_first, float(dropout), bidirectional
        self.recompute_every, self.record_grad_flow = recompute_every, record_grad_flow
        directions = 2 if bidirectional else 1
        sizes = [input_size] + [directions * hidden_size] * (num_layers - 1)
        setattr(self, self.cells_name, [make_cell(size) for size in sizes])
        if bidirectional:
            setattr(self, self.cells_name + "_reverse", [make_cell(size) for size in sizes])
        self.fused = _fused_default(fused)
        self._grad_flow = None
        self._compiled = {}   # id(cell) -> (signature, CompiledCell)

    @property
    def grad_flow(self):
        """(num_layers * D, seq_len) numpy array of ||dL/dh_t|| from the latest backward, or None."""
        recorder = self._grad_flow
        return recorder.result() if recorder is not None and recorder.filled else None

    def _layer_cells(self, layer):
        cells = [getattr(self, self.cells_name)[layer]]
        if self.bidirectional:
            cells.append(getattr(self, self.cells_name + "_reverse")[layer])
        return cells

    def _initial_states(self, X, h0):
        """Per (layer, direction) in h_n's order, the tuple of initial states ((h,) or (h, c)), or None."""
        directions = 2 if self.bidirectional else 1
        rows = self.num_layers * directions
        who, shape = type(self).__name__, (rows, X.shape[1], self.hidden_size)
        if h0 is None:
            return [None] * rows
        if self.n_states > 1 and (not isinstance(h0, (tuple, list)) or len(h0) != self.n_states):
            expected = "a pair (h0, c0)" if self.n_states == 2 else f"a tuple of {self.n_states} states"
            raise ValueError(f"{who}: h must be {expected} or None, got {type(h0).__name__}")
        parts = h0 if self.n_states > 1 else (h0,)
        labels = ("h0", "c0") if self.n_states <= 2 else tuple(f"state[{k}]" for k in range(self.n_states))
        for label, state in zip(labels, parts):
            _check_state(who, label, state, shape)
        per_state = [ops.split(state, 0).tuple() for state in parts]
        return [tuple(states[row] for states in per_state) for row in range(rows)]

    def _dropout_masks(self, X):
        """One mask per layer but the last, (seq_len, bs, D * hidden), drawn now in layer order."""
        if not self.training or self.dropout == 0.0:
            return [None] * self.num_layers
        width = (2 if self.bidirectional else 1) * self.hidden_size
        keep = 1.0 - self.dropout
        masks = [init.randb(X.shape[0], X.shape[1], width, p=keep, device=X.device, dtype=X.dtype) / keep
                 for _ in range(self.num_layers - 1)]
        return masks + [None]

    def forward(self, X, h0=None, lengths=None):
        who = type(self).__name__
        layout = "(bs, seq_len, input_size)" if self.batch_first else "(seq_len, bs, input_size)"
        _check_input(who, X, 3, self.input_size, layout)
        if self.batch_first:
            X = ops.transpose(X, (0, 1))
        seq_len, bs = X.shape[0], X.shape[1]
        if lengths is not None:
            lengths = _lengths_array(who, lengths, seq_len, bs)
            if (lengths == seq_len).all():
                lengths = None  # every sequence is full: the plain path is the same computation
        states = self._initial_states(X, h0)
        masks = self._dropout_masks(X)
        fused = self._fused_for(X)
        order = None
        if fused and lengths is not None and (np.diff(lengths) > 0).any():
            # sort by length once per call, so each step runs only the sequences still going (the kernels
            # would sort an unsorted batch themselves, but once per layer)
            order = np.argsort(-lengths, kind="stable")
            X = ops.reorder(X, order, 1)
            states = [None if s is None else tuple(ops.reorder(x, order, 0) for x in s) for s in states]
            masks = [None if m is None else ops.reorder(m, order, 1) for m in masks]
            lengths = lengths[order]
        rows = len(states)
        recorder = _GradFlow(rows, seq_len, bs, lengths if order is None else lengths[np.argsort(order)], order) \
            if self.record_grad_flow else None
        if fused or self.bidirectional:
            output, finals = self._forward_by_layer(X, states, lengths, masks, recorder, fused)
        else:
            output, finals = self._forward_by_step(X, states, lengths, masks, recorder)
        if order is not None:
            inverse = np.argsort(order)
            output = ops.reorder(output, inverse, 1)
            finals = [tuple(ops.reorder(x, inverse, 0) for x in f) for f in finals]
        self._grad_flow = recorder
        stacked = tuple(ops.stack([f[k] for f in finals], 0) for k in range(self.n_states))
        if self.batch_first:
            output = ops.transpose(output, (0, 1))
        return output, (stacked if self.n_states > 1 else stacked[0])

    def _fused_for(self, X):
        """Whether this call takes the fused path; if so, every cell's current kernels are in _compiled."""
        if not self._fused_wanted():
            return False
        from ..compiler.blas import gemm
        from ..compiler.trace import Unsupported
        try:
            if X.device.xp is not np:
                raise Unsupported(f"a device without compiled kernels ({X.device!r})")
            if gemm(X.dtype) is None:
                raise Unsupported("a numpy whose BLAS has no CBLAS gemm to call")
            width = (2 if self.bidirectional else 1) * self.hidden_size
            for layer in range(self.num_layers):
                for cell in self._layer_cells(layer):
                    self._compiled_cell(cell, self.input_size if layer == 0 else width)
        except Unsupported as error:
            return self._not_compiled(error)
        return True

    def _fused_wanted(self):
        """Whether the fused path is asked for (the `fused` flag, resolved at construction)."""
        return self.fused

    def _not_compiled(self, error):
        """What a call does when the cells cannot be compiled (`error`, an Unsupported): the reference path
        (a device without compiled kernels)."""
        return False

    def _compiled_cell(self, cell, in_features):
        """The cell's compiled kernels, traced again only when its tensors or plain attributes change."""
        from ..compiler.trace import cell_signature
        signature = (in_features, cell_signature(cell))
        known = self._compiled.get(id(cell))
        if known is None or known[0] != signature:
            from ..compiler.fused import compile_cell
            known = (signature, compile_cell(cell, in_features))
            self._compiled[id(cell)] = known
        return known[1]

    def _pairs_side_by_side(self, X):
        """Whether a fused bidirectional layer runs as one op with both directions' loops side by side."""
        return X.device.kernel("run_phased") is not None

    def _zeros_state(self, bs, like):
        zeros = init.zeros(bs, self.hidden_size, device=like.device, dtype=like.dtype)
        return (zeros,) * self.n_states

    def _step(self, cell, x, state, active, probe):
        """One cell step; with `active` (bs, 1) of 1.0/0.0, finished sequences keep their state and output 0."""
        new = cell(x, None if state is None else (state if self.n_states > 1 else state[0]))
        new = tuple(new) if self.n_states > 1 else (new,)
        if probe is not None:
            new = (ops.GradProbe(probe)(new[0]),) + new[1:]
        if active is None:
            return new, new[0]
        state = self._zeros_state(x.shape[0], x) if state is None else state
        inactive = 1.0 - active
        merged = tuple(n * active + s * inactive for n, s in zip(new, state))
        return merged, new[0] * active

    def _active(self, X, lengths):
        """Per step, a (bs, 1) constant: 1.0 where the sequence is still going; None without lengths."""
        if lengths is None:
            return [None] * X.shape[0]
        return [Tensor((lengths > t).astype(np.float32)[:, None], device=X.device, dtype=X.dtype,
                       requires_grad=False) for t in range(X.shape[0])]

    def _forward_by_step(self, X, states, lengths, masks, recorder):
        """The reference path as specified: time step by time step and, within a step, layer by layer."""
        finals = list(states)
        cells = getattr(self, self.cells_name)
        active = self._active(X, lengths)
        step_masks = [None if m is None else ops.split(m, 0).tuple() for m in masks]
        outputs = []
        for t, x in enumerate(ops.split(X, 0).tuple()):
            for layer, cell in enumerate(cells):
                probe = recorder.step_recorder(layer, t, False) if recorder else None
                finals[layer], x = self._step(cell, x, finals[layer], active[t], probe)
                if step_masks[layer] is not None:
                    x = x * step_masks[layer][t]
            outputs.append(x)
        return ops.stack(outputs, 0), finals

    def _forward_by_layer(self, X, states, lengths, masks, recorder, fused):
        """Layer by layer (bidirectional layers need the whole sequence of the layer below), each direction
        as one fused op or as a walk over time steps through its cell; where the backend can, a fused
        bidirectional layer is one op that runs both directions' loops side by side."""
        finals = []
        directions = 2 if self.bidirectional else 1
        pairs = fused and directions == 2 and self._pairs_side_by_side(X)
        for layer in range(self.num_layers):
            if pairs:
                X, pair_finals = self._run_fused_pair(self._layer_cells(layer), X, states[2 * layer:2 * layer + 2],
                                                      lengths, recorder, 2 * layer)
                finals += pair_finals
                if masks[layer] is not None:
                    X = X * masks[layer]
                continue
            outputs = []
            for direction, cell in enumerate(self._layer_cells(layer)):
                row = layer * directions + direction
                state = states[row]
                X_dir = X if direction == 0 else self._reverse(X, lengths)
                run = self._run_fused if fused else self._run_by_step
                Y, final = run(cell, X_dir, state, lengths, recorder, row, direction == 1)
                outputs.append(Y if direction == 0 else self._reverse(Y, lengths))
                finals.append(final)
            X = outputs[0] if directions == 1 else ops.reshape(
                ops.stack(outputs, 2), outputs[0].shape[:2] + (2 * self.hidden_size,))
            if masks[layer] is not None:
                X = X * masks[layer]
        return X, finals

    @staticmethod
    def _reverse(X, lengths):
        return ops.flip(X, (0,)) if lengths is None else ops.reverse_sequences(X, lengths)

    def _fused_parts(self, cell, X, state, lengths, recorder, row, reverse):
        """(the CompiledLayer op of one layer and direction, its inputs after X): run alone or, for a
        bidirectional layer, beside the other direction's (ops.bidirectional_layer)."""
        from ..compiler.fused import CompiledLayer
        compiled = self._compiled[id(cell)][1]   # brought up to date by _fused_for at the start of this call
        state = tuple(state) if state is not None else self._zeros_state(X.shape[1], X)
        record = recorder.block_recorder(row, reverse) if recorder is not None else None
        op = CompiledLayer(compiled, lengths, self.recompute_every, record, type(self).__name__)
        return op, state + tuple(compiled.parameters(cell))

    def _run_fused(self, cell, X, state, lengths, recorder, row, reverse):
        op, inputs = self._fused_parts(cell, X, state, lengths, recorder, row, reverse)
        result = op(X, *inputs).tuple()
        return result[0], result[1:]

    def _run_fused_pair(self, cells, X, states, lengths, recorder, row):
        """Both directions of a layer as one op; returns (output (T, B, 2H), [forward final, reverse final])."""
        forward, forward_inputs = self._fused_parts(cells[0], X, states[0], lengths, recorder, row, False)
        reverse, reverse_inputs = self._fused_parts(cells[1], X, states[1], lengths, recorder, row + 1, True)
        result = ops.bidirectional_layer(X, forward, forward_inputs, reverse, reverse_inputs, lengths).tuple()
        n = self.n_states
        return result[0], [result[1:1 + n], result[1 + n:]]

    def _run_by_step(self, cell, X, state, lengths, recorder, row, reverse):
        active = self._active(X, lengths)
        outputs = []
        for t, x in enumerate(ops.split(X, 0).tuple()):
            probe = recorder.step_recorder(row, t, reverse) if recorder is not None else None
            state, y = self._step(cell, x, state, active[t], probe)
            outputs.append(y)
        return ops.stack(outputs, 0), state


class RNN(_Recurrent):
    """A multi-layer Elman RNN: for every step t and layer l, h_t^(l) = cell_l(x_t^(l), h_{t-1}^(l)), with
    x_t^(1) = x_t and x_t^(l) = h_t^(l-1) for l >= 2, and cell_l(x, h) = f(x W_ih + b_ih + h W_hh + b_hh).

    Args:
        input_size, hidden_size: feature sizes of X and of every layer's state.
        num_layers: stacked layers (default 1), one RNNCell each in `rnn_cells`.
        bias: default True. nonlinearity: 'tanh' (default) or 'relu'.
        device, dtype: default cpu, "float32".
        fused: True runs one whole-sequence op per layer (the cell compiled, as in Recurrent; on a device
            without compiled kernels the reference path); False the per-step reference path; None (default)
            reads NEEDLE_FUSED ("0" means False). Changeable at any time.
        batch_first: X and output are (bs, seq_len, ...) (default False; h0 and h_n keep their layout).
        dropout: on every layer's output but the last, in training only (default 0).
        bidirectional: D = 2, reverse cells in `rnn_cells_reverse`; output [forward, reverse] per step.
        recompute_every: k keeps every k-th step's state in the fused backward and recomputes the rest
            (memory O(seq_len / k + k) per layer; results equal to rounding). Default None keeps all.
        record_grad_flow: after backward, `grad_flow` holds ||dL/dh_t|| per (layer, direction) and step.
    Shapes: X (seq_len, bs, input_size), h0 (num_layers * D, bs, hidden_size) or None (zeros), lengths (bs,)
        or None -> output (seq_len, bs, D * hidden_size), the last layer's h_t for every t (zero past each
        sequence's length), and h_n (num_layers * D, bs, hidden_size), each layer's final state.
    Init: as RNNCell's, per layer (layer 0 takes input_size inputs, the others D * hidden_size).

    >>> import needle as ndl, numpy as np
    >>> rnn = ndl.nn.RNN(4, 6, num_layers=2)
    >>> out, h_n = rnn(ndl.Tensor(np.ones((5, 3, 4))))
    >>> out.shape, h_n.shape
    ((5, 3, 6), (2, 3, 6))
    """
    cells_name = "rnn_cells"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, nonlinearity="tanh", device=None,
                 dtype="float32", fused=None, batch_first=False, dropout=0.0, bidirectional=False,
                 recompute_every=None, record_grad_flow=False):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.bias, self.nonlinearity = bias, nonlinearity
        super().__init__(input_size, hidden_size, num_layers, device, dtype, fused,
                         lambda size: RNNCell(size, hidden_size, bias, nonlinearity, device, dtype),
                         batch_first, dropout, bidirectional, recompute_every, record_grad_flow)


class LSTM(_Recurrent):
    """A multi-layer LSTM: LSTMCell per layer in `lstm_cells` (and `lstm_cells_reverse`), stacked as in RNN.

    Args: input_size, hidden_size, num_layers=1, bias=True, device=None, dtype="float32", fused=None,
        batch_first=False, dropout=0.0, bidirectional=False, recompute_every=None, record_grad_flow=False
        (as RNN's).
    Shapes: X (seq_len, bs, input_size), h = (h0, c0) each (num_layers * D, bs, hidden_size), or None (zeros),
        lengths (bs,) or None -> (output (seq_len, bs, D * hidden_size), (h_n, c_n) each
        (num_layers * D, bs, hidden_size)).
    Init: as LSTMCell's, per layer.
    """
    cells_name, n_states = "lstm_cells", 2

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, device=None, dtype="float32",
                 fused=None, batch_first=False, dropout=0.0, bidirectional=False, recompute_every=None,
                 record_grad_flow=False):
        self.bias = bias
        super().__init__(input_size, hidden_size, num_layers, device, dtype, fused,
                         lambda size: LSTMCell(size, hidden_size, bias, device, dtype),
                         batch_first, dropout, bidirectional, recompute_every, record_grad_flow)

    def forward(self, X, h=None, lengths=None):
        return super().forward(X, h, lengths)


class GRU(_Recurrent):
    """A multi-layer GRU: GRUCell per layer in `gru_cells` (and `gru_cells_reverse`), stacked as in RNN.

    Args: input_size, hidden_size, num_layers=1, bias=True, device=None, dtype="float32", fused=None,
        batch_first=False, dropout=0.0, bidirectional=False, recompute_every=None, record_grad_flow=False
        (as RNN's).
    Shapes: X (seq_len, bs, input_size), h0 (num_layers * D, bs, hidden_size) or None (zeros), lengths (bs,)
        or None -> (output (seq_len, bs, D * hidden_size), h_n (num_layers * D, bs, hidden_size)).
    Init: as GRUCell's, per layer.
    """
    cells_name = "gru_cells"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, device=None, dtype="float32",
                 fused=None, batch_first=False, dropout=0.0, bidirectional=False, recompute_every=None,
                 record_grad_flow=False):
        self.bias = bias
        super().__init__(input_size, hidden_size, num_layers, device, dtype, fused,
                         lambda size: GRUCell(size, hidden_size, bias, device, dtype),
                         batch_first, dropout, bidirectional, recompute_every, record_grad_flow)


class Recurrent(_Recurrent):
    """A multi-layer recurrent network of any cell: for every step t and layer l,
    state_t^(l) = cell_l(x_t^(l), state_{t-1}^(l)), with x_t^(1) = x_t and x_t^(l) = h_t^(l-1) (the first
    Tensor of the state) for l >= 2: the seed's multi-layer RNN, one cell per layer shared by every step.

    A cell is a Module with `hidden_size`, `num_states` (1: a state h; 2 or more: a tuple (h, c, ...);
    default 1) and `forward(X, state)` returning the next state in the same form. The fused path compiles the
    cell (needle.compiler): its `forward` is traced once, its BPTT derived from the trace, and both run as
    whole-sequence kernels (the input products hoisted into one GEMM, each step's recurrent products as
    GEMMs and everything between them in compiled loops, each weight gradient one GEMM after the loop).

    Args:
        make_cell: called as make_cell(in_features) once per layer and direction (input_size for layer 0,
            D * hidden_size after it); every cell must have the same hidden_size and num_states.
        input_size: features of X. num_layers: default 1.
        fused: None (default) compiles the cell when it can, else takes the reference path with one warning
            naming what stopped it; True requires compilation (ValueError otherwise); False always takes the
            reference path. NEEDLE_FUSED=0 makes None mean False. Changeable at any time.
        batch_first, dropout: as RNN's. device, dtype: where X is expected (default cpu, "float32").
        bidirectional: as RNN's (D = 2; reverse cells in `cells_reverse`; the compiled path runs a layer's
            two directions as one op, their loops side by side on two threads as RNN's fused path does).
        recompute_every: k (a positive int) runs the compiled forward in pieces of k steps and keeps only
            each piece's initial states for backward, which runs each piece again (memory O(seq_len/k + k)
            steps instead of O(seq_len); results equal to rounding); the reference path ignores it.
        record_grad_flow: as RNN's (`grad_flow`, (num_layers * D, seq_len) of ||dL/dh_t|| after each
            backward), on both paths; the compiled backward computes the norms in its loop.
    Shapes: X (seq_len, bs, input_size), state None (zeros) or (num_layers * D, bs, hidden_size) (a tuple of
        num_states such Tensors for several states), lengths (bs,) or None -> (output (seq_len, bs,
        D * hidden_size), the last layer's h_t, zero past each sequence's length; state_n in state's form).

    >>> import needle as ndl, numpy as np
    >>> rnn = ndl.nn.Recurrent(lambda n: ndl.nn.GRUCell(n, 6), input_size=4, num_layers=2)
    >>> out, h_n = rnn(ndl.Tensor(np.ones((5, 3, 4))))
    >>> out.shape, h_n.shape
    ((5, 3, 6), (2, 3, 6))
    """
    cells_name = "cells"

    def __init__(self, make_cell, input_size, num_layers=1, *, fused=None, batch_first=False, dropout=0.0,
                 device=None, dtype="float32", bidirectional=False, recompute_every=None, record_grad_flow=False):
        if not callable(make_cell):
            raise TypeError(f"Recurrent: make_cell must be callable, got {type(make_cell).__name__}")
        _check_sizes("Recurrent", input_size, 1, num_layers)
        first = make_cell(input_size)
        for attr in ("hidden_size", "forward"):
            if not hasattr(first, attr):
                raise TypeError(f"Recurrent: make_cell must return a cell with {attr}, got {type(first).__name__}")
        self.hidden_size = first.hidden_size
        self.n_states = getattr(first, "num_states", 1)

        def make(size):
            cell = make_cell(size)
            got = (getattr(cell, "hidden_size", None), getattr(cell, "num_states", 1))
            if got != (self.hidden_size, self.n_states):
                raise ValueError(f"Recurrent: every layer's cell must have hidden_size {self.hidden_size} and "
                                 f"num_states {self.n_states} (layer 0's), got hidden_size {got[0]} and "
                                 f"num_states {got[1]}")
            return cell

        unused = [first]   # layer 0's forward cell, made above; the base class asks for it first

        def build(size):
            return unused.pop() if unused else make(size)

        super().__init__(input_size, self.hidden_size, num_layers, device, dtype, False, build, batch_first,
                         dropout, bidirectional, recompute_every, record_grad_flow)
        self.fused = fused
        self._warned = False

    def _initial_states(self, X, h0):
        states = super()._initial_states(X, h0)
        return [self._zeros_state(X.shape[1], X) if s is None else s for s in states]

    def _fused_wanted(self):
        if self.fused is None:   # kept as given (API.md), so the environment is read at each call
            return os.environ.get("NEEDLE_FUSED", "1") != "0"
        return bool(self.fused)

    def _not_compiled(self, error):
        if self.fused:
            raise ValueError(f"Recurrent: cannot compile the cell {type(self.cells[0]).__name__}: "
                             f"it uses {error.what}") from None
        if not self._warned:
            self._warned = True
            warnings.warn(f"Recurrent: the cell {type(self.cells[0]).__name__} uses {error.what}, which "
                          "a compiled step cannot run; taking the reference path", UserWarning, stacklevel=5)
        return False


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
