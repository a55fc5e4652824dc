"""batch_first, dropout, bidirectional and lengths against torch; recompute_every and grad_flow."""
import itertools
import warnings

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import needle as ndl
from needle import nn

KINDS = {
    "rnn_tanh": (nn.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}, "rnn_cells"),
    "rnn_relu": (nn.RNN, torch.nn.RNN, {"nonlinearity": "relu"}, "rnn_cells"),
    "lstm": (nn.LSTM, torch.nn.LSTM, {}, "lstm_cells"),
    "gru": (nn.GRU, torch.nn.GRU, {}, "gru_cells"),
}
TOL = 1e-5
COMBOS = list(itertools.product((False, True), (False, True), (False, True)))  # batch_first, bidirectional, lengths
COMBO_IDS = [f"{'bf' if bf else 'tm'}-{'bi' if bi else 'uni'}-{'len' if ln else 'full'}" for bf, bi, ln in COMBOS]


def copy_into_torch(module, tmodule, cells_name):
    directions = 2 if module.bidirectional else 1
    for layer in range(module.num_layers):
        for direction in range(directions):
            cell = getattr(module, cells_name + ("_reverse" if direction else ""))[layer]
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            for name, tname in (("W_ih", "weight_ih"), ("W_hh", "weight_hh"), ("bias_ih", "bias_ih"),
                                ("bias_hh", "bias_hh")):
                array = getattr(cell, name).numpy().astype(np.float64)
                getattr(tmodule, tname + suffix).data = torch.tensor(array.T if name[0] == "W" else array)


def all_param_grads(module, cells_name):
    names = [cells_name] + ([cells_name + "_reverse"] if module.bidirectional else [])
    return [p.grad.numpy() for layer in range(module.num_layers) for name in names
            for cell in [getattr(module, name)[layer]] for p in (cell.W_ih, cell.W_hh, cell.bias_ih, cell.bias_hh)]


def torch_param_grads(tmodule, num_layers, bidirectional):
    grads = []
    for layer in range(num_layers):
        for suffix in [f"_l{layer}"] + ([f"_l{layer}_reverse"] if bidirectional else []):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                g = getattr(tmodule, name + suffix).grad.numpy()
                grads.append(g.T if name.startswith("weight") else g)
    return grads


def make(kind, fused, bf, bi, layers=2, hidden=5, input_size=3, **extra):
    module_cls, torch_cls, kwargs, cells_name = KINDS[kind]
    module = module_cls(input_size, hidden, num_layers=layers, fused=fused, batch_first=bf, bidirectional=bi,
                        **kwargs, **extra)
    tmodule = torch_cls(input_size, hidden, num_layers=layers, batch_first=bf, bidirectional=bi, **kwargs).double()
    copy_into_torch(module, tmodule, cells_name)
    return module, tmodule, cells_name


def run_both(module, tmodule, x, lengths, h0, is_lstm, seed=0):
    rng = np.random.default_rng(seed)
    X, Xt = ndl.Tensor(x), torch.tensor(x.astype(np.float64), requires_grad=True)
    H = [ndl.Tensor(h) for h in h0] if h0 is not None else None
    Ht = [torch.tensor(h.astype(np.float64), requires_grad=True) for h in h0] if h0 is not None else None
    out, finals = module(X, (tuple(H) if is_lstm else H[0]) if H else None, lengths)
    t_state = (tuple(Ht) if is_lstm else Ht[0]) if Ht else None
    if lengths is not None:
        packed = pack_padded_sequence(Xt, torch.tensor(lengths), batch_first=module.batch_first, enforce_sorted=False)
        tout, tfinals = tmodule(packed, t_state)
        tout, _ = pad_packed_sequence(tout, batch_first=module.batch_first, total_length=x.shape[1 if module.batch_first else 0])
    else:
        tout, tfinals = tmodule(Xt, t_state)
    finals, tfinals = (finals, tfinals) if is_lstm else ((finals,), (tfinals,))
    weights = [rng.standard_normal(out.shape)] + [rng.standard_normal(f.shape) for f in finals]
    loss = sum(((v * ndl.Tensor(w)).sum() for v, w in zip((out,) + tuple(finals), weights)), ndl.Tensor(0.0))
    tloss = sum((v * torch.tensor(w)).sum() for v, w in zip((tout,) + tuple(tfinals), weights))
    loss.backward()
    tloss.backward()
    values = [out.numpy()] + [f.numpy() for f in finals]
    tvalues = [tout.detach().numpy()] + [f.detach().numpy() for f in tfinals]
    grads = [X.grad.numpy()] + ([h.grad.numpy() for h in H] if H else [])
    tgrads = [Xt.grad.numpy()] + ([h.grad.numpy() for h in Ht] if Ht else [])
    return values, tvalues, grads, tgrads


