"""Recurrent modules against torch.nn (weights copied in, transposed), and fused against reference."""
import itertools

import numpy as np
import pytest
import torch

import needle as ndl
from needle import nn
from needle.backend_ndarray import backend_numpy
from needle.testing import gradcheck

KINDS = {
    "rnn_tanh": (nn.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}, "rnn_cells"),
    "rnn_relu": (nn.RNN, torch.nn.RNN, {"nonlinearity": "relu"}, "rnn_cells"),
    "lstm": (nn.LSTM, torch.nn.LSTM, {}, "lstm_cells"),
    "gru": (nn.GRU, torch.nn.GRU, {}, "gru_cells"),
}
CELLS = {
    "rnn_tanh": (nn.RNNCell, torch.nn.RNNCell, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNNCell, torch.nn.RNNCell, {"nonlinearity": "relu"}),
    "lstm": (nn.LSTMCell, torch.nn.LSTMCell, {}),
    "gru": (nn.GRUCell, torch.nn.GRUCell, {}),
}
ATOL = RTOL = 1e-5

# Every combination of batch, input, hidden and seq_len; layers, bias and h0 cycle through them so that each
# value meets the others.
SIZES = list(itertools.product((1, 15), (1, 11), (1, 12), (1, 13)))
CONFIGS = [(bs, i, h, t, 1 + k % 3, k % 2 == 0, k % 4 < 2) for k, (bs, i, h, t) in enumerate(SIZES)]
CONFIG_IDS = [f"bs{c[0]}-in{c[1]}-hid{c[2]}-T{c[3]}-L{c[4]}-bias{int(c[5])}-h0{int(c[6])}" for c in CONFIGS]


def copy_into_torch(module, tmodule, cells_name):
    """Copy needle's input-major weights into torch's (transposed), in float64."""
    cells = getattr(module, cells_name) if cells_name else [module]
    for layer, cell in enumerate(cells):
        for name, tname in (("W_ih", "weight_ih"), ("W_hh", "weight_hh"), ("bias_ih", "bias_ih"),
                            ("bias_hh", "bias_hh")):
            value = getattr(cell, name)
            if value is None:
                continue
            array = value.numpy().astype(np.float64)
            getattr(tmodule, f"{tname}_l{layer}" if cells_name else tname).data = torch.tensor(
                array.T if name.startswith("W") else array)


def run_needle(module, x, h0, is_lstm, grads):
    """Forward, then backward of a random weighting of output and final state(s); returns arrays."""
    X = ndl.Tensor(x)
    states = None
    if h0 is not None:
        states = tuple(ndl.Tensor(s) for s in h0) if is_lstm else ndl.Tensor(h0[0])
    out, finals = module(X, states)
    finals = finals if is_lstm else (finals,)
    loss = (out * ndl.Tensor(grads[0])).sum()
    for f, g in zip(finals, grads[1:]):
        loss = loss + (f * ndl.Tensor(g)).sum()
    loss.backward()
    state_grads = ([s.grad.numpy() for s in (states if is_lstm else (states,))] if h0 is not None else [])
    return [out.numpy()] + [f.numpy() for f in finals], [X.grad.numpy()] + state_grads


def run_torch(tmodule, x, h0, is_lstm, grads):
    X = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    states = None
    if h0 is not None:
        states = [torch.tensor(s, dtype=torch.float64, requires_grad=True) for s in h0]
    out, finals = tmodule(X, (tuple(states) if is_lstm else states[0]) if states else None)
    finals = finals if is_lstm else (finals,)
    loss = (out * torch.tensor(grads[0])).sum()
    for f, g in zip(finals, grads[1:]):
        loss = loss + (f * torch.tensor(g)).sum()
    loss.backward()
    return ([out.detach().numpy()] + [f.detach().numpy() for f in finals],
            [X.grad.numpy()] + ([s.grad.numpy() for s in states] if states else []))


def param_grads(module, cells_name):
    return [p.grad.numpy() for cell in getattr(module, cells_name)
            for p in (cell.W_ih, cell.W_hh, cell.bias_ih, cell.bias_hh) if p is not None]


def torch_param_grads(tmodule, num_layers, bias):
    names = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if bias else ())
    grads = []
    for layer in range(num_layers):
        for name in names:
            g = getattr(tmodule, f"{name}_l{layer}").grad.numpy()
            grads.append(g.T if name.startswith("weight") else g)
    return grads


def assert_all_close(actual, expected, what):
    assert len(actual) == len(expected), what
    for k, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL, err_msg=f"{what} [{k}]")


