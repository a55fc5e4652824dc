"""Whole-sequence recurrent kernels in plain numpy: forward and hand-written BPTT.

One layer of an Elman RNN, an LSTM or a GRU over a whole sequence, with PyTorch's
equations but needle's layouts (weights are the transpose of PyTorch's):

    X: (T, B, I)    h0, c0: (B, H)    Y: (T, B, H), Y[t] = h_t
    W_ih: (I, G*H)  W_hh: (H, G*H)    b_ih, b_hh: (G*H,) or None
    G = 1 (RNN), 4 (LSTM, gate columns i, f, g, o), 3 (GRU, gate columns r, z, n)

    RNN   h_t = act(x_t W_ih + b_ih + h_{t-1} W_hh + b_hh),  act = tanh or relu
    LSTM  [i, f, g, o] = x_t W_ih + b_ih + h_{t-1} W_hh + b_hh
          i, f, o = sigmoid(.),  g = tanh(.)
          c_t = f * c_{t-1} + i * g,   h_t = o * tanh(c_t)
    GRU   r = sigmoid(x W_ir + b_ir + h W_hr + b_hr)
          z = sigmoid(x W_iz + b_iz + h W_hz + b_hz)
          n = tanh(x W_in + b_in + r * (h W_hn + b_hn))
          h' = (1 - z) * n + z * h  =  n + z * (h - n)

Everything is computed in X's dtype (float32 normally, float64 for gradient checks).

How it is made fast (see /work/shared/PERF_NOTES.md):
  * the input projection of all T steps is one GEMM before the loop; so are dX, dW_ih,
    dW_hh and the bias gradients after the backward loop, because every step's gate
    gradients are written into one (T*B, G*H) buffer;
  * hidden states live in one (T+1, B, H) buffer [h0, h_1, ..., h_T], so H_prev for the
    dW_hh GEMM is a free view and Y is a view as well;
  * sigmoid(x) = 0.5 * tanh(x / 2) + 0.5, and the 1/2 is folded into (exact) scaled copies
    of the sigmoid gates' weight columns, so a step does ONE tanh over all its gates;
  * gate columns are reordered internally so that the gates that share an operation are
    adjacent: LSTM uses (o, i, f, g) -- sigmoid gates o,i,f are one slice in the forward, and
    i,f,g (all scaled by dc) one slice in the backward; the GRU keeps (n, r, z) for the input
    side and torch's (r, z, n) for the hidden side of a 4H-wide gradient buffer
    [da_n | da_r | da_z | d(hW_hn)], so both weight-gradient GEMMs read plain slices;
  * in the backward, every factor that does not depend on the recurrence (sigmoid and tanh
    derivatives times the other operand of each product) is computed in bulk, block by
    block of time steps while the block is hot in cache, straight into the gradient
    buffer; a step then only does its GEMM and a few in-place multiplies;
  * preallocated buffers, out= and in-place ufuncs; a contiguous W_hh^T for the backward.
"""

import numpy as np

__all__ = [
    "rnn_forward", "rnn_backward",
    "lstm_forward", "lstm_backward",
    "gru_forward", "gru_backward",
]

# Bulk elementwise work in the backward is done over blocks of time steps whose gate rows
# take about this many bytes: small enough to stay in L2 (2 MiB here) while the loop uses them.
_BLOCK_BYTES = 1 << 19


def _arr(a, dt):
    """Contiguous array of dtype dt (no copy when it already is one), None stays None."""
    if a is None:
        return None
    return np.ascontiguousarray(a, dtype=dt)


def _start(X, W_ih, W_hh):
    X = np.ascontiguousarray(X)
    if X.dtype.kind != "f":
        X = X.astype(np.float32)
    dt = X.dtype
    return X, dt, _arr(W_ih, dt), _arr(W_hh, dt)


def _h0(h0, B, H, dt):
    return np.zeros((B, H), dt) if h0 is None else _arr(h0, dt)


