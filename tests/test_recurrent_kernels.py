"""The numpy whole-sequence RNN/LSTM/GRU kernels against torch.nn (forward and BPTT).

Needle's weights are the transpose of torch's: W_ih (I, G*H) = weight_ih_l0.T.
"""

import importlib.util
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

# Load the kernel file directly: needle/__init__.py may be mid-construction.
_PATH = pathlib.Path(__file__).resolve().parents[1] / "needle" / "backend_ndarray" / "recurrent_numpy.py"
_spec = importlib.util.spec_from_file_location("_recurrent_numpy_under_test", _PATH)
K = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(K)

GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
TOL = {np.float64: dict(rtol=1e-9, atol=1e-10), np.float32: dict(rtol=2e-4, atol=2e-5)}


def _make(kind, T, B, I, H, bias, dtype, seed=0):
    rng = np.random.default_rng(seed)
    G = GATES[kind]
    s = 1.0 / np.sqrt(H)
    p = dict(
        X=rng.standard_normal((T, B, I)),
        h0=rng.standard_normal((B, H)) * 0.5,
        c0=rng.standard_normal((B, H)) * 0.5,
        W_ih=rng.uniform(-s, s, (I, G * H)),
        W_hh=rng.uniform(-s, s, (H, G * H)),
        b_ih=rng.uniform(-s, s, G * H) if bias else None,
        b_hh=rng.uniform(-s, s, G * H) if bias else None,
        dY=rng.standard_normal((T, B, H)),
        dh_n=rng.standard_normal((B, H)),
        dc_n=rng.standard_normal((B, H)),
    )
    return {k: (None if v is None else v.astype(dtype)) for k, v in p.items()}


def _torch_ref(kind, p, use_dY=True, use_dhn=True, use_dcn=True):
    """Run torch.nn in float64 and return outputs and gradients in needle layouts."""
    T, B, I = p["X"].shape
    H = p["W_hh"].shape[0]
    bias = p["b_ih"] is not None
    if kind.startswith("rnn"):
        m = torch.nn.RNN(I, H, num_layers=1, bias=bias, nonlinearity=kind[4:])
    elif kind == "lstm":
        m = torch.nn.LSTM(I, H, num_layers=1, bias=bias)
    else:
        m = torch.nn.GRU(I, H, num_layers=1, bias=bias)
    m = m.double()
    t64 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64).copy())
    with torch.no_grad():
        m.weight_ih_l0.copy_(t64(p["W_ih"].T))
        m.weight_hh_l0.copy_(t64(p["W_hh"].T))
        if bias:
            m.bias_ih_l0.copy_(t64(p["b_ih"]))
            m.bias_hh_l0.copy_(t64(p["b_hh"]))
    X = t64(p["X"]).requires_grad_()
    h0 = t64(p["h0"])[None].requires_grad_()
    if kind == "lstm":
        c0 = t64(p["c0"])[None].requires_grad_()
        Y, (hn, cn) = m(X, (h0, c0))
    else:
        Y, hn = m(X, h0)
    loss = hn.sum() * 0
    if use_dY:
        loss = loss + (Y * t64(p["dY"])).sum()
    if use_dhn:
        loss = loss + (hn[0] * t64(p["dh_n"])).sum()
    if kind == "lstm" and use_dcn:
        loss = loss + (cn[0] * t64(p["dc_n"])).sum()
    loss.backward()
    out = dict(Y=Y, h_n=hn[0], dX=X.grad, dh0=h0.grad[0],
               dW_ih=m.weight_ih_l0.grad.T, dW_hh=m.weight_hh_l0.grad.T)
    if kind == "lstm":
        out.update(c_n=cn[0], dc0=c0.grad[0])
    if bias:
        out.update(db_ih=m.bias_ih_l0.grad, db_hh=m.bias_hh_l0.grad)
    return {k: v.detach().numpy() for k, v in out.items()}


def _ours(kind, p, use_dY=True, use_dhn=True, use_dcn=True):
    dY = p["dY"] if use_dY else None
    dhn = p["dh_n"] if use_dhn else None
    dcn = p["dc_n"] if use_dcn else None
    w = (p["W_ih"], p["W_hh"], p["b_ih"], p["b_hh"])
    if kind.startswith("rnn"):
        Y, hn, saved = K.rnn_forward(p["X"], p["h0"], *w, nonlinearity=kind[4:])
        g = K.rnn_backward(dY, dhn, saved)
        out = dict(Y=Y, h_n=hn)
        names = ("dX", "dh0", "dW_ih", "dW_hh", "db_ih", "db_hh")
    elif kind == "lstm":
        Y, hn, cn, saved = K.lstm_forward(p["X"], p["h0"], p["c0"], *w)
        g = K.lstm_backward(dY, dhn, dcn, saved)
        out = dict(Y=Y, h_n=hn, c_n=cn)
        names = ("dX", "dh0", "dc0", "dW_ih", "dW_hh", "db_ih", "db_hh")
    else:
        Y, hn, saved = K.gru_forward(p["X"], p["h0"], *w)
        g = K.gru_backward(dY, dhn, saved)
        out = dict(Y=Y, h_n=hn)
        names = ("dX", "dh0", "dW_ih", "dW_hh", "db_ih", "db_hh")
    assert len(g) == len(names)
    out.update(zip(names, g))
    return out, saved