def make_case(kind, config, fused):
    bs, input_size, hidden, seq_len, layers, bias, with_h0 = config
    module_cls, torch_cls, kwargs, cells_name = KINDS[kind]
    module = module_cls(input_size, hidden, num_layers=layers, bias=bias, fused=fused, **kwargs)
    tmodule = torch_cls(input_size, hidden, num_layers=layers, bias=bias, **kwargs).double()
    copy_into_torch(module, tmodule, cells_name)
    is_lstm = kind == "lstm"
    rng = np.random.default_rng(1)
    x = rng.standard_normal((seq_len, bs, input_size)).astype(np.float32)
    h0 = ([rng.standard_normal((layers, bs, hidden)).astype(np.float32) for _ in range(1 + is_lstm)]
          if with_h0 else None)
    grads = [rng.standard_normal((seq_len, bs, hidden))] + [rng.standard_normal((layers, bs, hidden))
                                                           for _ in range(1 + is_lstm)]
    return module, tmodule, x, h0, grads, is_lstm


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_module_matches_torch(kind, config, fused):
    module, tmodule, x, h0, grads, is_lstm = make_case(kind, config, fused)
    values, input_grads = run_needle(module, x, h0, is_lstm, grads)
    t_values, t_input_grads = run_torch(tmodule, x, h0, is_lstm, grads)
    assert_all_close(values, t_values, "output, h_n (c_n)")
    assert_all_close(input_grads, t_input_grads, "grad of X, h0 (c0)")
    assert_all_close(param_grads(module, KINDS[kind][3]), torch_param_grads(tmodule, config[4], config[5]),
                     "grads of W_ih, W_hh, bias_ih, bias_hh per layer")


@pytest.mark.parametrize("kind", list(KINDS))
def test_module_matches_torch_with_a_wider_batch(kind):
    module, tmodule, x, h0, grads, is_lstm = make_case(kind, (40, 5, 6, 7, 2, True, True), True)
    values, input_grads = run_needle(module, x, h0, is_lstm, grads)
    t_values, t_input_grads = run_torch(tmodule, x, h0, is_lstm, grads)
    assert_all_close(values, t_values, "output, h_n (c_n)")
    assert_all_close(input_grads, t_input_grads, "grad of X, h0 (c0)")
    assert_all_close(param_grads(module, KINDS[kind][3]), torch_param_grads(tmodule, 2, True),
                     "grads of W_ih, W_hh, bias_ih, bias_hh per layer")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_fused_float64_matches_torch_to_1e9(kind, bias):
    """The compiled layers in float64 (np.tanh, exp) against torch in float64, tightly; the loss reads only
    the output, so no gradient reaches the final states from above."""
    module_cls, torch_cls, kwargs, cells_name = KINDS[kind]
    module = module_cls(4, 5, num_layers=2, bias=bias, fused=True, dtype="float64", **kwargs)
    tmodule = torch_cls(4, 5, num_layers=2, bias=bias, **kwargs).double()
    copy_into_torch(module, tmodule, cells_name)
    rng = np.random.default_rng(5)
    x, dY = rng.standard_normal((6, 3, 4)), rng.standard_normal((6, 3, 5))
    X = ndl.Tensor(x, dtype="float64")
    out, _ = module(X)
    (out * ndl.Tensor(dY, dtype="float64")).sum().backward()
    assert out.dtype == "float64" and X.grad.dtype == "float64"
    tX = torch.tensor(x, requires_grad=True)
    t_out, _ = tmodule(tX)
    (t_out * torch.tensor(dY)).sum().backward()
    tight = dict(rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(out.numpy(), t_out.detach().numpy(), **tight)
    np.testing.assert_allclose(X.grad.numpy(), tX.grad.numpy(), **tight)
    for a, e in zip(param_grads(module, cells_name), torch_param_grads(tmodule, 2, bias)):
        np.testing.assert_allclose(a, e, **tight)


@pytest.mark.parametrize("kind", list(KINDS))
def test_fused_inputs_unmodified_float32_and_repeatable(kind):
    """A non-contiguous X (a batch_first view), h0 and the weights come back untouched; results stay
    float32 and two identical calls agree bitwise."""
    module_cls, _, kwargs, cells_name = KINDS[kind]
    module = module_cls(3, 4, num_layers=2, fused=True, batch_first=True, **kwargs)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32).transpose(1, 0, 2)   # (bs, T, in), strided
    h = [rng.standard_normal((2, 2, 4)).astype(np.float32) for _ in range(2 if kind == "lstm" else 1)]
    before = [x.copy()] + [a.copy() for a in h] + [p.numpy().copy() for p in module.parameters()]
    runs = []
    for _ in range(2):
        for p in module.parameters():
            p.grad = None
        X = ndl.Tensor(x, requires_grad=True)
        states = [ndl.Tensor(a, requires_grad=True) for a in h]
        out, _ = module(X, tuple(states) if kind == "lstm" else states[0])
        (out * out).sum().backward()
        assert out.dtype == X.grad.dtype == "float32"
        runs.append([out.numpy(), X.grad.numpy()] + [s.grad.numpy() for s in states]
                    + [p.grad.numpy() for p in module.parameters()])
    for was, now in zip(before, [x] + h + [p.numpy() for p in module.parameters()]):
        np.testing.assert_array_equal(was, now)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("config", CONFIGS[::3], ids=CONFIG_IDS[::3])