def inputs(bf, bi, layers, bs=4, seq_len=6, input_size=3, hidden=5, lengths=False, with_h0=True, is_lstm=False,
           seed=0):
    rng = np.random.default_rng(seed)
    shape = (bs, seq_len, input_size) if bf else (seq_len, bs, input_size)
    x = rng.standard_normal(shape).astype(np.float32)
    lens = rng.integers(1, seq_len + 1, size=bs) if lengths else None
    if lengths:
        lens[0] = seq_len
    rows = layers * (2 if bi else 1)
    h0 = [rng.standard_normal((rows, bs, hidden)).astype(np.float32) for _ in range(1 + is_lstm)] if with_h0 else None
    return x, lens, h0


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_torch(kind, combo, fused):
    bf, bi, use_lengths = combo
    module, tmodule, cells_name = make(kind, fused, bf, bi)
    is_lstm = kind == "lstm"
    x, lens, h0 = inputs(bf, bi, 2, lengths=use_lengths, is_lstm=is_lstm, with_h0=not bf)
    values, tvalues, grads, tgrads = run_both(module, tmodule, x, lens, h0, is_lstm)
    for k, (a, e) in enumerate(zip(values, tvalues)):
        np.testing.assert_allclose(a, e, rtol=TOL, atol=TOL, err_msg=f"value {k}")
    for k, (a, e) in enumerate(zip(grads, tgrads)):
        np.testing.assert_allclose(a, e, rtol=TOL, atol=TOL, err_msg=f"input grad {k}")
    for k, (a, e) in enumerate(zip(all_param_grads(module, cells_name), torch_param_grads(tmodule, 2, bi))):
        np.testing.assert_allclose(a, e, rtol=TOL, atol=TOL, err_msg=f"parameter grad {k}")