def _blocks(T, row_bytes):
    """Split range(T) (walked backwards) into blocks of steps of about _BLOCK_BYTES."""
    k = max(1, _BLOCK_BYTES // max(1, row_bytes))
    out = []
    hi = T
    while hi > 0:
        lo = max(0, hi - k)
        out.append((lo, hi))
        hi = lo
    return out


def _weight_grads(Xf, Hprev, dG):
    """dW_ih = X^T dG and dW_hh = H_prev^T dG (each (rows, GH))."""
    return Xf.T @ dG, Hprev.T @ dG


# ----------------------------------------------------------------------------------------
# Elman RNN
# ----------------------------------------------------------------------------------------

def rnn_forward(X, h0, W_ih, W_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    """Elman RNN over a whole sequence.

    Returns (Y, h_n, saved). Y (T, B, H) is a view of the hidden-state buffer kept in saved;
    h_n is a fresh copy of h_T.
    saved = (X, W_ih, W_hh, Hs, relu, has_b_ih, has_b_hh) where Hs is the (T+1, B, H) buffer
    [h0, h_1, ..., h_T]: O(T*B*H) memory besides X.
    """
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError("nonlinearity must be 'tanh' or 'relu', got %r" % (nonlinearity,))
    X, dt, W_ih, W_hh = _start(X, W_ih, W_hh)
    T, B, I = X.shape
    H = W_hh.shape[0]
    relu = nonlinearity == "relu"
    Hs = np.empty((T + 1, B, H), dt)
    Hs[0] = _h0(h0, B, H, dt)
    # pre-activations of all steps: one GEMM, biases folded in
    A = np.matmul(X.reshape(T * B, I), W_ih).reshape(T, B, H)
    if b_ih is not None:
        A += _arr(b_ih, dt)
    if b_hh is not None:
        A += _arr(b_hh, dt)
    tmp = np.empty((B, H), dt)
    for t in range(T):
        a = A[t]
        np.matmul(Hs[t], W_hh, out=tmp)
        a += tmp
        if relu:
            np.maximum(a, 0, out=Hs[t + 1])
        else:
            np.tanh(a, out=Hs[t + 1])
    saved = (X, W_ih, W_hh, Hs, relu, b_ih is not None, b_hh is not None)
    return Hs[1:], Hs[T].copy(), saved


def rnn_backward(dY, dh_n, saved):
    """BPTT for rnn_forward. Returns (dX, dh0, dW_ih, dW_hh, db_ih, db_hh)."""
    X, W_ih, W_hh, Hs, relu, has_bi, has_bh = saved
    dt = X.dtype
    T, B, I = X.shape
    H = W_hh.shape[0]
    Y = Hs[1:]
    dY = _arr(dY, dt)
    dh_n = _arr(dh_n, dt)
    # dA (gradient of the pre-activations) starts as act'(a), a function of Y only
    if relu:
        dA = np.greater(Y, 0).astype(dt)
    else:
        dA = np.multiply(Y, Y)
        np.subtract(1, dA, out=dA)
    WhhT = np.ascontiguousarray(W_hh.T)
    g = np.empty((B, H), dt)
    for t in range(T - 1, -1, -1):
        # g = dL/dh_t = dY[t] + (dL/da_{t+1}) W_hh^T
        if t == T - 1:
            if dh_n is None:
                g.fill(0)
            else:
                g[...] = dh_n
        else:
            np.matmul(dA[t + 1], WhhT, out=g)
        if dY is not None:
            g += dY[t]
        dA[t] *= g
    dh0 = dA[0] @ WhhT
    dG = dA.reshape(T * B, H)
    dX = (dG @ W_ih.T).reshape(T, B, I)
    dW_ih, dW_hh = _weight_grads(X.reshape(T * B, I), Hs[:T].reshape(T * B, H), dG)
    db = dG.sum(axis=0) if (has_bi or has_bh) else None
    db_ih = db.copy() if has_bi else None
    db_hh = db if has_bh else None
    return dX, dh0, dW_ih, dW_hh, db_ih, db_hh


# ----------------------------------------------------------------------------------------
# LSTM
# ----------------------------------------------------------------------------------------

def _lstm_int(W, H):
    """torch column order (i, f, g, o) -> internal (o, i, f, g) (a copy)."""
    return np.roll(W, H, axis=-1)


def _lstm_ext(W, H):
    """internal (o, i, f, g) -> torch (i, f, g, o) (a copy)."""
    return np.roll(W, -H, axis=-1)


def lstm_forward(X, h0, c0, W_ih, W_hh, b_ih=None, b_hh=None):
    """LSTM over a whole sequence.

    Returns (Y, h_n, c_n, saved). Y (T, B, H) is a view of the hidden-state buffer kept in
    saved; h_n and c_n are fresh copies.
    saved = (X, W_ih, W_hh, Hs, Cs, Gt, TC, has_b_ih, has_b_hh):
      Hs (T+1, B, H) = [h0, h_1..h_T];  Cs (T+1, B, H) = [c0, c_1..c_T];
      Gt (T, B, 4H) = activated gates in internal column order (o, i, f, g);
      TC (T, B, H) = tanh(c_t).   O(T*B*4H) memory besides X.
    """
    X, dt, W_ih, W_hh = _start(X, W_ih, W_hh)
    T, B, I = X.shape
    H = W_hh.shape[0]
    H3 = 3 * H
    # internal order (o, i, f, g); sigmoid columns pre-scaled by 1/2 (exact) so that
    # one tanh gives tanh(a/2) there, and sigmoid(a) = 0.5 * tanh(a/2) + 0.5
    Wi = _lstm_int(W_ih, H)
    Wi[:, :H3] *= 0.5
    Wh = _lstm_int(W_hh, H)
    Wh[:, :H3] *= 0.5
    Gt = np.matmul(X.reshape(T * B, I), Wi).reshape(T, B, 4 * H)
    if b_ih is not None or b_hh is not None:
        b = np.zeros(4 * H, dt)
        if b_ih is not None:
            b += _arr(b_ih, dt)
        if b_hh is not None:
            b += _arr(b_hh, dt)
        b = _lstm_int(b, H)
        b[:H3] *= 0.5
        Gt += b
    Hs = np.empty((T + 1, B, H), dt)
    Cs = np.empty((T + 1, B, H), dt)
    TC = np.empty((T, B, H), dt)
    Hs[0] = _h0(h0, B, H, dt)
    Cs[0] = _h0(c0, B, H, dt)
    tmp4 = np.empty((B, 4 * H), dt)
    tmp = np.empty((B, H), dt)
    # per-step views made once, in C
    Gl = list(Gt)
    Sl = list(Gt[:, :, :H3])
    Ol = list(Gt[:, :, :H])
    Il = list(Gt[:, :, H:2 * H])
    Fl = list(Gt[:, :, 2 * H:H3])
    GGl = list(Gt[:, :, H3:])
    Hl = list(Hs)
    Cl = list(Cs)
    TCl = list(TC)
    mul = np.multiply
    for t in range(T):
        g4 = Gl[t]
        np.matmul(Hl[t], Wh, out=tmp4)
        g4 += tmp4
        np.tanh(g4, out=g4)
        s = Sl[t]
        s *= 0.5
        s += 0.5
        c = Cl[t + 1]
        mul(Fl[t], Cl[t], out=c)
        mul(Il[t], GGl[t], out=tmp)
        c += tmp
        np.tanh(c, out=TCl[t])
        mul(Ol[t], TCl[t], out=Hl[t + 1])
    saved = (X, W_ih, W_hh, Hs, Cs, Gt, TC, b_ih is not None, b_hh is not None)
    return Hs[1:], Hs[T].copy(), Cs[T].copy(), saved


def lstm_backward(dY, dh_n, dc_n, saved):
    """BPTT for lstm_forward. Returns (dX, dh0, dc0, dW_ih, dW_hh, db_ih, db_hh).

    With the recurrence-independent factors P (computed in bulk):
        da_o = dh * [tanh(c) o(1-o)]        da_i = dc * [g i(1-i)]
        da_f = dc * [c_prev f(1-f)]         da_g = dc * [i (1-g^2)]
        dc   = dc_next + dh * [o (1-tanh(c)^2)],   dc_prev = dc * f
        dh_prev = da @ W_hh^T
    """
    X, W_ih, W_hh, Hs, Cs, Gt, TC, has_bi, has_bh = saved
    dt = X.dtype
    T, B, I = X.shape
    H = W_hh.shape[0]
    H2, H3, H4 = 2 * H, 3 * H, 4 * H
    dY = _arr(dY, dt)
    dh_n = _arr(dh_n, dt)
    dc_n = _arr(dc_n, dt)
    WhhT = np.ascontiguousarray(_lstm_int(W_hh, H).T)  # (4H, H), internal row order

    dA = np.empty((T, B, H4), dt)   # gate gradients, internal order (o, i, f, g)
    K = np.empty((T, B, H), dt)     # o * (1 - tanh(c)^2)
    dA3 = dA.reshape(T, B, 4, H)[:, :, 1:, :]    # (i, f, g) block as (T, B, 3, H)
    dAo = dA[:, :, :H]
    dh = np.empty((B, H), dt)
    dc = np.zeros((B, H), dt) if dc_n is None else dc_n.copy()
    tmp = np.empty((B, H), dt)
    mul = np.multiply

    for lo, hi in _blocks(T, B * H4 * dt.itemsize * 3):
        # ---- bulk, recurrence-independent factors for steps lo..hi-1 ----
        G = Gt[lo:hi]
        D = dA[lo:hi]
        o, i, f, g = G[:, :, :H], G[:, :, H:H2], G[:, :, H2:H3], G[:, :, H3:]
        tc = TC[lo:hi]
        S = G[:, :, :H3]
        Ds = D[:, :, :H3]
        mul(S, S, out=Ds)
        np.subtract(S, Ds, out=Ds)                  # s (1 - s) for o, i, f
        D[:, :, :H] *= tc
        D[:, :, H:H2] *= g
        D[:, :, H2:H3] *= Cs[lo:hi]                 # c_{t-1}
        Dg = D[:, :, H3:]
        mul(g, g, out=Dg)
        np.subtract(1, Dg, out=Dg)
        Dg *= i
        Kb = K[lo:hi]
        mul(tc, tc, out=Kb)
        np.subtract(1, Kb, out=Kb)
        Kb *= o
        # ---- the recurrence over this block ----
        for t in range(hi - 1, lo - 1, -1):
            if t == T - 1:
                if dh_n is None:
                    dh.fill(0)
                else:
                    dh[...] = dh_n
            else:
                np.matmul(dA[t + 1], WhhT, out=dh)
            if dY is not None:
                dh += dY[t]
            mul(dh, K[t], out=tmp)
            dc += tmp
            dAo[t] *= dh
            dA3[t] *= dc[:, None, :]
            dc *= Gt[t, :, H2:H3]                   # dc_{t-1} = dc_t * f_t

    dh0 = dA[0] @ WhhT
    dc0 = dc
    dG = dA.reshape(T * B, H4)
    dX = (dG @ _lstm_int(W_ih, H).T).reshape(T, B, I)
    dW_ih, dW_hh = _weight_grads(X.reshape(T * B, I), Hs[:T].reshape(T * B, H), dG)
    dW_ih = _lstm_ext(dW_ih, H)
    dW_hh = _lstm_ext(dW_hh, H)
    db = _lstm_ext(dG.sum(axis=0), H) if (has_bi or has_bh) else None
    db_ih = db.copy() if has_bi else None
    db_hh = db if has_bh else None
    return dX, dh0, dc0, dW_ih, dW_hh, db_ih, db_hh


# ----------------------------------------------------------------------------------------
# GRU
# ----------------------------------------------------------------------------------------

def _gru_int(W, H):
    """torch column order (r, z, n) -> internal input-side order (n, r, z) (a copy)."""
    return np.roll(W, H, axis=-1)


def _gru_ext(W, H):
    """internal (n, r, z) -> torch (r, z, n) (a copy)."""
    return np.roll(W, -H, axis=-1)


def gru_forward(X, h0, W_ih, W_hh, b_ih=None, b_hh=None):
    """GRU over a whole sequence.

    Returns (Y, h_n, saved). Y (T, B, H) is a view of the hidden-state buffer kept in saved;
    h_n is a fresh copy.
    saved = (X, W_ih, W_hh, Hs, Gt, HW, has_b_ih, has_b_hh):
      Hs (T+1, B, H) = [h0, h_1..h_T];
      Gt (T, B, 3H) = activated gates in order (n, r, z);
      HW (T, B, 3H) = h_{t-1} W_hh in torch order (r, z, n), with b_hn added to the n part
                      (only the n part, h W_hn + b_hn, is used by the backward).
      O(T*B*6H) memory besides X.
    """
    X, dt, W_ih, W_hh = _start(X, W_ih, W_hh)
    T, B, I = X.shape
    H = W_hh.shape[0]
    H2, H3 = 2 * H, 3 * H
    # input side in (n, r, z), hidden side in torch order (r, z, n); the sigmoid (r, z)
    # columns are pre-scaled by 1/2 (exact): sigmoid(a) = 0.5 * tanh(a/2) + 0.5
    Wi = _gru_int(W_ih, H)
    Wi[:, H:] *= 0.5
    Wh = W_hh.copy()
    Wh[:, :H2] *= 0.5
    Gt = np.matmul(X.reshape(T * B, I), Wi).reshape(T, B, H3)
    b_hn = None
    if b_ih is not None or b_hh is not None:
        b = np.zeros(H3, dt)                      # torch order
        if b_ih is not None:
            b += _arr(b_ih, dt)
        if b_hh is not None:
            bh = _arr(b_hh, dt)
            b[:H2] += bh[:H2]                     # b_hr, b_hz add straight in
            b_hn = bh[H2:]                        # b_hn sits inside r * (...)
        b = _gru_int(b, H)
        b[H:] *= 0.5
        Gt += b
    Hs = np.empty((T + 1, B, H), dt)
    Hs[0] = _h0(h0, B, H, dt)
    HW = np.empty((T, B, H3), dt)
    tmp = np.empty((B, H), dt)
    Gl = list(Gt)
    Nl = list(Gt[:, :, :H])
    RZl = list(Gt[:, :, H:])
    Rl = list(Gt[:, :, H:H2])
    Zl = list(Gt[:, :, H2:])
    HWl = list(HW)
    HWrz = list(HW[:, :, :H2])
    HWn = list(HW[:, :, H2:])
    Hl = list(Hs)
    mul = np.multiply
    for t in range(T):
        np.matmul(Hl[t], Wh, out=HWl[t])
        hn = HWn[t]
        if b_hn is not None:
            hn += b_hn
        rz = RZl[t]
        rz += HWrz[t]
        np.tanh(rz, out=rz)
        rz *= 0.5
        rz += 0.5
        n = Nl[t]
        mul(Rl[t], hn, out=tmp)
        n += tmp
        np.tanh(n, out=n)
        # h' = n + z * (h - n)
        np.subtract(Hl[t], n, out=tmp)
        tmp *= Zl[t]
        np.add(n, tmp, out=Hl[t + 1])
    saved = (X, W_ih, W_hh, Hs, Gt, HW, b_ih is not None, b_hh is not None)
    return Hs[1:], Hs[T].copy(), saved


def gru_backward(dY, dh_n, saved):
    """BPTT for gru_forward. Returns (dX, dh0, dW_ih, dW_hh, db_ih, db_hh).

    The gradient buffer D (T, B, 4H) holds [da_n | da_r | da_z | d(h W_hn + b_hn)]; every
    entry is dh_t times a recurrence-independent factor P computed in bulk:
        P_n  = (1 - z)(1 - n^2)            P_r = P_n * (h W_hn + b_hn) * r(1 - r)
        P_z  = (h_prev - n) z(1 - z)       P_hn = P_n * r
    and dh_{t-1} = dY[t-1] + z * dh_t + D[t][:, H:] @ W_hh^T.
    D[:, :3H] is the input-side gradient (n, r, z); D[:, H:] the hidden side (r, z, n).
    """
    X, W_ih, W_hh, Hs, Gt, HW, has_bi, has_bh = saved
    dt = X.dtype
    T, B, I = X.shape
    H = W_hh.shape[0]
    H2, H3, H4 = 2 * H, 3 * H, 4 * H
    dY = _arr(dY, dt)
    dh_n = _arr(dh_n, dt)
    WhhT = np.ascontiguousarray(W_hh.T)            # (3H, H), torch row order (r, z, n)

    D = np.empty((T, B, H4), dt)
    D4 = D.reshape(T, B, 4, H)
    Dh = D[:, :, H:]
    Z = Gt[:, :, H2:]
    dh = np.zeros((B, H), dt) if dh_n is None else dh_n.copy()
    tmp = np.empty((B, H), dt)
    mul = np.multiply

    for lo, hi in _blocks(T, B * H4 * dt.itemsize * 3):
        G = Gt[lo:hi]
        n, r, z = G[:, :, :H], G[:, :, H:H2], G[:, :, H2:]
        hn = HW[lo:hi, :, H2:]
        Db = D[lo:hi]
        Pn, Pr, Pz, Phn = Db[:, :, :H], Db[:, :, H:H2], Db[:, :, H2:H3], Db[:, :, H3:]
        # P_n = (1 - z)(1 - n^2)
        mul(n, n, out=Pn)
        np.subtract(1, Pn, out=Pn)
        np.subtract(1, z, out=Pz)
        Pn *= Pz
        # P_hn = P_n r ; P_r = P_hn hn (1 - r)
        mul(Pn, r, out=Phn)
        np.subtract(1, r, out=Pr)
        Pr *= hn
        Pr *= Phn
        # P_z = (h_prev - n) z (1 - z)     (Pz holds 1 - z)
        Pz *= z
        Pz *= np.subtract(Hs[lo:hi], n)
        for t in range(hi - 1, lo - 1, -1):
            if t < T - 1:
                # dh_t = dY[t] + z_{t+1} dh_{t+1} + D[t+1][:, H:] @ W_hh^T
                np.matmul(Dh[t + 1], WhhT, out=tmp)
                dh *= Z[t + 1]
                dh += tmp
            if dY is not None:
                dh += dY[t]
            D4[t] *= dh[:, None, :]

    dh0 = Dh[0] @ WhhT
    dh *= Z[0]
    dh0 += dh
    Df = D.reshape(T * B, H4)
    dX = (Df[:, :H3] @ _gru_int(W_ih, H).T).reshape(T, B, I)
    dW_ih = _gru_ext(X.reshape(T * B, I).T @ Df[:, :H3], H)
    dW_hh = Hs[:T].reshape(T * B, H).T @ Df[:, H:]
    if has_bi or has_bh:
        S = Df.sum(axis=0)
        db_ih = _gru_ext(S[:H3], H) if has_bi else None
        db_hh = S[H:].copy() if has_bh else None
    else:
        db_ih = db_hh = None
    return dX, dh0, dW_ih, dW_hh, db_ih, db_hh
