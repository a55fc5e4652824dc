"""The numpy whole-sequence RNN/LSTM/GRU kernels against torch.nn (forward and BPTT).

Needle's weights are the transpose of torch's: W_ih (I, G*H) = weight_ih_l0.T.
"""

import numpy as np
import pytest

from needle.backend_ndarray import recurrent_numpy as K

torch = pytest.importorskip("torch")

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


def _torch_ref(kind, p, use_dY=True, use_dhn=True, use_dcn=True, lengths=None):
    """Run torch.nn in float64 and return outputs and gradients in needle layouts.
    lengths (sorted, longest first): pack_padded_sequence -> module -> pad_packed_sequence."""
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
    inp = X
    if lengths is not None:
        lens = torch.as_tensor(np.asarray(lengths))
        inp = torch.nn.utils.rnn.pack_padded_sequence(X, lens, enforce_sorted=True)
    if kind == "lstm":
        c0 = t64(p["c0"])[None].requires_grad_()
        Y, (hn, cn) = m(inp, (h0, c0))
    else:
        Y, hn = m(inp, h0)
    if lengths is not None:
        Y, _ = torch.nn.utils.rnn.pad_packed_sequence(Y, total_length=T)
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


def _ours(kind, p, use_dY=True, use_dhn=True, use_dcn=True, back=None, **options):
    """Our forward (with keyword options) and backward (with keyword options `back`)."""
    dY = p["dY"] if use_dY else None
    dhn = p["dh_n"] if use_dhn else None
    dcn = p["dc_n"] if use_dcn else None
    w = (p["W_ih"], p["W_hh"], p["b_ih"], p["b_hh"])
    back = back or {}
    if kind.startswith("rnn"):
        Y, hn, saved = K.rnn_forward(p["X"], p["h0"], *w, nonlinearity=kind[4:], **options)
        g = K.rnn_backward(dY, dhn, saved, **back)
        out = dict(Y=Y, h_n=hn)
        names = ("dX", "dh0", "dW_ih", "dW_hh", "db_ih", "db_hh")
    elif kind == "lstm":
        Y, hn, cn, saved = K.lstm_forward(p["X"], p["h0"], p["c0"], *w, **options)
        g = K.lstm_backward(dY, dhn, dcn, saved, **back)
        out = dict(Y=Y, h_n=hn, c_n=cn)
        names = ("dX", "dh0", "dc0", "dW_ih", "dW_hh", "db_ih", "db_hh")
    else:
        Y, hn, saved = K.gru_forward(p["X"], p["h0"], *w, **options)
        g = K.gru_backward(dY, dhn, saved, **back)
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


# The plain paths' step layouts. "auto": the sizes here are all small, so the LSTM and GRU run feature-major
# (below _FEATURE_MAJOR_MAX_BATCH and _FEATURE_MAJOR_MAX_HIDDEN) and no step GEMM reaches the small-matrix
# limit; "batch-major": forced; "small-gemm": the limit lowered so that the batch-major steps split their
# GEMMs into column blocks (_column_blocks), forward and backward, and the LSTM and GRU then run batch-major
# wherever that splits.
LAYOUTS = ("auto", "batch-major", "small-gemm")