@pytest.mark.parametrize("recompute", [None, 2], ids=["whole", "recompute2"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_lengths_with_packed_rows_matches_torch(kind, recompute, monkeypatch):
    """The compiled layers' GEMMs before and after the loop over the active rows only (forced here; by
    default from _PACK_MIN_MACS padded multiply-adds on), against torch's packed sequences."""
    from needle.compiler import fused
    monkeypatch.setattr(fused, "_PACK_MIN_MACS", 0)
    module, tmodule, cells_name = make(kind, True, False, True, recompute_every=recompute)
    is_lstm = kind == "lstm"
    x, lens, h0 = inputs(False, True, 2, bs=5, seq_len=7, lengths=True, is_lstm=is_lstm)
    assert fused._active_rows(np.array([5, 3, 0]), 5, 1) is not None
    values, tvalues, grads, tgrads = run_both(module, tmodule, x, lens, h0, is_lstm)
    for a, e in zip(values + grads + all_param_grads(module, cells_name), tvalues + tgrads +
                    torch_param_grads(tmodule, 2, True)):
        np.testing.assert_allclose(a, e, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("sizes", [(1, 1, 1, 1), (7, 3, 4, 2), (3, 9, 2, 8)], ids=["bs1", "bs7", "T9"])
@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_sizes_with_lengths_both_directions(kind, sizes):
    bs, seq_len, input_size, hidden = sizes
    for fused in (True, False):
        module, tmodule, cells_name = make(kind, fused, False, True, layers=1, hidden=hidden, input_size=input_size)
        x, lens, h0 = inputs(False, True, 1, bs=bs, seq_len=seq_len, input_size=input_size, hidden=hidden,
                             lengths=True, is_lstm=kind == "lstm")
        values, tvalues, grads, tgrads = run_both(module, tmodule, x, lens, h0, kind == "lstm")
        for a, e in zip(values + grads, tvalues + tgrads):
            np.testing.assert_allclose(a, e, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("bi", [False, True])
@pytest.mark.parametrize("kind", ["rnn_relu", "lstm", "gru"])
def test_dropout_fused_equals_reference(kind, bi):
    module_cls, _, kwargs, cells_name = KINDS[kind]
    module = module_cls(3, 4, num_layers=3, dropout=0.4, bidirectional=bi, **kwargs)
    X = ndl.Tensor(np.random.randn(5, 6, 3))
    lens = [5, 2, 3, 5, 1, 4]
    results = []
    for fused in (True, False):
        module.fused = fused
        for p in module.parameters():
            p.grad = None
        np.random.seed(7)
        out, _ = module(X, None, lens)
        out.sum().backward()
        results.append([out.numpy()] + all_param_grads(module, cells_name))
    for a, e in zip(*results):
        np.testing.assert_allclose(a, e, rtol=TOL, atol=TOL)


def test_dropout_acts_between_layers_in_training_only():
    rnn = nn.RNN(4, 50, num_layers=2, dropout=0.5)
    X = ndl.Tensor(np.random.randn(3, 8, 4))
    np.random.seed(1)
    train_out = rnn(X)[0].numpy()
    np.random.seed(2)
    assert not np.allclose(train_out, rnn(X)[0].numpy())  # masks are drawn at every forward
    rnn.eval()
    eval_out = rnn(X)[0].numpy()
    np.testing.assert_array_equal(eval_out, rnn(X)[0].numpy())
    rnn.dropout = 0.0
    rnn.train()
    np.testing.assert_allclose(rnn(X)[0].numpy(), eval_out, rtol=1e-6)


def test_dropout_warning_and_bad_values():
    with pytest.warns(UserWarning, match="dropout"):
        nn.LSTM(3, 4, num_layers=1, dropout=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nn.LSTM(3, 4, num_layers=2, dropout=0.2)
    with pytest.raises(ValueError, match=r"GRU: dropout must be a number in \[0, 1\), got 1.0"):
        nn.GRU(3, 4, num_layers=2, dropout=1.0)


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_bad_lengths(kind):
    module = KINDS[kind][0](3, 4, **KINDS[kind][2])
    X = ndl.Tensor(np.zeros((5, 2, 3)))
    name = KINDS[kind][0].__name__
    with pytest.raises(ValueError, match=rf"{name}: lengths must hold bs=2 values, got shape \(3,\)"):
        module(X, None, [1, 2, 3])
    with pytest.raises(ValueError, match=rf"{name}: lengths must be whole numbers in \[1, seq_len=5\]"):
        module(X, None, [0, 5])
    with pytest.raises(ValueError, match=rf"{name}: lengths must be whole numbers"):
        module(X, None, [6, 5])
    with pytest.raises(ValueError, match=rf"{name}: lengths must be whole numbers"):
        module(X, None, [2.5, 5])


def test_lengths_as_tensor_and_numpy():
    gru = nn.GRU(3, 4)
    X = ndl.Tensor(np.random.randn(5, 3, 3))
    expected = gru(X, None, [5, 2, 4])[0].numpy()
    np.testing.assert_array_equal(gru(X, None, np.array([5, 2, 4]))[0].numpy(), expected)
    np.testing.assert_array_equal(gru(X, None, ndl.Tensor([5, 2, 4], requires_grad=False))[0].numpy(), expected)
    assert (expected[2:, 1] == 0).all() and (expected[4:, 2] == 0).all()


def test_bidirectional_layout():
    lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    assert len(lstm.lstm_cells) == 2 and len(lstm.lstm_cells_reverse) == 2
    assert lstm.lstm_cells[1].W_ih.shape == (8, 16)
    out, (h_n, c_n) = lstm(ndl.Tensor(np.random.randn(2, 5, 3)))
    assert out.shape == (2, 5, 8) and h_n.shape == (4, 2, 4) and c_n.shape == (4, 2, 4)
    with pytest.raises(ValueError, match=r"LSTM: X must be 3-D \(bs, seq_len, input_size\)"):
        lstm(ndl.Tensor(np.zeros((2, 3))))
    with pytest.raises(ValueError, match=r"LSTM: h0 must have shape \(4, 2, 4\), got \(2, 2, 4\)"):
        z = ndl.Tensor(np.zeros((2, 2, 4)))
        lstm(ndl.Tensor(np.random.randn(2, 5, 3)), (z, z))


@pytest.mark.parametrize("k", [1, 3, 7, 50])
@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_recompute_every_equals_keeping_every_state(kind, k):
    """Equal to float32 rounding: the recomputation projects and reduces segment by segment, so its GEMMs
    add in another order than one GEMM over all steps."""
    module_cls, _, kwargs, cells_name = KINDS[kind]
    X = np.random.randn(13, 4, 3).astype(np.float32)
    lens = [13, 5, 9, 1]
    results = []
    for recompute in (None, k):
        np.random.seed(0)
        module = module_cls(3, 6, num_layers=2, bidirectional=True, recompute_every=recompute, **kwargs)
        Xt = ndl.Tensor(X)
        out, _ = module(Xt, None, lens)
        (out * out).sum().backward()
        results.append([out.numpy(), Xt.grad.numpy()] + all_param_grads(module, cells_name))
    for a, e in zip(*results):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def test_recompute_every_must_be_positive():
    with pytest.raises(ValueError, match=r"LSTM: recompute_every must be a positive int or None, got 0"):
        nn.LSTM(3, 4, recompute_every=0)


def torch_grad_flow(module, cells_name, x, lengths):
    """||dL/dh_t|| per layer and step from torch cells unrolled by hand with retain_grad (one direction)."""
    cells = getattr(module, cells_name)
    tcells = []
    for cell in cells:
        is_lstm = isinstance(cell, nn.LSTMCell)
        cls = torch.nn.LSTMCell if is_lstm else (torch.nn.GRUCell if isinstance(cell, nn.GRUCell) else torch.nn.RNNCell)
        kwargs = {"nonlinearity": cell.nonlinearity} if cls is torch.nn.RNNCell else {}
        tcell = cls(cell.input_size, cell.hidden_size, **kwargs).double()
        tcell.weight_ih.data = torch.tensor(cell.W_ih.numpy().T.astype(np.float64))
        tcell.weight_hh.data = torch.tensor(cell.W_hh.numpy().T.astype(np.float64))
        tcell.bias_ih.data = torch.tensor(cell.bias_ih.numpy().astype(np.float64))
        tcell.bias_hh.data = torch.tensor(cell.bias_hh.numpy().astype(np.float64))
        tcells.append(tcell)
    seq_len, bs = x.shape[:2]
    active = torch.tensor((np.arange(seq_len)[:, None] < np.asarray(lengths)[None, :]).astype(np.float64))
    states = [None] * len(tcells)
    probes = [[None] * seq_len for _ in tcells]
    outputs = []
    for t in range(seq_len):
        inp = torch.tensor(x[t].astype(np.float64))
        for layer, tcell in enumerate(tcells):
            m = active[t][:, None]
            zero = torch.zeros(bs, tcell.hidden_size, dtype=torch.float64)
            if isinstance(tcell, torch.nn.LSTMCell):
                prev = states[layer] or (zero, zero)
                h, c = tcell(inp, prev)
                h.retain_grad()
                probes[layer][t] = h
                states[layer] = (h * m + prev[0] * (1 - m), c * m + prev[1] * (1 - m))
            else:
                prev = states[layer] if states[layer] is not None else zero
                h = tcell(inp, prev)
                h.retain_grad()
                probes[layer][t] = h
                states[layer] = h * m + prev * (1 - m)
            inp = h * m
        outputs.append(inp)
    (torch.stack(outputs) ** 2).sum().backward()
    return np.array([[p.grad.norm().item() for p in row] for row in probes])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_grad_flow_matches_torch_hooks(kind, fused):
    module_cls, _, kwargs, cells_name = KINDS[kind]
    module = module_cls(3, 5, num_layers=2, fused=fused, record_grad_flow=True, **kwargs)
    assert module.grad_flow is None
    x = np.random.randn(7, 4, 3).astype(np.float32)
    lens = [7, 3, 5, 2]
    out, _ = module(ndl.Tensor(x), None, lens)
    (out * out).sum().backward()
    expected = torch_grad_flow(module, cells_name, x, lens)
    assert module.grad_flow.shape == (2, 7)
    np.testing.assert_allclose(module.grad_flow, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_grad_flow_bidirectional_fused_equals_reference(kind):
    module_cls, _, kwargs, _ = KINDS[kind]
    module = module_cls(3, 5, num_layers=2, bidirectional=True, batch_first=True, record_grad_flow=True, **kwargs)
    X = ndl.Tensor(np.random.randn(4, 6, 3))
    flows = []
    for fused in (True, False):
        module.fused = fused
        out, _ = module(X, None, [6, 2, 4, 5])
        (out * out).sum().backward()
        flows.append(module.grad_flow)
    assert flows[0].shape == (4, 6)
    np.testing.assert_allclose(flows[0], flows[1], rtol=1e-5, atol=1e-6)
    # every step has at least one sequence still going, so every entry is positive
    assert (flows[0] > 0).all()


@pytest.fixture
def side_by_side(monkeypatch):
    """Two threads and no size threshold: every fused bidirectional layer runs its directions' loops side by
    side (the machine may have one core, and these sizes are below the threshold)."""
    from needle.backend_ndarray import parallel_numpy as P
    monkeypatch.setitem(P._state, "threads", 2)
    monkeypatch.setitem(P._state, "pool", None)
    monkeypatch.setattr(P, "_SIDE_BY_SIDE_MIN", 0)
    threads = []
    advance = P._advance

    def spy(kernel):
        threads.append(__import__("threading").current_thread().name)
        return advance(kernel)
    monkeypatch.setattr(P, "_advance", spy)
    return threads


@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "len"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_bidirectional_side_by_side_matches_torch(side_by_side, kind, use_lengths):
    module, tmodule, cells_name = make(kind, True, False, True, layers=2, hidden=6, input_size=4)
    is_lstm = kind == "lstm"
    x, lens, h0 = inputs(False, True, 2, bs=5, seq_len=7, input_size=4, hidden=6, lengths=use_lengths,
                         is_lstm=is_lstm)
    values, tvalues, grads, tgrads = run_both(module, tmodule, x, lens, h0, is_lstm)
    for a, e in zip(values + grads + all_param_grads(module, cells_name), tvalues + tgrads
                    + torch_param_grads(tmodule, 2, True)):
        np.testing.assert_allclose(a, e, rtol=TOL, atol=TOL)
    # each layer's loops ran on two threads, in forward and in backward
    assert any(name.startswith("needle") for name in side_by_side)


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_bidirectional_side_by_side_grad_flow_and_recompute(side_by_side, kind):
    module_cls, _, kwargs, _ = KINDS[kind]
    X = ndl.Tensor(np.random.randn(9, 4, 3))
    results = []
    for fused, recompute in ((False, None), (True, None), (True, 4)):
        np.random.seed(0)
        module = module_cls(3, 5, num_layers=2, bidirectional=True, fused=fused, recompute_every=recompute,
                            record_grad_flow=True, **kwargs)
        out, _ = module(X, None, [9, 2, 4, 9])
        (out * out).sum().backward()
        results.append([out.numpy(), module.grad_flow] + [p.grad.numpy() for p in module.parameters()])
        # the fused (compiled) loops ran side by side, under recompute_every too
        assert any(name.startswith("needle") for name in side_by_side) == fused
        side_by_side.clear()
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