@pytest.mark.parametrize("kind", list(KINDS))
def test_fused_equals_reference(kind, config):
    module, _, x, h0, grads, is_lstm = make_case(kind, config, True)
    values_f, input_grads_f = run_needle(module, x, h0, is_lstm, grads)
    params_f = param_grads(module, KINDS[kind][3])
    for p in module.parameters():
        p.grad = None
    module.fused = False
    values_r, input_grads_r = run_needle(module, x, h0, is_lstm, grads)
    assert_all_close(values_f, values_r, "fused vs reference outputs")
    assert_all_close(input_grads_f, input_grads_r, "fused vs reference input grads")
    assert_all_close(params_f, param_grads(module, KINDS[kind][3]), "fused vs reference parameter grads")


@pytest.mark.parametrize("with_h", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", list(CELLS))
def test_cell_matches_torch(kind, bias, with_h):
    cell_cls, torch_cls, kwargs = CELLS[kind]
    cell = cell_cls(11, 12, bias=bias, **kwargs)
    tcell = torch_cls(11, 12, bias=bias, **kwargs).double()
    copy_into_torch(cell, tcell, None)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((15, 11)).astype(np.float32)
    is_lstm = kind == "lstm"
    hs = [rng.standard_normal((15, 12)).astype(np.float32) for _ in range(1 + is_lstm)]
    X, Xt = ndl.Tensor(x), torch.tensor(x, dtype=torch.float64, requires_grad=True)
    H = [ndl.Tensor(h) for h in hs]
    Ht = [torch.tensor(h, dtype=torch.float64, requires_grad=True) for h in hs]
    out = cell(X, (tuple(H) if is_lstm else H[0]) if with_h else None)
    tout = tcell(Xt, (tuple(Ht) if is_lstm else Ht[0]) if with_h else None)
    out, tout = (out, tout) if is_lstm else ((out,), (tout,))
    weights = [rng.standard_normal((15, 12)) for _ in out]
    sum((o * ndl.Tensor(w)).sum() for o, w in zip(out, weights)).backward()
    sum((o * torch.tensor(w)).sum() for o, w in zip(tout, weights)).backward()
    assert_all_close([o.numpy() for o in out], [o.detach().numpy() for o in tout], "cell outputs")
    expected = [Xt.grad.numpy()] + ([h.grad.numpy() for h in Ht] if with_h else [])
    actual = [X.grad.numpy()] + ([h.grad.numpy() for h in H] if with_h else [])
    assert_all_close(actual, expected, "cell input grads")
    names = ("W_ih", "W_hh") + (("bias_ih", "bias_hh") if bias else ())
    tnames = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    assert_all_close([getattr(cell, n).grad.numpy() for n in names],
                     [getattr(tcell, t).grad.numpy().T if t.startswith("w") else getattr(tcell, t).grad.numpy()
                      for t in tnames[:len(names)]], "cell parameter grads")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_h0_none_equals_zeros(kind, fused):
    module_cls, _, kwargs, _ = KINDS[kind]
    module = module_cls(3, 4, num_layers=2, fused=fused, **kwargs)
    X = ndl.Tensor(np.random.randn(5, 2, 3))
    zeros = ndl.init.zeros(2, 2, 4)
    out_none, _ = module(X)
    out_zero, _ = module(X, (zeros, zeros) if kind == "lstm" else zeros)
    np.testing.assert_array_equal(out_none.numpy(), out_zero.numpy())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_replaced_weight_receives_gradient(fused):
    rnn = nn.RNN(3, 4, num_layers=2, fused=fused)
    new = ndl.Tensor(np.random.randn(4, 4).astype(np.float32))
    old = rnn.rnn_cells[1].W_ih
    rnn.rnn_cells[1].W_ih = new
    out, _ = rnn(ndl.Tensor(np.random.randn(6, 2, 3)))
    out.sum().backward()
    assert new.grad is not None and np.abs(new.grad.numpy()).sum() > 0
    assert old.grad is None


def test_one_cell_per_layer_shared_over_time():
    rnn = nn.RNN(3, 4, num_layers=3)
    assert len(rnn.rnn_cells) == 3
    assert [c.W_ih.shape for c in rnn.rnn_cells] == [(3, 4), (4, 4), (4, 4)]
    assert len(rnn.parameters()) == 12


def test_init_bounds():
    lstm = nn.LSTM(7, 25, num_layers=2)
    for p in lstm.parameters():
        assert np.abs(p.numpy()).max() <= 0.2 + 1e-7  # sqrt(1 / 25)
    assert lstm.lstm_cells[0].W_ih.shape == (7, 100) and lstm.lstm_cells[1].W_hh.shape == (25, 100)
    assert nn.GRU(7, 25).gru_cells[0].bias_hh.shape == (75,)


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_long_sequence_trains(kind):
    """2,000 steps forward and backward on the fused path; the gradients are finite and non-zero."""
    module_cls, _, kwargs, _ = KINDS[kind]
    module = module_cls(8, 16, num_layers=2, **kwargs)
    X = ndl.Tensor(np.random.randn(2000, 4, 8), requires_grad=True)
    out, _ = module(X)
    out.sum().backward()
    for p in module.parameters():
        assert np.isfinite(p.grad.numpy()).all()
    assert np.abs(X.grad.numpy()[0]).sum() > 0


def test_long_sequence_reference_path():
    rnn = nn.RNN(2, 3, fused=False)
    out, _ = rnn(ndl.Tensor(np.random.randn(2000, 1, 2)))
    out.sum().backward()
    assert np.isfinite(rnn.rnn_cells[0].W_hh.grad.numpy()).all()


def test_fused_flag(monkeypatch):
    monkeypatch.setenv("NEEDLE_FUSED", "0")
    assert nn.LSTM(2, 3).fused is False
    assert nn.LSTM(2, 3, fused=True).fused is True
    monkeypatch.setenv("NEEDLE_FUSED", "1")
    assert nn.GRU(2, 3).fused is True
    monkeypatch.delenv("NEEDLE_FUSED")
    rnn = nn.RNN(2, 3)
    assert rnn.fused is True
    rnn.fused = False
    assert rnn.fused is False


def test_backend_without_kernels_falls_back(monkeypatch):
    from needle.compiler import blas
    lstm = nn.LSTM(3, 4, fused=True)
    X = ndl.Tensor(np.random.randn(4, 2, 3))
    expected = lstm(X)[0].numpy()
    monkeypatch.setattr(blas, "gemm", lambda dtype: None)   # a BLAS the compiled kernels cannot call
    assert lstm._fused_for(X) is False
    np.testing.assert_allclose(lstm(X)[0].numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layer", ["rnn", "lstm", "gru"])
def test_fused_layers_gradcheck(layer):
    """The compiled layer's gradient of X, the states and every weight against finite differences."""
    rng = np.random.default_rng(3)
    T, B, I, H = 3, 2, 2, 3
    module = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[layer](I, H, fused=True, dtype="float64")
    cell = getattr(module, layer + "_cells")[0]
    n = 2 if layer == "lstm" else 1

    def t(*shape):
        return ndl.Tensor(rng.standard_normal(shape) * 0.5, dtype="float64")

    def f(X, W_ih, W_hh, b_ih, b_hh, *states):
        cell.W_ih, cell.W_hh, cell.bias_ih, cell.bias_hh = W_ih, W_hh, b_ih, b_hh
        Y, finals = module(X, states if n == 2 else states[0])
        finals = finals if n == 2 else (finals,)
        return Y.sum((0,)) + sum((s * (2.0 + k)).sum((0,)) for k, s in enumerate(finals))

    X = t(T, B, I)
    weights = [t(*w.shape) for w in (cell.W_ih, cell.W_hh, cell.bias_ih, cell.bias_hh)]
    states = [t(1, B, H) for _ in range(n)]
    assert module._fused_for(X)
    assert gradcheck(f, X, *weights, *states, eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_bad_input(kind):
    module_cls, _, kwargs, _ = KINDS[kind]
    name = module_cls.__name__
    module = module_cls(3, 4, num_layers=2, **kwargs)
    with pytest.raises(ValueError, match=rf"{name}: X must be 3-D \(seq_len, bs, input_size\), got \(4, 3\)"):
        module(ndl.Tensor(np.zeros((4, 3))))
    with pytest.raises(ValueError, match=rf"{name}: X must have input_size 3 .*got \(5, 2, 7\)"):
        module(ndl.Tensor(np.zeros((5, 2, 7))))
    bad = ndl.Tensor(np.zeros((1, 2, 4)))
    with pytest.raises(ValueError, match=rf"{name}: h0 must have shape \(2, 2, 4\), got \(1, 2, 4\)"):
        module(ndl.Tensor(np.zeros((5, 2, 3))), (bad, bad) if kind == "lstm" else bad)
    if kind == "lstm":
        good = ndl.Tensor(np.zeros((2, 2, 4)))
        with pytest.raises(ValueError, match=r"LSTM: c0 must have shape \(2, 2, 4\), got \(1, 2, 4\)"):
            module(ndl.Tensor(np.zeros((5, 2, 3))), (good, bad))
        with pytest.raises(ValueError, match=r"LSTM: h must be a pair"):
            module(ndl.Tensor(np.zeros((5, 2, 3))), good)
    cell_cls = CELLS[kind][0]
    with pytest.raises(ValueError, match=rf"{cell_cls.__name__}: X must be 2-D \(bs, input_size\), got \(5, 2, 3\)"):
        cell_cls(3, 4)(ndl.Tensor(np.zeros((5, 2, 3))))


def test_unknown_nonlinearity():
    with pytest.raises(ValueError, match=r"RNN: nonlinearity must be 'tanh' or 'relu', got 'sigmoid'"):
        nn.RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match=r"RNNCell: nonlinearity must be 'tanh' or 'relu', got 'gelu'"):
        nn.RNNCell(3, 4, nonlinearity="gelu")


def test_embedding_matches_torch(device):
    emb = nn.Embedding(10, 4, device=device)
    temb = torch.nn.Embedding(10, 4).double()
    temb.weight.data = torch.tensor(emb.weight.numpy().astype(np.float64))
    idx = np.array([[1, 2, 1], [9, 0, 1]])   # row 1 three times: its gradient is the sum of three
    out = emb(ndl.Tensor(idx, device=device, requires_grad=False))
    tout = temb(torch.tensor(idx))
    g = np.random.randn(2, 3, 4)
    (out * ndl.Tensor(g, device=device)).sum().backward()
    (tout * torch.tensor(g)).sum().backward()
    assert out.shape == (2, 3, 4)
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(emb.weight.grad.numpy(), temb.weight.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_embedding_gradient_without_the_backend_add_rows(monkeypatch):
    """A backend without add_rows (CuPy's) scatters with xp.add.at: the same gradient as the cpu's kernel."""
    idx = np.random.randint(0, 7, size=(30, 4))   # every row used many times
    g = np.random.randn(30, 4, 3)
    emb = nn.Embedding(7, 3)

    def grad():
        emb.weight.grad = None
        (emb(ndl.Tensor(idx, requires_grad=False)) * ndl.Tensor(g)).sum().backward()
        return emb.weight.grad.numpy()

    with_kernel = grad()
    monkeypatch.delattr(backend_numpy, "add_rows")
    assert ndl.cpu().kernel("add_rows") is None
    np.testing.assert_allclose(grad(), with_kernel, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(with_kernel[:, 0], [g[idx == r][:, 0].sum() for r in range(7)], rtol=1e-5, atol=1e-5)


def test_embedding_large_vocabulary_and_bad_indices():
    emb = nn.Embedding(10_000, 8)
    idx = np.random.randint(0, 10_000, size=(35, 20))
    emb(ndl.Tensor(idx, requires_grad=False)).sum().backward()
    counts = np.bincount(idx.ravel(), minlength=10_000)
    np.testing.assert_allclose(emb.weight.grad.numpy()[:, 0], counts)
    with pytest.raises(ValueError, match=r"^Embedding: index 10000 at position \(0, 0\) is outside \[0, 10000\)$"):
        emb(ndl.Tensor(np.array([[10_000]]), requires_grad=False))
    with pytest.raises(ValueError, match=r"^Embedding: index -1 at position \(0, 0\) is outside"):
        emb(ndl.Tensor(np.array([[-1.0]]), requires_grad=False))