def _set_layout(monkeypatch, layout, kind, B, H):
    """Apply `layout` and return whether the LSTM/GRU should then run feature-major."""
    if layout == "batch-major":
        monkeypatch.setattr(K, "_FEATURE_MAJOR_MAX_BATCH", 0)
    if layout == "small-gemm":
        # about three blocks of the G*H forward columns (and of the H backward ones), whatever this BLAS
        monkeypatch.setattr(K, "_has_small_gemm_kernel", lambda: True)
        monkeypatch.setattr(K, "_SMALL_GEMM_MACS", B * H * max(1, GATES[kind] * H // 3))
        monkeypatch.setattr(K, "_SMALL_GEMM_MAX_BLOCKS", 64)
    fm = layout != "batch-major" and K._small_gemm_width(B, H, GATES[kind] * H) is None
    return fm and kind in ("lstm", "gru")       # the RNN has no feature-major path


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("kind", list(GATES))
def test_against_torch(kind, shape, bias, dtype, layout, monkeypatch):
    feature_major = _set_layout(monkeypatch, layout, kind, shape[1], shape[3])
    p = _make(kind, *shape, bias, dtype)
    ours, saved = _ours(kind, p)
    _compare(ours, _torch_ref(kind, p), dtype, bias)
    # the layout asked for is the one that ran
    assert isinstance(saved, K._FeatureMajor) == feature_major
    if layout == "auto" and kind in ("lstm", "gru"):
        assert feature_major


def test_small_gemm_blocks(monkeypatch):
    """_column_blocks: contiguous blocks that cover W's columns in order, each product within the limit;
    one block where the product is small already or would need too many blocks, or without the kernel."""
    monkeypatch.setattr(K, "_has_small_gemm_kernel", lambda: True)
    W = np.arange(200 * 800, dtype=np.float32).reshape(200, 800)
    for rows, n in ((10, 2), (12, 2), (16, 1), (20, 1), (4, 1)):
        blocks = K._column_blocks(W, rows)
        assert len(blocks) == n, rows
        np.testing.assert_array_equal(np.concatenate([w for w, _ in blocks], axis=1), W)
        np.testing.assert_array_equal(np.concatenate([W[:, cols] for _, cols in blocks], axis=1), W)
        if n > 1:
            assert all(w.flags.c_contiguous and rows * 200 * w.shape[1] <= K._SMALL_GEMM_MACS for w, _ in blocks)
    assert K._column_blocks(W, 10)[0][1] == slice(0, 400)      # whole 16-float vectors, even blocks
    monkeypatch.setattr(K, "_has_small_gemm_kernel", lambda: False)
    assert len(K._column_blocks(W, 10)) == 1


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


@pytest.mark.parametrize("batch", [4, 1])
@pytest.mark.parametrize("kind", list(GATES))
def test_noncontiguous_inputs_unmodified_and_repeatable(kind, batch):
    p = _make(kind, 6, batch, 5, 3, True, np.float64, seed=3)
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


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("use_dY", [True, False], ids=["dY", "noDY"])
@pytest.mark.parametrize("kind", list(GATES))
def test_other_code_paths(kind, use_dY, dtype, layout, monkeypatch):
    """The size-dependent paths: W_hh @ dA^T instead of a W_hh^T copy, one-step blocks, every layout."""
    _set_layout(monkeypatch, layout, kind, 5, 6)
    monkeypatch.setattr(K, "_WT_COPY_MAX", 0)
    monkeypatch.setattr(K, "_BLOCK_BYTES", 1)
    p = _make(kind, 9, 5, 7, 6, True, dtype, seed=4)
    ours, _ = _ours(kind, p, use_dY=use_dY)
    _compare(ours, _torch_ref(kind, p, use_dY=use_dY), dtype, True)


# ------------------------------------------------------------------------------------------
# lengths, recompute_every, grad_sq
# ------------------------------------------------------------------------------------------

LENGTHS = {  # B = 6 sequences, T = 9 steps, sorted longest first
    "mixed": [9, 7, 7, 4, 2, 1],
    "oneshort": [9, 9, 9, 9, 9, 3],
    "allshort": [6, 5, 3, 3, 1, 1],
}


def _back_names(kind):
    return ("dX", "dh0", "dc0") if kind == "lstm" else ("dX", "dh0")


# _PACK_MIN_MACS: 0 = the GEMMs run over the packed active rows, huge = over all rows (padded zero)
PACK = {"packed": 0, "padded": 1 << 62}


@pytest.mark.parametrize("pack", list(PACK))
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("lens", list(LENGTHS))
@pytest.mark.parametrize("kind", list(GATES))
def test_lengths_against_torch_packed(kind, lens, dtype, pack, monkeypatch):
    """Y (zero past each length), h_n, c_n and every gradient, dh0 and dc0 included."""
    monkeypatch.setattr(K, "_PACK_MIN_MACS", PACK[pack])
    p = _make(kind, 9, 6, 5, 4, True, dtype, seed=5)
    lengths = np.array(LENGTHS[lens])
    ours, _ = _ours(kind, p, lengths=lengths)
    _compare(ours, _torch_ref(kind, p, lengths=lengths), dtype, True)
    pad = np.arange(9)[:, None] >= lengths[None, :]
    assert (ours["Y"][pad] == 0).all() and (ours["dX"][pad] == 0).all()


@pytest.mark.parametrize("k", [None, 2, 4])
@pytest.mark.parametrize("kind", list(GATES))
def test_lengths_and_recompute_with_small_gemm_blocks(kind, k, monkeypatch):
    """The lengths and recompute paths with their step GEMMs split into column blocks (forward, backward and
    the backward's recomputed forward), against torch, and bitwise equal to the same call without
    recomputation."""
    _set_layout(monkeypatch, "small-gemm", kind, 6, 4)
    assert K._small_gemm_width(6, 4, GATES[kind] * 4) is not None
    lengths = np.array(LENGTHS["mixed"])
    p = _make(kind, 9, 6, 5, 4, True, np.float64, seed=7)
    ours, _ = _ours(kind, p, lengths=lengths, recompute_every=k)
    _compare(ours, _torch_ref(kind, p, lengths=lengths), np.float64, True)
    monkeypatch.setattr(K, "_RECOMPUTE_EXACT", True)
    for lens in (lengths, None):
        ref, _ = _ours(kind, p, lengths=lens)
        again, _ = _ours(kind, p, lengths=lens, recompute_every=k)
        for name, v in ref.items():
            np.testing.assert_array_equal(again[name], v, err_msg=name)


@pytest.mark.parametrize("kind", list(GATES))
def test_lengths_paths_and_none_upstreams(kind, monkeypatch):
    """lengths with the W_hh @ dA^T path, one-step blocks, no bias, dY or dh_n given as None,
    and recompute_every; dY at padded positions is ignored (NaN there changes nothing)."""
    monkeypatch.setattr(K, "_WT_COPY_MAX", 0)
    monkeypatch.setattr(K, "_BLOCK_BYTES", 1)
    lengths = np.array(LENGTHS["mixed"])
    p = _make(kind, 9, 6, 5, 4, False, np.float64, seed=6)
    nan = dict(p, dY=p["dY"].copy())
    nan["dY"][np.arange(9)[:, None] >= lengths[None, :]] = np.nan
    for flags in (dict(use_dY=False), dict(use_dhn=False, use_dcn=False), {}):
        ref = _torch_ref(kind, p, lengths=lengths, **flags)
        for k in (None, 2):
            for pack in PACK.values():
                monkeypatch.setattr(K, "_PACK_MIN_MACS", pack)
                ours, _ = _ours(kind, nan, lengths=lengths, recompute_every=k, **flags)
                _compare(ours, ref, np.float64, False)


@pytest.mark.parametrize("k", [None, 4])
@pytest.mark.parametrize("kind", list(GATES))
def test_unsorted_lengths_are_the_sorted_call_in_that_order(kind, k):
    """The kernel sorts the batch itself: any order of the sequences gives the sorted call's outputs, input
    and state gradients and grad_sq rows in that order, and the same weight gradients."""
    p = _make(kind, 9, 6, 5, 4, True, np.float64, seed=15)
    lengths = np.array(LENGTHS["mixed"])
    perm = np.array([3, 0, 5, 1, 4, 2])
    batch_axis = dict(X=1, dY=1, h0=0, c0=0, dh_n=0, dc_n=0, Y=1, dX=1, h_n=0, c_n=0, dh0=0, dc0=0)
    shuffled = {name: (v.take(perm, axis=batch_axis[name]) if name in batch_axis else v) for name, v in p.items()}
    g, g_shuffled = np.zeros((9, 6)), np.zeros((9, 6))
    ref, _ = _ours(kind, p, lengths=lengths, recompute_every=k, back=dict(grad_sq=g))
    ours, _ = _ours(kind, shuffled, lengths=lengths[perm], recompute_every=k, back=dict(grad_sq=g_shuffled))
    for name, v in ref.items():
        expected = v.take(perm, axis=batch_axis[name]) if name in batch_axis else v
        np.testing.assert_allclose(ours[name], expected, rtol=1e-12, atol=1e-13, err_msg=name)
    np.testing.assert_allclose(g_shuffled, g[:, perm], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kind", list(GATES))
def test_full_lengths_are_the_plain_path(kind):
    p = _make(kind, 5, 3, 4, 3, True, np.float32, seed=7)
    plain, _ = _ours(kind, p)
    full, _ = _ours(kind, p, lengths=[5, 5, 5])
    for name, v in plain.items():
        np.testing.assert_array_equal(full[name], v, err_msg=name)


RECOMPUTE_K = [1, 2, 3, 9, 14]   # T = 9


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("lens", [None, "mixed", "allshort", "mixed-packed"])
@pytest.mark.parametrize("kind", list(GATES))
def test_recompute_is_bitwise_identical(kind, lens, dtype, monkeypatch):
    """Exact recomputation is bitwise the batch-major plain path (the LSTM's feature-major path for small
    batches adds in another order: equal to rounding, as the other tests check against torch)."""
    monkeypatch.setattr(K, "_RECOMPUTE_EXACT", True)
    monkeypatch.setattr(K, "_FEATURE_MAJOR_MAX_BATCH", 0)
    if lens == "mixed-packed":
        monkeypatch.setattr(K, "_PACK_MIN_MACS", 0)
        lens = "mixed"
    lengths = None if lens is None else np.array(LENGTHS[lens])
    p = _make(kind, 9, 6, 5, 7, True, dtype, seed=8)
    g_ref = np.zeros((9, 6), dtype)
    ref, _ = _ours(kind, p, lengths=lengths, back=dict(grad_sq=g_ref))
    for k in RECOMPUTE_K:
        g = np.zeros((9, 6), dtype)
        ours, saved = _ours(kind, p, lengths=lengths, recompute_every=k, back=dict(grad_sq=g))
        for name, v in ref.items():
            if v is None:
                assert ours[name] is None
            else:
                np.testing.assert_array_equal(ours[name], v, err_msg="%s k=%d" % (name, k))
        np.testing.assert_array_equal(g, g_ref)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recompute_bitwise_on_awkward_gemm_shapes(kind, monkeypatch):
    """Shapes where, with this machine's OpenBLAS, a segment-sized projection GEMM differs from the
    all-steps one in the last bits (Y itself would differ); the one-GEMM recomputation does not."""
    monkeypatch.setattr(K, "_RECOMPUTE_EXACT", True)
    monkeypatch.setattr(K, "_FEATURE_MAJOR_MAX_BATCH", 0)
    p = _make(kind, 40, 3, 50, 50, True, np.float32, seed=9)
    ref, _ = _ours(kind, p)
    for k in (3, 7):
        ours, _ = _ours(kind, p, recompute_every=k)
        for name, v in ref.items():
            np.testing.assert_array_equal(ours[name], v, err_msg="%s k=%d" % (name, k))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recompute_saved_memory(kind):
    """saved keeps no (T, B, G*H) arrays under recompute: only Y's buffer, X, weight-sized copies
    and (LSTM) c at steps 0, k, 2k, ..."""
    T, B, I, H, k = 24, 5, 4, 6, 5
    p = _make(kind, T, B, I, H, True, np.float32, seed=10)
    ours, saved = _ours(kind, p, recompute_every=k)
    X, Hs = saved[0], saved[3]
    assert Hs.shape == (T + 1, B, H) and np.shares_memory(Hs, ours["Y"])   # Y's own buffer
    extra = [a for a in saved[4:-1] if isinstance(a, np.ndarray)] + [
        a for a in saved[-1].values() if isinstance(a, np.ndarray)]
    assert [a.shape for a in extra if a.size >= T * B * H] == []
    if kind == "lstm":
        assert saved[-1]["ck"].shape == (-(-T // k), B, H)
    _, plain = _ours(kind, p)
    plain_extra = sum(a.nbytes for a in plain[4:] if isinstance(a, np.ndarray))
    assert plain_extra > 8 * sum(a.nbytes for a in extra)


@pytest.mark.parametrize("lens", [None, "mixed"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recompute_per_segment_mode(kind, lens, monkeypatch):
    """_RECOMPUTE_EXACT = False (the default): O(k) memory in the backward; equal to rounding, and to torch."""
    monkeypatch.setattr(K, "_RECOMPUTE_EXACT", False)
    monkeypatch.setattr(K, "_PACK_MIN_MACS", 0)        # packing applies to the one-GEMM mode only
    lengths = None if lens is None else np.array(LENGTHS[lens])
    for dtype, tol in ((np.float64, dict(rtol=1e-12, atol=1e-13)), (np.float32, dict(rtol=1e-5, atol=1e-6))):
        p = _make(kind, 9, 6, 5, 7, True, dtype, seed=11)
        ref, _ = _ours(kind, p, lengths=lengths)
        for k in (1, 4, 9, 12):
            ours, saved = _ours(kind, p, lengths=lengths, recompute_every=k)
            assert saved[-1]["exact"] is False
            for name, v in ref.items():
                np.testing.assert_allclose(ours[name], v, err_msg="%s k=%d" % (name, k), **tol)
    ours, _ = _ours(kind, p, lengths=lengths, recompute_every=4)
    _compare(ours, _torch_ref(kind, p, lengths=lengths), np.float32, True)


def _torch_grad_sq(kind, p, lengths, use_dhn=True):
    """||dL/dh_t||^2 per step and row from torch cells unrolled by hand (retain_grad on each h_t),
    finished sequences masked out as in a packed sequence; loss as in _torch_ref."""
    T, B, I = p["X"].shape
    H = p["W_hh"].shape[0]
    t64 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64).copy())
    if kind.startswith("rnn"):
        cell = torch.nn.RNNCell(I, H, nonlinearity=kind[4:])
    else:
        cell = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell}[kind](I, H)
    cell = cell.double()
    with torch.no_grad():
        cell.weight_ih.copy_(t64(p["W_ih"].T))
        cell.weight_hh.copy_(t64(p["W_hh"].T))
        cell.bias_ih.copy_(t64(p["b_ih"]))
        cell.bias_hh.copy_(t64(p["b_hh"]))
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    active = t64(np.arange(T)[:, None] < lengths[None, :])
    h, c = t64(p["h0"]), t64(p["c0"])
    loss, probes = 0, []
    for t in range(T):
        m = active[t][:, None]
        if kind == "lstm":
            hn, cn = cell(t64(p["X"][t]), (h, c))
            c = cn * m + c * (1 - m)
        else:
            hn = cell(t64(p["X"][t]), h)
        hn.retain_grad()
        probes.append(hn)
        h = hn * m + h * (1 - m)
        loss = loss + (hn * m * t64(p["dY"][t])).sum()
    if use_dhn:
        loss = loss + (h * t64(p["dh_n"])).sum()
    if kind == "lstm":
        loss = loss + (c * t64(p["dc_n"])).sum()
    loss.backward()
    return np.stack([(q.grad ** 2).sum(1).numpy() * active[t].numpy() for t, q in enumerate(probes)])


@pytest.mark.parametrize("lens", [None, "mixed"])
@pytest.mark.parametrize("kind", list(GATES))
def test_grad_sq_against_torch_cells(kind, lens, monkeypatch):
    lengths = None if lens is None else np.array(LENGTHS[lens])
    p = _make(kind, 9, 6, 5, 4, True, np.float64, seed=12)
    expected = _torch_grad_sq(kind, p, lengths)
    plain, _ = _ours(kind, p, lengths=lengths)
    for k in (None, 4):
        for paths in ((), (("_WT_COPY_MAX", 0), ("_BLOCK_BYTES", 1), ("_PACK_MIN_MACS", 0))):
            with monkeypatch.context() as mp:
                for name, value in paths:
                    mp.setattr(K, name, value)
                g = np.zeros((9, 6))
                ours, _ = _ours(kind, p, lengths=lengths, recompute_every=k, back=dict(grad_sq=g))
            np.testing.assert_allclose(g, expected, rtol=1e-9, atol=1e-12)
            for name, v in plain.items():   # asking for grad_sq changes no gradient
                np.testing.assert_allclose(ours[name], v, rtol=1e-12, atol=1e-13, err_msg=name)
    # without dh_n, padded and ending rows see only dY
    g = np.zeros((9, 6))
    _ours(kind, p, lengths=lengths, use_dhn=False, back=dict(grad_sq=g))
    np.testing.assert_allclose(g, _torch_grad_sq(kind, p, lengths, use_dhn=False), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", list(GATES))
def test_grad_sq_plain_path_is_bitwise_plain(kind):
    """On the plain path grad_sq goes through the general loop: same gradients, bit for bit."""
    p = _make(kind, 7, 4, 3, 5, True, np.float32, seed=13)
    plain, _ = _ours(kind, p)
    ours, _ = _ours(kind, p, back=dict(grad_sq=np.zeros((7, 4), np.float32)))
    for name, v in plain.items():
        np.testing.assert_array_equal(ours[name], v, err_msg=name)


@pytest.mark.parametrize("kind", list(GATES))
def test_option_errors_and_inputs_unmodified(kind):
    p = _make(kind, 5, 3, 4, 3, True, np.float64, seed=14)
    for bad in ([5, 3, 0], [6, 3, 2], [5, 2.5, 1], [5, 3], [[5, 3, 2]]):
        with pytest.raises(ValueError, match="lengths"):
            _ours(kind, p, lengths=bad)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="recompute_every"):
            _ours(kind, p, recompute_every=bad)
    with pytest.raises(ValueError, match="grad_sq"):
        _ours(kind, p, back=dict(grad_sq=np.zeros((5, 2))))
    copies = {name: v.copy() for name, v in p.items() if v is not None}
    for k in (None, 2):
        first, saved = _ours(kind, p, lengths=[5, 4, 2], recompute_every=k, back=dict(grad_sq=np.zeros((5, 3))))
        # the backward does not consume `saved`: a second call gives the same gradients
        ups = (p["dY"], p["dh_n"]) + ((p["dc_n"],) if kind == "lstm" else ())
        again = getattr(K, kind[:4].rstrip("_") + "_backward")(*ups, saved)
        for name, v in zip(_back_names(kind), again):
            np.testing.assert_array_equal(v, first[name], err_msg=name)
    for name, v in copies.items():
        np.testing.assert_array_equal(p[name], v, err_msg=name)
