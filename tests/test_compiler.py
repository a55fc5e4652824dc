"""The cell compiler (needle.compiler) and nn.Recurrent: compiled == reference path == torch, for cells that
exercise every supported op; the stages on their own (trace, derive, render); fallbacks; the disk cache."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import needle as ndl
from needle import nn, ops
from needle.testing import gradcheck

from conftest import ATOL, RTOL

H = 6


def _param(*shape, dtype="float32"):
    return nn.Parameter(ndl.init.rand(*shape, low=-0.5, high=0.5, dtype=dtype))


def _bias(b, rows):
    """b (F,) broadcast over `rows` rows."""
    return ops.broadcast_to(ops.reshape(b, (1, b.shape[0])), (rows, b.shape[0]))


def _layer_norm(v, gain, bias):
    """LayerNorm over the features of v (bs, F), with its own gain and bias (F,)."""
    bs, width = v.shape
    mean = ops.broadcast_to(ops.reshape(v.sum(axes=(1,)) / width, (bs, 1)), v.shape)
    centred = v - mean
    var = ops.broadcast_to(ops.reshape((centred * centred).sum(axes=(1,)) / width, (bs, 1)), v.shape)
    return centred / ops.power_scalar(var + 1e-5, 0.5) * _bias(gain, v.shape[0]) + _bias(bias, v.shape[0])


class CIFGCell(nn.Module):
    """Coupled input-forget gate LSTM: f, g, o over x W + h U + b; c' = f c + (1 - f) g; h' = o tanh(c')."""
    num_states = 2

    def __init__(self, n, hidden, dtype="float32"):
        super().__init__()
        self.hidden_size = hidden
        self.W, self.U, self.b = _param(n, 3 * hidden, dtype=dtype), _param(hidden, 3 * hidden, dtype=dtype), \
            _param(3 * hidden, dtype=dtype)

    def forward(self, X, state):
        h, c = state
        gates = X @ self.W + h @ self.U + _bias(self.b, h.shape[0])
        f, g, o = ops.split(ops.reshape(gates, (X.shape[0], 3, self.hidden_size)), 1)
        f, g, o = ops.sigmoid(f), ops.tanh(g), ops.sigmoid(o)
        c = f * c + (1 - f) * g
        return o * ops.tanh(c), c


class MGUCell(nn.Module):
    """Minimal gated unit: its second recurrent product multiplies the state by a gate first."""

    def __init__(self, n, hidden, dtype="float32"):
        super().__init__()
        self.hidden_size = hidden
        self.W_f, self.U_f, self.b_f = _param(n, hidden, dtype=dtype), _param(hidden, hidden, dtype=dtype), \
            _param(hidden, dtype=dtype)
        self.W_n, self.U_n, self.b_n = _param(n, hidden, dtype=dtype), _param(hidden, hidden, dtype=dtype), \
            _param(hidden, dtype=dtype)

    def forward(self, X, h):
        f = ops.sigmoid(X @ self.W_f + h @ self.U_f + _bias(self.b_f, h.shape[0]))
        n = ops.tanh(X @ self.W_n + (f * h) @ self.U_n + _bias(self.b_n, h.shape[0]))
        return (1 - f) * h + f * n


class LNLSTMCell(nn.Module):
    """A layer-normalised LSTM: LayerNorm over x W_ih, over h W_hh and over c', each with gain and bias."""
    num_states = 2

    def __init__(self, n, hidden, dtype="float32"):
        super().__init__()
        self.hidden_size = hidden
        self.W_ih, self.W_hh = _param(n, 4 * hidden, dtype=dtype), _param(hidden, 4 * hidden, dtype=dtype)
        self.bias = _param(4 * hidden, dtype=dtype)
        self.g_ih, self.b_ih = _param(4 * hidden, dtype=dtype), _param(4 * hidden, dtype=dtype)
        self.g_hh, self.b_hh = _param(4 * hidden, dtype=dtype), _param(4 * hidden, dtype=dtype)
        self.g_c, self.b_c = _param(hidden, dtype=dtype), _param(hidden, dtype=dtype)

    def forward(self, X, state):
        h, c = state
        pre = _layer_norm(X @ self.W_ih, self.g_ih, self.b_ih) + _layer_norm(h @ self.W_hh, self.g_hh, self.b_hh)
        pre = pre + _bias(self.bias, pre.shape[0])
        i, f, g, o = ops.split(ops.reshape(pre, (X.shape[0], 4, self.hidden_size)), 1)
        c = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
        return ops.sigmoid(o) * ops.tanh(_layer_norm(c, self.g_c, self.b_c)), c


class EveryOpCell(nn.Module):
    """A cell of our own that uses every supported op: divide, exp, log, power_scalar, relu, summation."""

    def __init__(self, n, hidden, dtype="float32"):
        super().__init__()
        self.hidden_size = hidden
        self.W, self.U, self.b = _param(n, hidden, dtype=dtype), _param(hidden, hidden, dtype=dtype), \
            _param(hidden, dtype=dtype)

    def forward(self, X, h):
        a = X @ self.W + h @ self.U + _bias(self.b, h.shape[0])
        e = ops.exp(-ops.relu(a))                         # in (0, 1]
        soft = ops.log(e + 1.0)                           # log(1 + e), finite
        s = ops.broadcast_to(ops.reshape((a * a).sum(axes=(1,)), (h.shape[0], 1)), h.shape)
        n = a / ops.power_scalar(s + 1.0, 0.5)
        return ops.tanh(n - soft * h) / 2.0 + ops.sigmoid(a) * h / (e + 1.0)


# ---- torch twins of the cells (torch ops and autograd) -------------------------------------------------

def _t(p):
    return torch.tensor(p.numpy(), dtype=torch.float64, requires_grad=True)


def _torch_ln(v, g, b):
    mean = v.mean(dim=1, keepdim=True)
    var = ((v - mean) ** 2).mean(dim=1, keepdim=True)
    return (v - mean) / torch.sqrt(var + 1e-5) * g + b


def torch_step(cell, p, x, state):
    name = type(cell).__name__
    if name == "CIFGCell":
        h, c = state
        f, g, o = (x @ p["W"] + h @ p["U"] + p["b"]).chunk(3, dim=1)
        f, g, o = torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + (1 - f) * g
        return o * torch.tanh(c), c
    if name == "MGUCell":
        h = state
        f = torch.sigmoid(x @ p["W_f"] + h @ p["U_f"] + p["b_f"])
        n = torch.tanh(x @ p["W_n"] + (f * h) @ p["U_n"] + p["b_n"])
        return (1 - f) * h + f * n
    if name == "LNLSTMCell":
        h, c = state
        pre = _torch_ln(x @ p["W_ih"], p["g_ih"], p["b_ih"]) + _torch_ln(h @ p["W_hh"], p["g_hh"], p["b_hh"])
        i, f, g, o = (pre + p["bias"]).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(_torch_ln(c, p["g_c"], p["b_c"])), c
    h = state
    a = x @ p["W"] + h @ p["U"] + p["b"]
    e = torch.exp(-torch.relu(a))
    soft = torch.log(e + 1.0)
    n = a / torch.sqrt((a * a).sum(dim=1, keepdim=True) + 1.0)
    return torch.tanh(n - soft * h) / 2.0 + torch.sigmoid(a) * h / (e + 1.0)


def torch_recurrent(module, X, state, lengths, upstream):
    """The multi-layer recurrence in torch (float64), finished sequences frozen, outputs zero past their end;
    returns outputs, final states and gradients (X, initial states, every parameter) of sum(out * upstream)
    + sum of squares of the final states."""
    n = module.n_states
    T, B = X.shape[:2]
    Xt = torch.tensor(X, dtype=torch.float64, requires_grad=True)
    params = [{k: _t(v) for k, v in vars(cell).items() if isinstance(v, ndl.Tensor)} for cell in module.cells]
    s0 = [torch.tensor(s, dtype=torch.float64, requires_grad=True) for s in state]
    active = torch.ones(T, B, 1, dtype=torch.float64) if lengths is None else \
        torch.tensor((np.asarray(lengths)[None, :] > np.arange(T)[:, None]).astype(np.float64))[..., None]
    finals = [[s0[k][layer] for k in range(n)] for layer in range(module.num_layers)]
    outs = []
    for t in range(T):
        x = Xt[t]
        for layer, cell in enumerate(module.cells):
            st = finals[layer]
            new = torch_step(cell, params[layer], x, tuple(st) if n > 1 else st[0])
            new = list(new) if n > 1 else [new]
            finals[layer] = [nw * active[t] + old * (1 - active[t]) for nw, old in zip(new, st)]
            x = new[0] * active[t]
        outs.append(x)
    out = torch.stack(outs)
    fin = [torch.stack([finals[layer][k] for layer in range(module.num_layers)]) for k in range(n)]
    loss = (out * torch.tensor(upstream)).sum() + sum((f * f).sum() for f in fin)
    loss.backward()
    grads = [Xt.grad.numpy()] + [s.grad.numpy() for s in s0]
    grads += [params[layer][k].grad.numpy() for layer, cell in enumerate(module.cells)
              for k, v in vars(cell).items() if isinstance(v, ndl.Tensor)]
    return [out.detach().numpy()] + [f.detach().numpy() for f in fin] + grads


def run_needle(module, X, state, lengths, upstream, batch_first=False, dtype="float32"):
    for p in module.parameters():
        p.grad = None
    Xn = ndl.Tensor(X.transpose(1, 0, 2) if batch_first else X, dtype=dtype)
    st = None if state is None else [ndl.Tensor(s, dtype=dtype) for s in state]
    if st is not None:
        st = st[0] if module.n_states == 1 else tuple(st)
    out, fin = module(Xn, st, lengths)
    fin = [fin] if module.n_states == 1 else list(fin)
    up = upstream.transpose(1, 0, 2) if batch_first else upstream
    loss = (out * ndl.Tensor(up, dtype=dtype)).sum() + sum((f * f).sum() for f in fin)
    loss.backward()
    o = out.numpy().transpose(1, 0, 2) if batch_first else out.numpy()
    gx = Xn.grad.numpy().transpose(1, 0, 2) if batch_first else Xn.grad.numpy()
    gs = [] if state is None else [s.grad.numpy() for s in (st if isinstance(st, tuple) else (st,))]
    cells = list(module.cells) + list(getattr(module, "cells_reverse", None) or [])
    gp = [v.grad.numpy() for cell in cells for v in vars(cell).values() if isinstance(v, ndl.Tensor)]
    return [o] + [f.numpy() for f in fin] + [gx] + gs + gp


CELLS = {"cifg": CIFGCell, "mgu": MGUCell, "lnlstm": LNLSTMCell, "everyop": EveryOpCell}
# (seq_len, batch, state given, batch_first, lengths)
CONFIGS = [(13, 7, True, False, False), (1, 1, False, False, False), (13, 1, True, True, False),
           (1, 7, False, True, False), (13, 7, False, False, True), (13, 7, True, True, True)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "T{}-B{}-{}-{}-{}".format(
    c[0], c[1], "state" if c[2] else "none", "bf" if c[3] else "tm", "len" if c[4] else "full"))
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("kind", sorted(CELLS))
def test_compiled_equals_reference_and_torch(kind, layers, config):
    T, B, given, batch_first, with_lengths = config
    rng = np.random.default_rng(layers * 100 + T + B)
    module = nn.Recurrent(lambda n: CELLS[kind](n, H), 5, layers, fused=True, batch_first=batch_first)
    X = rng.standard_normal((T, B, 5)).astype(np.float32)
    state = [rng.standard_normal((layers, B, H)).astype(np.float32) for _ in range(module.n_states)]
    lengths = rng.integers(1, T + 1, B) if with_lengths else None
    if with_lengths and B > 1:
        lengths[0] = T
    upstream = rng.standard_normal((T, B, H))
    fused = run_needle(module, X, state if given else None, lengths, upstream, batch_first)
    module.fused = False
    reference = run_needle(module, X, state if given else None, lengths, upstream, batch_first)
    expected = torch_recurrent(module, X, state if given else [np.zeros_like(s) for s in state], lengths, upstream)
    if not given:
        expected = expected[:module.n_states + 2] + expected[module.n_states + 2 + module.n_states:]
    assert len(fused) == len(reference) == len(expected)
    for got, ref, want in zip(fused, reference, expected):
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("every", [1, 4, 13, 50])
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("kind", ["cifg", "mgu", "lnlstm"])
def test_recompute_every_equals_whole_sequence(kind, with_lengths, every):
    """recompute_every k: the same outputs, final states and gradients (to rounding: float64), and the
    forward keeps only each piece's initial states."""
    T, B, layers = 13, 6, 2
    rng = np.random.default_rng(every + 7 * with_lengths)
    whole = nn.Recurrent(lambda n: CELLS[kind](n, H, dtype="float64"), 5, layers, fused=True, dtype="float64")
    pieces = nn.Recurrent(lambda n: CELLS[kind](n, H, dtype="float64"), 5, layers, fused=True, dtype="float64",
                          recompute_every=every, batch_first=True)
    for mine, theirs in zip(pieces.parameters(), whole.parameters()):
        mine.data = theirs.data
    X = rng.standard_normal((T, B, 5))
    state = [rng.standard_normal((layers, B, H)) for _ in range(whole.n_states)]
    lengths = rng.integers(1, T + 1, B) if with_lengths else None
    upstream = rng.standard_normal((T, B, H))
    want = run_needle(whole, X, state, lengths, upstream, dtype="float64")
    got = run_needle(pieces, X, state, lengths, upstream, batch_first=True, dtype="float64")
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)

    from needle.compiler.fused import CompiledLayer
    out, _ = pieces(ndl.Tensor(X.transpose(1, 0, 2), dtype="float64"), None, lengths)
    layers_seen = [node.op for node in ndl.autograd._topo_order(out, every_input=True)
                   if isinstance(node.op, CompiledLayer)]   # every layer's op, found by walking the graph back
    assert len(layers_seen) == layers
    for op in layers_seen:
        if every < T:                             # x, each piece's initial states, M, P, nbs: no step arrays
            assert len(op.saved) == 5 and len(op.saved[1]) == -(-T // every)
            assert all(a.shape == (B, H) for states in op.saved[1] for a in states)
        else:                                     # one piece: every state of every step, as without
            assert op.saved[1][0].shape == (T + 1, B, H)


def test_recompute_every_checked():
    for bad in (0, -2, 1.5, True, "3"):
        with pytest.raises(ValueError, match="recompute_every"):
            nn.Recurrent(lambda n: CIFGCell(n, 4), 3, recompute_every=bad)


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_float64_gradcheck_and_reference(kind):
    module = nn.Recurrent(lambda n: CELLS[kind](n, 4, dtype="float64"), 3, 2, fused=True, dtype="float64")
    X = ndl.Tensor(np.random.randn(5, 3, 3), dtype="float64")
    states = [ndl.Tensor(np.random.randn(2, 3, 4), dtype="float64") for _ in range(module.n_states)]

    def f(X, *states):
        out, fin = module(X, states[0] if len(states) == 1 else tuple(states))
        return out.sum() + ((fin if len(states) == 1 else fin[-1]) * 0.5).sum()

    assert gradcheck(f, X, *states, eps=1e-6, atol=1e-6, rtol=1e-6)
    up = np.random.randn(5, 3, 4)
    fused = run_needle(module, X.numpy(), [s.numpy() for s in states], None, up, dtype="float64")
    module.fused = False
    reference = run_needle(module, X.numpy(), [s.numpy() for s in states], None, up, dtype="float64")
    for got, want in zip(fused, reference):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
@pytest.mark.parametrize("bias", [True, False])
def test_builtin_cells_equal_builtin_layers(kind, bias):
    """RNNCell, LSTMCell and GRUCell compiled inside nn.Recurrent equal nn.RNN, nn.LSTM and nn.GRU stepped on
    their reference path (the built-in layers' fused path is this same compiled path), same weights."""
    if kind.startswith("rnn"):
        nonlinearity = kind[4:]
        layer = nn.RNN(5, H, 2, bias=bias, nonlinearity=nonlinearity)
        cells = layer.rnn_cells
    else:
        layer = {"lstm": nn.LSTM, "gru": nn.GRU}[kind](5, H, 2, bias=bias)
        cells = layer.lstm_cells if kind == "lstm" else layer.gru_cells
    made = list(cells)
    module = nn.Recurrent(lambda n: made.pop(0), 5, 2, fused=True)
    assert module.cells[0] is cells[0]
    X = np.random.randn(9, 4, 5).astype(np.float32)
    up = np.random.randn(9, 4, H)
    state = [np.random.randn(2, 4, H).astype(np.float32) for _ in range(module.n_states)]
    lengths = np.array([9, 3, 7, 1])
    got = run_needle(module, X, state, lengths, up)
    layer.n_states = module.n_states
    layer.cells = cells
    layer.fused = False
    want = run_needle(layer, X, state, lengths, up)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("every", [None, 4])
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("kind", ["cifg", "mgu"])
def test_grad_flow_compiled_equals_reference(kind, with_lengths, every):
    """record_grad_flow: the compiled backward's ||dL/dh_t|| equal the reference path's, every layer and
    step (lengths: padded steps add nothing), with recompute_every too."""
    T, B, layers = 11, 5, 2
    rng = np.random.default_rng(3 + with_lengths)
    module = nn.Recurrent(lambda n: CELLS[kind](n, H, dtype="float64"), 5, layers, fused=True, dtype="float64",
                          recompute_every=every, record_grad_flow=True)
    X = rng.standard_normal((T, B, 5))
    lengths = np.array([3, 11, 7, 1, 9]) if with_lengths else None
    up = rng.standard_normal((T, B, H))
    assert module.grad_flow is None
    run_needle(module, X, None, lengths, up, dtype="float64")
    compiled = module.grad_flow
    module.fused = False
    run_needle(module, X, None, lengths, up, dtype="float64")
    reference = module.grad_flow
    assert compiled.shape == (layers, T) and (compiled > 0).all()
    np.testing.assert_allclose(compiled, reference, rtol=1e-10, atol=1e-12)


def test_grad_flow_of_lstm_cells_equals_nn_lstm():
    """The compiled backward's ||dL/dh_t|| against nn.LSTM's reference path (its per-step probes)."""
    layer = nn.LSTM(5, H, 2, record_grad_flow=True, fused=False)
    made = list(layer.lstm_cells)
    module = nn.Recurrent(lambda n: made.pop(0), 5, 2, fused=True, record_grad_flow=True)
    X, up = np.random.randn(9, 4, 5).astype(np.float32), np.random.randn(9, 4, H)
    lengths = np.array([9, 3, 7, 1])
    run_needle(module, X, None, lengths, up)
    layer.n_states, layer.cells = 2, layer.lstm_cells
    run_needle(layer, X, None, lengths, up)
    np.testing.assert_allclose(module.grad_flow, layer.grad_flow, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_bidirectional_builtin_cells_equal_builtin_layers(kind):
    """Bidirectional nn.Recurrent of the built-in cells equals the bidirectional built-in layer with the same
    cells (forward and reverse), with lengths."""
    layer = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[kind](5, H, 2, bidirectional=True)
    name = {"rnn": "rnn_cells", "lstm": "lstm_cells", "gru": "gru_cells"}[kind]
    forward_cells, reverse_cells = getattr(layer, name), getattr(layer, name + "_reverse")
    made = [forward_cells[0], forward_cells[1], reverse_cells[0], reverse_cells[1]]   # the order asked
    module = nn.Recurrent(lambda n: made.pop(0), 5, 2, fused=True, bidirectional=True)
    assert module.cells == forward_cells and module.cells_reverse == reverse_cells
    X, up = np.random.randn(9, 4, 5).astype(np.float32), np.random.randn(9, 4, 2 * H)
    state = [np.random.randn(4, 4, H).astype(np.float32) for _ in range(module.n_states)]
    lengths = np.array([9, 3, 7, 1])
    got = run_needle(module, X, state, lengths, up)
    module.fused = False
    reference = run_needle(module, X, state, lengths, up)
    layer.n_states, layer.cells, layer.cells_reverse = module.n_states, forward_cells, reverse_cells
    want = run_needle(layer, X, state, lengths, up)
    assert len(got) == len(reference) == len(want) == 2 + 2 * module.n_states + 4 * len(forward_cells[0].parameters())
    for a, r, b in zip(got, reference, want):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(r, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("with_lengths", [False, True])
def test_bidirectional_custom_cell_with_every_option(with_lengths):
    """A custom cell, bidirectional, 2 layers, lengths, recompute_every and record_grad_flow: compiled ==
    reference path (float64), grad_flow included."""
    T, B = 10, 4
    module = nn.Recurrent(lambda n: CIFGCell(n, H, dtype="float64"), 5, 2, fused=True, dtype="float64",
                          bidirectional=True, recompute_every=3, record_grad_flow=True, batch_first=True)
    X, up = np.random.randn(T, B, 5), np.random.randn(T, B, 2 * H)
    state = [np.random.randn(4, B, H) for _ in range(2)]
    lengths = np.array([4, 10, 1, 7]) if with_lengths else None
    got = run_needle(module, X, state, lengths, up, batch_first=True, dtype="float64")
    flow = module.grad_flow
    module.fused = False
    want = run_needle(module, X, state, lengths, up, batch_first=True, dtype="float64")
    assert flow.shape == (4, T)
    np.testing.assert_allclose(flow, module.grad_flow, rtol=1e-10, atol=1e-12)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_bidirectional_loops_side_by_side_equal_one_after_the_other(monkeypatch):
    """A compiled bidirectional layer is one op whose two loops run on two threads (where needle has two):
    the same results as the directions one after the other."""
    import threading
    from needle.backend_ndarray.parallel_numpy import num_threads
    from needle.compiler.fused import CompiledLayer
    T, B, hidden = 12, 16, 64                   # a step's work (B x 3 x hidden) is enough to go side by side
    rng = np.random.default_rng(5)
    module = nn.Recurrent(lambda n: CIFGCell(n, hidden, dtype="float64"), 5, 2, fused=True, dtype="float64",
                          bidirectional=True, record_grad_flow=True)
    X, up = rng.standard_normal((T, B, 5)), rng.standard_normal((T, B, 2 * hidden))
    lengths = rng.integers(1, T + 1, B)
    threads, run_forward = set(), CompiledLayer._run_forward

    def spy(self, *args, **kwargs):
        threads.add(threading.current_thread().name)
        return run_forward(self, *args, **kwargs)

    monkeypatch.setattr(CompiledLayer, "_run_forward", spy)
    together = run_needle(module, X, None, lengths, up, dtype="float64")
    flow = module.grad_flow
    if num_threads() > 1:
        assert any(name.startswith("needle") for name in threads)   # one loop ran on needle's worker
    monkeypatch.setattr(type(module), "_pairs_side_by_side", lambda self, X: False)
    apart = run_needle(module, X, None, lengths, up, dtype="float64")
    np.testing.assert_allclose(flow, module.grad_flow, rtol=1e-12, atol=1e-12)
    for a, b in zip(together, apart):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_two_thousand_steps_train():
    module = nn.Recurrent(lambda n: CIFGCell(n, 8), 3, 1, fused=True)
    X = ndl.Tensor(np.random.randn(2000, 2, 3) * 0.5)
    opt = ndl.optim.SGD(module.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        out, _ = module(X)
        loss = ((out - 0.25) * (out - 0.25)).sum() / 4000.0
        opt.reset_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.numpy()))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert all(np.isfinite(p.numpy()).all() for p in module.parameters())



def test_thread_choice_measures_both_and_follows_the_load():
    from needle.compiler.fused import _ThreadChoice
    choice, picks = _ThreadChoice(), []
    for call in range(600):
        pick = choice.pick()
        picks.append(pick)
        busy = 150 <= call < 300                 # all threads: 0.8 on a quiet machine, 3.0 beside a busy core
        choice.record(pick, 1.0 if pick == 1 else (3.0 if busy else 0.8))
    assert picks[:4] == [1, 0, 1, 0]             # both measured first
    assert picks[4:150].count(1) <= 8            # then mostly the faster, retrying the other now and then
    assert picks[152:300].count(0) <= 8          # the load came: one thread within two calls, and stays
    assert picks[450:].count(0) >= 140           # it went: all threads again by the next retry (<= 128 on)


def test_thread_choices_change_nothing_but_time(monkeypatch):
    from needle.compiler import fused
    monkeypatch.setattr(fused, "_ONE_THREAD_BELOW", 0)   # every kernel measures, tiny ones included
    np.random.seed(3)
    module = nn.Recurrent(lambda n: CIFGCell(n, 16), 5, 2, fused=True)
    X = ndl.Tensor(np.random.randn(7, 4, 5), requires_grad=True)
    results = []
    for _ in range(6):                           # the first four calls of each kernel alternate 1, 0, 1, 0
        out, (h, c) = module(X)
        (out * out).sum().backward()
        results.append([out.numpy(), c.numpy(), X.grad.numpy()] + [p.grad.numpy() for p in module.parameters()])
        X.grad = None
        for p in module.parameters():
            p.grad = None
    for got in results[1:]:
        for a, b in zip(results[0], got):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    choices = module._compiled[id(module.cells[0])][1].thread_choices
    assert {key[0] for key in choices} == {"forward", "backward"}
    assert all(c.best in (0, 1) and c.seconds[1] and c.seconds[0] for c in choices.values())  # both timed

# ---- fallbacks -------------------------------------------------------------------------------------------

class DropoutCell(nn.Module):
    def __init__(self, n, hidden):
        super().__init__()
        self.hidden_size, self.W, self.U = hidden, _param(n, hidden), _param(hidden, hidden)
        self.drop = nn.Dropout(0.5)

    def forward(self, X, h):
        return ops.tanh(self.drop(X @ self.W) + h @ self.U)


class ReadingCell(DropoutCell):
    def forward(self, X, h):
        a = X @ self.W + h @ self.U
        return ops.tanh(a) if a.numpy().mean() > -10 else a


class TransposeCell(DropoutCell):
    def forward(self, X, h):
        return ops.tanh(X @ self.W + ops.transpose(ops.transpose(h @ self.U)))


@pytest.mark.parametrize("cell, what", [(DropoutCell, "a tensor made inside forward"),
                                        (ReadingCell, "reading values"), (TransposeCell, "transpose")])
def test_unsupported_cell_warns_once_or_raises(cell, what):
    X = ndl.Tensor(np.random.randn(4, 3, 5))
    module = nn.Recurrent(lambda n: cell(n, H), 5, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = module(X)
        module(X)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and what in messages[0] and "reference path" in messages[0]
    assert out.shape == (4, 3, H) and module.fused is None
    module.fused = True
    with pytest.raises(ValueError, match=what):
        module(X)
    module.fused = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(X)


def test_needle_fused_zero_means_reference(monkeypatch):
    module = nn.Recurrent(lambda n: TransposeCell(n, H), 5)
    monkeypatch.setenv("NEEDLE_FUSED", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(ndl.Tensor(np.random.randn(2, 3, 5)))


def test_mismatched_cells_and_bad_state():
    sizes = iter([H, H + 1])
    with pytest.raises(ValueError, match="hidden_size 6 .* got hidden_size 7"):
        nn.Recurrent(lambda n: MGUCell(n, next(sizes)), 5, 2)
    module = nn.Recurrent(lambda n: CIFGCell(n, H), 5, 2)
    with pytest.raises(ValueError, match=r"Recurrent: h0 must have shape \(2, 3, 6\)"):
        module(ndl.Tensor(np.zeros((4, 3, 5))), (ndl.Tensor(np.zeros((1, 3, H))), ndl.Tensor(np.zeros((2, 3, H)))))
    with pytest.raises(ValueError, match="Recurrent: X must be 3-D"):
        module(ndl.Tensor(np.zeros((3, 5))))


# ---- the stages on their own ---------------------------------------------------------------------------

def test_trace_hoists_input_products_and_keeps_recurrent_ones():
    from needle.compiler.trace import trace_cell
    tr = trace_cell(MGUCell(5, H), 5)
    ops_used = [n.op for n in tr.graph.nodes]
    assert ops_used.count("xw") == 2 and ops_used.count("mm") == 2     # x W_f, x W_n; h U_f, (f h) U_n
    mm = [n for n in tr.graph.nodes if n.op == "mm"]
    assert {tr.graph.nodes[n.args[0].node].op for n in mm} == {"state", "binary"}
    assert len(tr.matrices) == 4 and len(tr.vectors) == 2


def test_derived_backward_matches_reference_gradients_of_one_step():
    module = nn.Recurrent(lambda n: LNLSTMCell(n, H), 5, 1, fused=True)
    X, up = np.random.randn(1, 4, 5).astype(np.float32), np.random.randn(1, 4, H)
    state = [np.random.randn(1, 4, H).astype(np.float32) for _ in range(2)]
    got = run_needle(module, X, state, None, up)
    module.fused = False
    for a, b in zip(got, run_needle(module, X, state, None, up)):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


def _has_avx512():
    try:
        return "avx512f" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx512(), reason="no AVX-512 on this CPU")
def test_rendered_step_loops_vectorise(tmp_path):
    """The float32 kernels' elementwise loops run on vector registers (the rational tanh vectorises): ymm or
    zmm, since LLVM picks 256-bit vectors on Intel's AVX-512 server cpus (seen on an Emerald Rapids: the
    backward all ymm) and 512-bit ones on AMD's Zen 4; scalar float code uses only xmm. Compiled in a fresh
    process and cache, since Numba cannot show the assembly of cached code."""
    import llvmlite.binding as llvm
    if not llvm.get_host_cpu_features().get("avx2"):
        pytest.skip("a cpu without AVX2: no wide vector registers to look for")
    code = ("import numpy as np, needle as ndl\n"
            "from needle.compiler.fused import compile_cell\n"
            "m = ndl.nn.Recurrent(lambda n: ndl.nn.LSTMCell(n, 6), 5, 1, fused=True)\n"
            "out, h = m(ndl.Tensor(np.ones((3, 2, 5))))\n"
            "out.sum().backward()\n"
            "c = compile_cell(m.cells[0], 5)\n"
            "for k in c.kernels('float32'):\n"
            "    asm = k.inspect_asm(k.signatures[0])\n"
            "    print(asm.count('ymm') + asm.count('zmm'))\n"
            "print('_tanh32(' in open(c.path).read())\n")
    env = dict(os.environ, NEEDLE_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    forward_count, backward_count, readable = out.split()
    assert int(forward_count) > 50 and int(backward_count) > 50, "the step loops did not vectorise"
    assert readable == "True"


def test_import_needle_does_not_load_the_compiler():
    code = "import sys, needle; print('numba' in sys.modules, 'needle.compiler' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_kernels_cached_on_disk_for_a_new_process(tmp_path):
    code = ("import numpy as np, needle as ndl\n"
            "from needle.compiler.fused import compile_cell\n"
            "m = ndl.nn.Recurrent(lambda n: ndl.nn.GRUCell(n, 3), 2, 1, fused=True)\n"
            "out, h = m(ndl.Tensor(np.ones((2, 2, 2))))\n"
            "out.sum().backward()\n"
            "c = compile_cell(m.cells[0], 2)\n"
            "f, b = c.kernels('float32')\n"
            "print(sum(f.stats.cache_hits.values()) + sum(b.stats.cache_hits.values()), c.path)\n")
    env = dict(os.environ, NEEDLE_CACHE_DIR=str(tmp_path))
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    hits1, path1 = first.stdout.split()
    hits2, path2 = second.stdout.split()
    assert path1 == path2 and path1.startswith(str(tmp_path))
    assert int(hits1) == 0 and int(hits2) == 2