def _compare(ours, ref, dtype, bias):
    for k, v in ref.items():
        a = ours[k]
        assert a is not None, k
        assert a.dtype == dtype, (k, a.dtype)
        assert a.shape == v.shape, (k, a.shape, v.shape)
        np.testing.assert_allclose(a, v, err_msg=k, **TOL[dtype])
    if not bias:
        assert ours["db_ih"] is None and ours["db_hh"] is None


SHAPES = [  # (T, B, I, H)
    (13, 15, 11, 12),
    (1, 15, 11, 12),
    (13, 1, 1, 12),
    (13, 15, 11, 1),
    (1, 1, 1, 1),
    (7, 3, 5, 4),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("kind", list(GATES))
def test_against_torch(kind, shape, bias, dtype):
    p = _make(kind, *shape, bias, dtype)
    ours, _ = _ours(kind, p)
    _compare(ours, _torch_ref(kind, p), dtype, bias)


@pytest.mark.parametrize("kind", list(GATES))
@pytest.mark.parametrize("which", ["dY", "dhn", "dcn", "all"])
def test_none_upstream_grads(kind, which):
    """dY, dh_n, dc_n given as None mean zeros."""
    if which == "dcn" and kind != "lstm":
        pytest.skip("only the LSTM has dc_n")
    flags = dict(use_dY=which != "dY" and which != "all",
                 use_dhn=which != "dhn" and which != "all",
                 use_dcn=which != "dcn" and which != "all")
    p = _make(kind, 13, 15, 11, 12, True, np.float64, seed=1)
    ours, _ = _ours(kind, p, **flags)
    _compare(ours, _torch_ref(kind, p, **flags), np.float64, True)


@pytest.mark.parametrize("kind", list(GATES))
def test_long_sequence_blocks(kind):
    """Long enough that the backward's bulk work runs in several blocks of steps."""
    p = _make(kind, 40, 16, 9, 256, True, np.float64, seed=2)
    ours, _ = _ours(kind, p)
    _compare(ours, _torch_ref(kind, p), np.float64, True)


@pytest.mark.parametrize("kind", list(GATES))
def test_noncontiguous_inputs_unmodified_and_repeatable(kind):
    p = _make(kind, 6, 4, 5, 3, True, np.float64, seed=3)
    q = dict(p)
    # non-contiguous versions of every input: transposed storage / strided slices
    q["X"] = np.asfortranarray(p["X"])
    q["h0"] = np.asfortranarray(p["h0"])
    q["c0"] = np.asfortranarray(p["c0"])
    q["W_ih"] = np.ascontiguousarray(p["W_ih"].T).T
    q["W_hh"] = np.ascontiguousarray(p["W_hh"].T).T
    q["b_ih"] = np.repeat(p["b_ih"], 2)[::2]
    q["dY"] = np.asfortranarray(p["dY"])
    copies = {k: v.copy() for k, v in q.items()}
    ours, saved = _ours(kind, q)
    for k, v in q.items():
        np.testing.assert_array_equal(v, copies[k], err_msg="input %s was modified" % k)
    _compare(ours, _torch_ref(kind, p), np.float64, True)
    # the backward must not consume `saved`: a second call gives the same gradients
    back = {"lstm": lambda: K.lstm_backward(q["dY"], q["dh_n"], q["dc_n"], saved)}.get(
        kind, lambda: getattr(K, kind[:3] + "_backward")(q["dY"], q["dh_n"], saved))
    again = back()
    first = [ours[k] for k in (("dX", "dh0", "dc0") if kind == "lstm" else ("dX", "dh0"))]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", list(GATES))
def test_float32_stays_float32(kind):
    p = _make(kind, 5, 3, 4, 6, True, np.float32)
    ours, saved = _ours(kind, p)
    for k, v in ours.items():
        assert v.dtype == np.float32, k
    for a in saved:
        if isinstance(a, np.ndarray):
            assert a.dtype == np.float32
