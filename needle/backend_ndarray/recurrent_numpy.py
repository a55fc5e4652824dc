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
    of the sigmoid gates' weight columns, so one tanh serves sigmoid and tanh gates alike
    (LSTM: one tanh over all 4H pre-activations of a step; GRU: one over r and z);
  * gate columns are reordered internally so that gates sharing an operation are one slice:
    the LSTM forward keeps (i, f, o, g) (one slice of sigmoids) and its backward writes
    torch's (i, f, g, o) (i, f, g are all scaled by dc); the GRU keeps (n, r, z) on the input
    side and torch's (r, z, n) on the hidden side of one 4H-wide gradient buffer
    [da_n | da_r | da_z | d(h W_hn + b_hn)], so both weight-gradient GEMMs read plain slices;
  * in the backward, every factor that does not depend on the recurrence (sigmoid and tanh
    derivatives times the other operand of each product) is computed in bulk, block by
    block of time steps while the block is hot in cache, straight into the gradient
    buffer; a step then only does its GEMM and a few in-place multiplies;
  * small batches of small layers (LSTM and GRU, B <= 32 and H <= 512) run feature-major: a step's
    gates and states as (features, batch) arrays, so each recurrent GEMM is weights @ states, which
    OpenBLAS runs faster for few rows than states @ weights, and each gate is a contiguous block of rows;
    except where a batch-major step GEMM splits into two column blocks small enough for OpenBLAS's
    small-matrix kernel, which skips repacking the weights every step (_SMALL_GEMM_MACS; around B = 10);
  * preallocated buffers, out= and in-place ufuncs; a contiguous W_hh^T for the backward
    (a skinny GEMM with a transposed operand runs at about half speed); bias gradients as
    a GEMV with a ones vector (multithreaded, unlike a numpy sum).

Phases: each kernel is written once, as a generator (`*_phases`) that yields just before its
recurrent loop and just after it; `rnn_forward` and the others run it straight through. The loop is
the part that leaves a core idle (small per-step GEMMs and elementwise passes on one core), so
`run_phased` (parallel_numpy.py) runs the loops of independent kernels, such as the two directions of
a bidirectional layer, side by side on their own threads, and the big GEMMs before and after them one
after the other on every BLAS thread. A kernel with recompute_every yields nowhere (it runs whole).

Options (all default to None; with none given the kernels run the plain code above, untouched):
  * lengths (forwards): int array (B,), values in [1, T] (PyTorch's packed sequences), in any order:
    a kernel sorts an unsorted batch longest first once per call (and puts its outputs, and in the
    backward the input and state gradients, back in the caller's order), so that step t runs only its
    b_t = count(lengths > t) leading rows ([:b_t] slices, no compute-then-mask); Y[t, b] = 0 for
    t >= lengths[b]; h_n[b] (c_n[b]) is the state after step lengths[b] - 1. The backward ignores
    dY at padded positions, lets dh_n[b] (dc_n[b]) enter at step lengths[b] - 1 (the running dh/dc
    rows of a sequence are not touched before it becomes active).
    The big GEMMs (the input projection before the loop; dX, dW_ih, dW_hh and the bias sums after
    it) run over the active rows only, packed to the front of their buffers (gate gradients in
    place, X and H_prev as copies), where the padded rows would cost at least _PACK_MIN_MACS
    multiply-adds; otherwise over all T*B rows, with the padded rows of the gate-gradient buffer
    zeroed.
  * recompute_every (forwards): k >= 1. `saved` keeps no per-step gates, activations or projection:
    only what Y holds anyway (the forward's h states: Y is a view of the (T+1, B, H) state buffer that
    saved references) and, for the LSTM, c at steps 0, k, 2k, ... The backward walks segments of k
    steps from last to first, recomputes a segment's gates (and c) from its checkpoint with exactly
    the forward's operations, then runs that segment's BPTT. Because h_{t-1} is in Y, the GRU and RNN
    need no checkpoints (the RNN's backward needs nothing but Y: for it k changes nothing).
    By default (_RECOMPUTE_EXACT = False) the forward and backward project segment by segment and the
    backward accumulates dW_ih, dW_hh and the biases per segment and writes dX per segment: O(T/k + k)
    memory besides X and Y, results equal to rounding (about 1e-7 relative in float32), not bitwise: a
    segment-sized GEMM, or a sum of per-segment weight-gradient GEMMs, adds in another order than one GEMM
    over all T*B rows. With _RECOMPUTE_EXACT = True results are bitwise identical to
    recompute_every=None on the batch-major path (the LSTM's feature-major path for batches up to
    _FEATURE_MAJOR_MAX_BATCH rounds differently), at the price of one O(T) transient (T, B, G*H)
    buffer while a layer is differentiated: the backward redoes the forward's one input-projection
    GEMM into it and takes the weight gradients as the same GEMMs after the loop.
  * grad_sq (backwards): a float array (T, B) that the backward fills with ||dL/dh_t||^2 per step and
    row, summed over hidden units, where dL/dh_t is the total gradient reaching h_t (dY[t] plus the
    recurrent part, plus dh_n at a sequence's last step): one einsum per step on the active rows;
    zero at padded positions.
"""

import functools

import numpy as np

__all__ = [
    "rnn_forward", "rnn_backward",
    "lstm_forward", "lstm_backward",
    "gru_forward", "gru_backward",
    "rnn_forward_phases", "rnn_backward_phases",
    "lstm_forward_phases", "lstm_backward_phases",
    "gru_forward_phases", "gru_backward_phases",
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


def _transpose(W):
    """Contiguous copy of W.T, copied in slabs of 16 rows: numpy's plain transposing copy
    is about 3x slower on power-of-two shapes (cache-set conflicts)."""
    R, C = W.shape
    out = np.empty((C, R), W.dtype)
    for i in range(0, R, 16):
        out[:, i:i + 16] = W[i:i + 16].T
    return out


# For the backward's per-step GEMM dA_t @ W_hh^T: below this many weights a contiguous copy
# of W_hh^T is fastest; above it, W_hh @ dA_t^T (the caller's W_hh as it is, no transposed
# copy to make) followed by a small transposed read of the (H, B) result is as fast or
# faster per step and saves the copy (1-16 ms on the medium and large workloads).
_WT_COPY_MAX = 1 << 18


# OpenBLAS multiplies a product of at most _SMALL_GEMM_MACS multiply-adds (M*N*K; its
# sgemm_small_kernel_permit for AVX-512 cores) with a kernel that reads both operands where they lie;
# a bigger one first packs them into panels, on every call. A recurrent step's GEMM (B, H) @ (H, G*H)
# thus repacks the whole weight matrix each step: at batch 10 and 200 units that is most of its time.
# The batch-major steps split such a GEMM into a few column blocks of the weights, each within the
# limit (the same dot products, summed by another kernel: equal to rounding, not bitwise). Past
# _SMALL_GEMM_MAX_BLOCKS blocks one packed call (two-threaded where BLAS has two threads) is as fast
# (measured: benchmarks/bench_layouts.py).
# Other cores' OpenBLAS kernels (Haswell, Zen, ...) have no such path: there the steps keep one call.
_SMALL_GEMM_MACS = 1_000_000
_SMALL_GEMM_MAX_BLOCKS = 2
_SMALL_GEMM_CORES = ("skylakex", "cooperlake", "sapphirerapids")


@functools.lru_cache(maxsize=None)
def _has_small_gemm_kernel():
    """Whether numpy's BLAS is an OpenBLAS running the kernels of a core in _SMALL_GEMM_CORES (asked once)."""
    from threadpoolctl import threadpool_info

    return any(p.get("internal_api") == "openblas" and str(p.get("architecture", "")).lower() in _SMALL_GEMM_CORES
               for p in threadpool_info())


def _small_gemm_width(rows, K, N):
    """Column-block width that puts each block of a (rows, K) @ (K, N) product within
    _SMALL_GEMM_MACS (whole 16-float vectors where it can), or None when one call is better: the
    product is small already, would take more than _SMALL_GEMM_MAX_BLOCKS blocks, or the BLAS has no
    small-matrix kernel."""
    if not _has_small_gemm_kernel():
        return None
    width = _SMALL_GEMM_MACS // max(1, rows * K)
    width = width // 16 * 16 if width >= 16 else width
    if width >= N or width == 0 or -(-N // width) > _SMALL_GEMM_MAX_BLOCKS:
        return None
    n = -(-N // width)
    even = -(-N // n)                          # n blocks of about equal width, each within the limit
    return min(width, (even + 15) // 16 * 16) if width >= 16 else even


def _column_blocks(W, rows):
    """W (K, N) for a product (rows, K) @ W, as a list of (contiguous column block of W, its column
    slice): several small-kernel blocks (_small_gemm_width) or [(W, slice(None))]."""
    K, N = W.shape
    width = _small_gemm_width(rows, K, N)
    if width is None:
        return [(W, slice(None))]
    return [(np.ascontiguousarray(W[:, j:j + width]), slice(j, min(N, j + width))) for j in range(0, N, width)]


def _feature_major(B, H, G):
    """Whether the plain path of a layer with G gates runs feature-major (_FEATURE_MAJOR_MAX_BATCH): not
    where the batch-major step's GEMM splits into small-kernel blocks, which is faster still."""
    return (B <= _FEATURE_MAJOR_MAX_BATCH and H <= _FEATURE_MAJOR_MAX_HIDDEN
            and _small_gemm_width(B, H, G * H) is None)


def _col_sum(dG):
    """Column sums of a (rows, n) matrix as a GEMV with ones (multithreaded in BLAS)."""
    return np.ones(dG.shape[0], dG.dtype) @ dG


def _bias_grads(dG, has_bi, has_bh):
    db = _col_sum(dG) if (has_bi or has_bh) else None
    return (db.copy() if has_bi else None), (db if has_bh else None)


def _weight_grads(dG, X, W_ih, H_prev, has_bi, has_bh):
    """(dX (T, B, I), dW_ih, dW_hh, db_ih, db_hh) from the gate gradients dG (T*B, G*H) of every step,
    one GEMM each; H_prev (T, B, H) holds every step's h_{t-1}."""
    T, B, I = X.shape
    dX = (dG @ W_ih.T).reshape(T, B, I)
    dW_ih = X.reshape(T * B, I).T @ dG
    dW_hh = H_prev.reshape(T * B, H_prev.shape[2]).T @ dG
    return (dX, dW_ih, dW_hh) + _bias_grads(dG, has_bi, has_bh)


def _gates(W, H, order, scale=None):
    """Copy of W (..., G*H) with its H-wide column blocks in `order`, optionally each block
    multiplied by a scalar from `scale` (the 1/2 of sigmoid-by-tanh, exact)."""
    out = np.empty(W.shape, W.dtype)
    for j, k in enumerate(order):
        src, dst = W[..., k * H:(k + 1) * H], out[..., j * H:(j + 1) * H]
        if scale is None or scale[j] == 1:
            dst[...] = src
        else:
            np.multiply(src, scale[j], out=dst)
    return out


def _gates_t(W, H, order, scale):
    """_gates(W, H, order, scale).T as a contiguous (G*H, rows) array in one pass: row block j is W's
    column block order[j], transposed and scaled (for H = 200-650 about 2-3x faster than _transpose of
    _gates)."""
    out = np.empty((len(order) * H, W.shape[0]), W.dtype)
    for j, k in enumerate(order):
        np.multiply(W[:, k * H:(k + 1) * H].T, scale[j], out=out[j * H:(j + 1) * H])
    return out


# ----------------------------------------------------------------------------------------
# Options: lengths, recompute_every, grad_sq
# ----------------------------------------------------------------------------------------

# recompute_every: False (the default) projects and reduces segment by segment (O(k) transient
# memory, results equal to rounding); True keeps the results bitwise identical to
# recompute_every=None (one input-projection GEMM and one gradient buffer over all steps in the
# backward: O(T) transient memory while the layer is differentiated). See the module docstring.
_RECOMPUTE_EXACT = False


def _active_rows(lengths, T, B):
    """Check `lengths`; return (bt, lens): bt the list of active rows b_t of each step, lens the
    int64 lengths; (None, None) when lengths is None or every sequence is full (the plain path then
    computes the same thing)."""
    if lengths is None or B == 0:
        return None, None
    raw = np.asarray(lengths)
    if raw.shape != (B,):
        raise ValueError("lengths must have shape (%d,), got %s" % (B, raw.shape))
    if raw.dtype.kind not in "iuf":
        raise TypeError("lengths must be integers, got dtype %s" % raw.dtype)
    lens = raw.astype(np.int64)
    L = lens.tolist()              # plain Python from here: B and T are small next to the work
    if (raw.dtype.kind == "f" and (lens != raw).any()) or min(L) < 1 or max(L) > T:
        raise ValueError("lengths must be whole numbers in [1, T=%d], got %s" % (T, raw.tolist()))
    if L[-1] == T:
        return None, None
    bt, b = [], B
    for t in range(T):
        while b and L[b - 1] <= t:
            b -= 1
        bt.append(b)
    return bt, lens


def _sort_order(lengths, B):
    """The permutation that sorts the batch longest first (stable), or None where lengths is None, is
    already in non-increasing order, or is not B numbers (_active_rows then says what is wrong)."""
    if lengths is None:
        return None
    raw = np.asarray(lengths)
    if raw.shape != (B,) or raw.dtype.kind not in "iuf" or (np.diff(raw) <= 0).all():
        return None
    return np.argsort(-raw, kind="stable")


class _Sorted:
    """saved of a call that ran on its batch sorted longest first: the permutation, its inverse and the
    sorted call's own saved."""
    __slots__ = ("order", "inverse", "saved")

    def __init__(self, order, inverse, saved):
        self.order, self.inverse, self.saved = order, inverse, saved


def _forward_sorted(phases, order, X, states, weights, lengths, **options):
    """A forward kernel's phases on the batch sorted longest first (its loop then runs a shrinking prefix
    of rows), with the outputs put back in the caller's order and saved wrapped in a _Sorted."""
    inverse = np.argsort(order)
    X = X[:, order]
    states = [None if s is None else np.asarray(s)[order] for s in states]
    Y, *finals, saved = yield from phases(X, *states, *weights, lengths=np.asarray(lengths)[order], **options)
    return (Y[:, inverse], *(f[inverse] for f in finals), _Sorted(order, inverse, saved))


def _backward_sorted(phases, upstream, sorted_saved, grad_sq):
    """The backward of _forward_sorted: upstream gradients sorted, the state and input gradients (and the
    rows of grad_sq) put back in the caller's order; weight gradients do not depend on the order."""
    order, inverse = sorted_saved.order, sorted_saved.inverse
    dY, *d_finals = upstream
    dY = None if dY is None else np.asarray(dY)[:, order]
    d_finals = [None if g is None else np.asarray(g)[order] for g in d_finals]
    squares = None
    if grad_sq is not None:
        squares = np.zeros_like(_grad_sq(grad_sq, *sorted_saved.saved[0].shape[:2]))
    grads = yield from phases(dY, *d_finals, sorted_saved.saved, grad_sq=squares)
    if grad_sq is not None:
        grad_sq[:, order] = squares
    n = len(d_finals)
    return (grads[0][:, inverse], *(g[inverse] for g in grads[1:1 + n]), *grads[1 + n:])


def _every(k):
    """Check recompute_every: None or a positive int."""
    if k is None:
        return None
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError("recompute_every must be a positive int or None, got %r" % (k,))
    return int(k)


def _grad_sq(gs, T, B):
    if gs is None:
        return None
    if not isinstance(gs, np.ndarray) or gs.shape != (T, B) or gs.dtype.kind != "f":
        raise ValueError("grad_sq must be a float numpy array of shape (%d, %d)" % (T, B))
    return gs


def _finals(S, lens):
    """The state after each sequence's last step: S[T] (or S[lens[b], b]) as a fresh array."""
    if lens is None:
        return S[S.shape[0] - 1].copy()
    return S[lens, np.arange(S.shape[1])]


def _project(X2, W, b, out=None):
    """X2 @ W, then + b: the forward's input projection (one GEMM, the bias added after it)."""
    P = np.matmul(X2, W, out=out)
    if b is not None:
        P += b
    return P


def _segments(T, k):
    return [(lo, min(T, lo + k)) for lo in range(0, T, k)]


# With lengths, the input projection and the dX and weight-gradient GEMMs run over the active rows
# only (packed to the front of their buffers) when the padded rows would cost at least this many
# multiply-adds; below it (the copies would cost more than they save) over all T*B rows, the padded
# rows of the gate-gradient buffer zeroed. Decided once in the forward, kept in saved.
_PACK_MIN_MACS = 1 << 20


def _pack(A2, bt, B, out):
    """Rows [t*B, t*B + bt[t]) of A2 (T*B, n), step after step, to the front of `out` (which may
    be A2 itself: the rows only move towards the front). Returns the packed (sum(bt), n) view."""
    off = 0
    for t, b in enumerate(bt):
        if out is not A2 or off != t * B:
            out[off:off + b] = A2[t * B:t * B + b]
        off += b
    return out[:off]


def _unpack(A2, bt, B):
    """Inverse of _pack in place: A2[:sum(bt)] back to rows [t*B, t*B + bt[t]), zeros elsewhere."""
    off = sum(bt)
    for t in range(len(bt) - 1, -1, -1):
        b = bt[t]
        off -= b
        if off != t * B:
            A2[t * B:t * B + b] = A2[off:off + b]
        A2[t * B + b:(t + 1) * B] = 0


def _packs(bt, B, I, H, GH):
    """Whether the big GEMMs run over the packed active rows only (see _PACK_MIN_MACS)."""
    if bt is None:
        return False
    return (len(bt) * B - sum(bt)) * (I + H) * GH >= _PACK_MIN_MACS


def _packed_input(X2, bt, B, pack):
    """The active rows of X2 (T*B, I) packed (a copy) when pack, else None."""
    return _pack(X2, bt, B, np.empty((sum(bt), X2.shape[1]), X2.dtype)) if pack else None


def _project_into(X2, W, bias, out2, bt, B, Xg):
    """out2 (T*B, n) = X2 @ W + bias as one GEMM: over the packed active rows Xg when given
    (padded rows of out2 then hold only the bias), else over all rows."""
    if Xg is None:
        np.matmul(X2, W, out=out2)
    else:
        np.matmul(Xg, W, out=out2[:len(Xg)])
        _unpack(out2, bt, B)
    if bias is not None:
        out2 += bias
    return out2


def _grad_rows(dG, X2, Hs, bt, B, pack, Xg=None):
    """(dG, Xg, Hg) for the GEMMs after the backward loop: the gradient rows (packed in place when
    pack) and the matching rows of X and of H_prev = Hs[:T]."""
    T, H = len(bt), Hs.shape[2]
    Hp = Hs[:T].reshape(T * B, H)
    if not pack:
        return dG, X2, Hp
    dG = _pack(dG, bt, B, dG)
    if Xg is None:
        Xg = _packed_input(X2, bt, B, True)
    return dG, Xg, _pack(Hp, bt, B, np.empty((len(dG), H), Hp.dtype))


def _input_grad(dG, Wt, T, B, bt, pack):
    """dX (T, B, I) = dG @ Wt; over the packed rows when pack (padded rows of dX zero)."""
    if not pack:
        return (dG @ Wt).reshape(T, B, Wt.shape[1])
    dX = np.empty((T, B, Wt.shape[1]), dG.dtype)
    d2 = dX.reshape(T * B, Wt.shape[1])
    np.matmul(dG, Wt, out=d2[:len(dG)])
    _unpack(d2, bt, B)
    return dX


# ----------------------------------------------------------------------------------------
# Elman RNN
# ----------------------------------------------------------------------------------------

def rnn_forward_phases(X, h0, W_ih, W_hh, b_ih=None, b_hh=None, nonlinearity="tanh", lengths=None,
                       recompute_every=None):
    """Elman RNN over a whole sequence.

    Returns (Y, h_n, saved). Y (T, B, H) is a view of the hidden-state buffer kept in saved;
    h_n is a fresh copy of h_T.
    saved = (X, W_ih, W_hh, Hs, relu, has_b_ih, has_b_hh) where Hs is the (T+1, B, H) buffer
    [h0, h_1, ..., h_T]: nothing besides X and Y (Hs[1:]).
    lengths: see the module docstring; saved then has an 8th entry {"bt": active rows per step,
    "pack": whether the big GEMMs run over the packed active rows}; padded rows of Hs are zero.
    recompute_every: checked, and otherwise without effect: the backward needs nothing but Y.
    """
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError("nonlinearity must be 'tanh' or 'relu', got %r" % (nonlinearity,))
    X, dt, W_ih, W_hh = _start(X, W_ih, W_hh)
    T, B, I = X.shape
    H = W_hh.shape[0]
    relu = nonlinearity == "relu"
    if lengths is not None or recompute_every is not None:
        order = _sort_order(lengths, B)
        if order is not None:
            return (yield from _forward_sorted(rnn_forward_phases, order, X, (h0,), (W_ih, W_hh, b_ih, b_hh), lengths,
                                               nonlinearity=nonlinearity, recompute_every=recompute_every))
        _every(recompute_every)
        bt, lens = _active_rows(lengths, T, B)
        if bt is not None:
            return (yield from _rnn_forward_lengths(X, h0, W_ih, W_hh, b_ih, b_hh, relu, bt, lens))
    Hs = np.empty((T + 1, B, H), dt)
    Hs[0] = _h0(h0, B, H, dt)
    # pre-activations of all steps: one GEMM, biases folded in
    A = np.matmul(X.reshape(T * B, I), W_ih).reshape(T, B, H)
    if b_ih is not None:
        A += _arr(b_ih, dt)
    if b_hh is not None:
        A += _arr(b_hh, dt)
    tmp = np.empty((B, H), dt)
    blocks = _column_blocks(W_hh, B)
    yield  # the recurrent loop starts: run_phased may run it beside another kernel's loop
    for t in range(T):
        a = A[t]
        for w, cols in blocks:
            np.matmul(Hs[t], w, out=tmp[:, cols])
        a += tmp
        if relu:
            np.maximum(a, 0, out=Hs[t + 1])
        else:
            np.tanh(a, out=Hs[t + 1])
    yield  # the recurrent loop is done
    saved = (X, W_ih, W_hh, Hs, relu, b_ih is not None, b_hh is not None)
    return Hs[1:], Hs[T].copy(), saved


def rnn_backward_phases(dY, dh_n, saved, grad_sq=None):
    """BPTT for rnn_forward. Returns (dX, dh0, dW_ih, dW_hh, db_ih, db_hh).
    grad_sq: optional (T, B) float array filled with ||dL/dh_t||^2 (module docstring)."""
    if isinstance(saved, _Sorted):
        return (yield from _backward_sorted(rnn_backward_phases, (dY, dh_n), saved, grad_sq))
    if len(saved) > 7 or grad_sq is not None:
        return (yield from _rnn_backward_general(dY, dh_n, saved, grad_sq))
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
    g = np.empty((B, H), dt)
    small = W_hh.size <= _WT_COPY_MAX
    if small:
        blocks = _column_blocks(_transpose(W_hh), B)
    else:
        gT = np.empty((H, B), dt)
    yield  # the recurrent loop starts: run_phased may run it beside another kernel's loop
    for t in range(T - 1, -1, -1):
        # g = dL/dh_t = dY[t] + (dL/da_{t+1}) W_hh^T
        if t == T - 1:
            if dh_n is None:
                g.fill(0)
            else:
                g[...] = dh_n
            if dY is not None:
                g += dY[t]
        else:
            if small:
                for w, cols in blocks:
                    np.matmul(dA[t + 1], w, out=g[:, cols])
                if dY is not None:
                    g += dY[t]
            else:
                np.matmul(W_hh, dA[t + 1].T, out=gT)
                if dY is not None:
                    np.add(gT.T, dY[t], out=g)
                else:
                    g[...] = gT.T
        dA[t] *= g
    yield  # the recurrent loop is done
    dh0 = dA[0] @ W_hh.T
    dX, dW_ih, dW_hh, db_ih, db_hh = _weight_grads(dA.reshape(T * B, H), X, W_ih, Hs[:T], has_bi, has_bh)
    return dX, dh0, dW_ih, dW_hh, db_ih, db_hh


def _rnn_forward_lengths(X, h0, W_ih, W_hh, b_ih, b_hh, relu, bt, lens):
    """rnn_forward with lengths: step t runs rows [:bt[t]] only; padded rows of Hs stay zero."""
    dt = X.dtype
    T, B, I = X.shape
    H = W_hh.shape[0]
    Hs = np.zeros((T + 1, B, H), dt)
    Hs[0] = _h0(h0, B, H, dt)
    X2 = X.reshape(T * B, I)
    pack = _packs(bt, B, I, H, H)
    A = np.empty((T, B, H), dt)
    _project_into(X2, W_ih, None, A.reshape(T * B, H), bt, B, _packed_input(X2, bt, B, pack))
    if b_ih is not None:
        A += _arr(b_ih, dt)
    if b_hh is not None:
        A += _arr(b_hh, dt)
    tmp = np.empty((B, H), dt)
    blocks = _column_blocks(W_hh, B)
    yield  # the recurrent loop starts: run_phased may run it beside another kernel's loop
    for t in range(T):
        b = bt[t]
        a = A[t, :b]
        tb = tmp[:b]
        for w, cols in blocks:
            np.matmul(Hs[t, :b], w, out=tb[:, cols])
        a += tb
        if relu:
            np.maximum(a, 0, out=Hs[t + 1, :b])
        else:
            np.tanh(a, out=Hs[t + 1, :b])
    yield  # the recurrent loop is done
    saved = (X, W_ih, W_hh, Hs, relu, b_ih is not None, b_hh is not None, {"bt": bt, "pack": pack})
    return Hs[1:], _finals(Hs, lens), saved


def _rnn_backward_general(dY, dh_n, saved, grad_sq):
    """rnn_backward with lengths and/or grad_sq: the plain loop on the active rows of each step."""
    X, W_ih, W_hh, Hs, relu, has_bi, has_bh, *ext = saved
    dt = X.dtype
    T, B, I = X.shape
    H = W_hh.shape[0]
    ext = ext[0] if ext else {}
    bt = ext.get("bt") or [B] * T
    pack = ext.get("pack", False)           # else padded rows of dA are zeroed
    gs = _grad_sq(grad_sq, T, B)
    Y = Hs[1:]
    dY = _arr(dY, dt)
    dh_n = _arr(dh_n, dt)
    if relu:
        dA = np.greater(Y, 0).astype(dt)
    else:
        dA = np.multiply(Y, Y)
        np.subtract(1, dA, out=dA)
    # the running dL/dh: a sequence's row keeps dh_n until its last step t = lengths - 1
    g = np.zeros((B, H), dt) if dh_n is None else dh_n.copy()
    small = W_hh.size <= _WT_COPY_MAX
    if small:
        blocks = _column_blocks(_transpose(W_hh), B)   # W_hh^T
    else:
        gT = np.empty((H, B), dt)
    yield  # the recurrent loop starts: run_phased may run it beside another kernel's loop
    for t in range(T - 1, -1, -1):
        b = bt[t]
        b1 = bt[t + 1] if t + 1 < T else 0      # rows still going at step t + 1
        if b1:
            if small:
                for w, cols in blocks:
                    np.matmul(dA[t + 1, :b1], w, out=g[:b1, cols])
            else:
                gt = gT[:, :b1]
                np.matmul(W_hh, dA[t + 1, :b1].T, out=gt)
                g[:b1] = gt.T
        gb = g[:b]
        if dY is not None:
            gb += dY[t, :b]
        if gs is not None:
            gs[t, :b] = np.einsum("ij,ij->i", gb, gb)
        d = dA[t, :b]
        d *= gb
        if b < B:
            if not pack:
                dA[t, b:] = 0
            if gs is not None:
                gs[t, b:] = 0
    yield  # the recurrent loop is done
    dh0 = dA[0] @ W_hh.T
    dG, Xg, Hg = _grad_rows(dA.reshape(T * B, H), X.reshape(T * B, I), Hs, bt, B, pack)
    dX = _input_grad(dG, W_ih.T, T, B, bt, pack)
    dW_ih = Xg.T @ dG
    dW_hh = Hg.T @ dG
    db_ih, db_hh = _bias_grads(dG, has_bi, has_bh)
    return dX, dh0, dW_ih, dW_hh, db_ih, db_hh


# ----------------------------------------------------------------------------------------
# LSTM
# ----------------------------------------------------------------------------------------

# The forward keeps its gates in the order (i, f, o, g): the three sigmoids are one slice.
# The backward writes gradients in torch's order (i, f, g, o): the three gates scaled by dc
# are one slice, and the weight/bias gradients come out in torch's order with no copy.
_LSTM_FWD = (0, 1, 3, 2)          # torch block index of each forward block
_LSTM_SCALE = (0.5, 0.5, 0.5, 1)  # sigmoid blocks pre-scaled by 1/2


def lstm_forward_phases(X, h0, c0, W_ih, W_hh, b_ih=None, b_hh=None, lengths=None, recompute_every=None):
    """LSTM over a whole sequence.

    Returns (Y, h_n, c_n, saved). Y (T, B, H) is a view of the hidden-state buffer kept in
    saved; h_n and c_n are fresh copies.
    saved = (X, W_ih, W_hh, Hs, Cs, Gt, TC, has_b_ih, has_b_hh):
      Hs (T+1, B, H) = [h0, h_1..h_T];  Cs (T+1, B, H) = [c0, c_1..c_T];
      Gt (T, B, 4H) = activated gates, column blocks (i, f, o, g);
      TC (T, B, H) = tanh(c_t).   O(T*B*7H) memory besides X (W_* are the caller's arrays);
      Hs[1:] is Y, so 6H of it beyond Y.
    With lengths (module docstring) saved has a 10th entry, a dict with "bt" (active rows per
    step) and "pack"; padded rows of Hs, Cs, TC are zero.
    With recompute_every=k, saved = (X, W_ih, W_hh, Hs, None, None, None, has_b_ih, has_b_hh,
    ext), ext holding "ck" (ceil(T/k), B, H) = c at steps 0, k, 2k, ..., the folded bias "bias"
    (4H,), "bt", "pack", "k" and "exact": O(T/k * B*H) beyond Y and X. h at the checkpoints
    needs no copy: Hs (Y's buffer) holds every h_t, and a step's gates need only x_t and h_{t-1}.
    The forward's projection (T, B, 4H) is transient (_RECOMPUTE_EXACT) or per segment (k, B, 4H);
    the backward's transient memory: see the module docstring.
    """
    X, dt, W_ih, W_hh = _start(X, W_ih, W_hh)
    T, B, I = X.shape
    H = W_hh.shape[0]
    if lengths is not None or recompute_every is not None:
        order = _sort_order(lengths, B)
        if order is not None:
            return (yield from _forward_sorted(lstm_forward_phases, order, X, (h0, c0), (W_ih, W_hh, b_ih, b_hh),
                                               lengths, recompute_every=recompute_every))
        k = _every(recompute_every)
        bt, lens = _active_rows(lengths, T, B)
        if bt is not None or k is not None:
            return (yield from _lstm_forward_general(X, h0, c0, W_ih, W_hh, b_ih, b_hh, bt, lens, k))
    if _feature_major(B, H, 4):
        return (yield from _lstm_forward_fm(X, h0, c0, W_ih, W_hh, b_ih, b_hh))
    H2, H3 = 2 * H, 3 * H
    # sigmoid(a) = 0.5 * tanh(a/2) + 0.5, with the 1/2 folded into copies of the sigmoid
    # columns of the weights and bias: one tanh over all 4H pre-activations of a step
    Wh = _gates(W_hh, H, _LSTM_FWD, _LSTM_SCALE)
    Gt = np.matmul(X.reshape(T * B, I), _gates(W_ih, H, _LSTM_FWD, _LSTM_SCALE))
    Gt = Gt.reshape(T, B, 4 * H)
    bias = _lstm_bias(b_ih, b_hh, H, dt)
    if bias is not None:
        Gt += bias
    Hs = np.empty((T + 1, B, H), dt)
    Cs = np.empty((T + 1, B, H), dt)
    TC = np.empty((T, B, H), dt)
    Hs[0] = _h0(h0, B, H, dt)
    Cs[0] = _h0(c0, B, H, dt)
    tmp4 = np.empty((B, 4 * H), dt)
    tmp = np.empty((B, H), dt)
    blocks = _column_blocks(Wh, B)
    # per-step views made once, in C
    Gl = list(Gt)
    Sl = list(Gt[:, :, :H3])
    Il = list(Gt[:, :, :H])
    Fl = list(Gt[:, :, H:H2])
    Ol = list(Gt[:, :, H2:H3])
    GGl = list(Gt[:, :, H3:])
    Hl = list(Hs)
    Cl = list(Cs)
    TCl = list(TC)
    mul = np.multiply
    yield  # the recurrent loop starts: run_phased may run it beside another kernel's loop
    for t in range(T):
        g4 = Gl[t]
        for w, cols in blocks:
            np.matmul(Hl[t], w, out=tmp4[:, cols])
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
    yield  # the recurrent loop is done
    saved = (X, W_ih, W_hh, Hs, Cs, Gt, TC, b_ih is not None, b_hh is not None)
    return Hs[1:], Hs[T].copy(), Cs[T].copy(), saved


def lstm_backward_phases(dY, dh_n, dc_n, saved, grad_sq=None):
    """BPTT for lstm_forward. Returns (dX, dh0, dc0, dW_ih, dW_hh, db_ih, db_hh).
    grad_sq: optional (T, B) float array filled with ||dL/dh_t||^2 (module docstring).

    With the recurrence-independent factors [...] computed in bulk (block by block of steps):
        da_i = dc * [g i(1-i)]      da_f = dc * [c_prev f(1-f)]     da_g = dc * [i (1-g^2)]
        da_o = dh * [tanh(c) o(1-o)]
        dc   = dc_next + dh * [o (1-tanh(c)^2)],   dc_prev = dc * f,   dh_prev = da @ W_hh^T
    da is stored in torch's order (i, f, g, o): i, f, g take one broadcast multiply by dc.
    """
    if isinstance(saved, _Sorted):
        return (yield from _backward_sorted(lstm_backward_phases, (dY, dh_n, dc_n), saved, grad_sq))
    if isinstance(saved, _FeatureMajor):
        return (yield from _lstm_backward_fm(dY, dh_n, dc_n, saved, grad_sq))
    if len(saved) > 9 or grad_sq is not None:
        return (yield from _lstm_backward_general(dY, dh_n, dc_n, saved, grad_sq))
    X, W_ih, W_hh, Hs, Cs, Gt, TC, has_bi, has_bh = saved
    dt = X.dtype
    T, B, I = X.shape
    H = W_hh.shape[0]
    H2, H3, H4 = 2 * H, 3 * H, 4 * H
    dY = _arr(dY, dt)
    dh_n = _arr(dh_n, dt)
    dc_n = _arr(dc_n, dt)
    small = W_hh.size <= _WT_COPY_MAX
    if small:
        blocks = _column_blocks(_transpose(W_hh), B)   # W_hh^T (4H, H)
    else:
        gT = np.empty((H, B), dt)

    dA = np.empty((T, B, H4), dt)    # gate pre-activation gradients (i, f, g, o)
    Kc = np.empty((T, B, H), dt)     # o * (1 - tanh(c)^2)
    dA3 = dA.reshape(T, B, 4, H)[:, :, :3, :]        # (i, f, g) as (T, B, 3, H)
    dAo = dA[:, :, H3:]
    F = Gt[:, :, H:H2]
    dh = np.empty((B, H), dt)
    dc = np.zeros((B, H), dt) if dc_n is None else dc_n.copy()
    tmp = np.empty((B, H), dt)
    mul = np.multiply

    yield  # the recurrent loop starts: run_phased may run it beside another kernel's loop
    for lo, hi in _blocks(T, B * H4 * dt.itemsize):
        # ---- recurrence-independent factors of steps lo..hi-1, written into dA ----
        _lstm_factors(Gt[lo:hi], dA[lo:hi], Cs[lo:hi], TC[lo:hi], Kc[lo:hi], H, 2)
        # ---- the recurrence over this block ----
        for t in range(hi - 1, lo - 1, -1):
            # dh = dL/dh_t = dY[t] + da_{t+1} @ W_hh^T
            if t == T - 1:
                if dh_n is None:
                    dh.fill(0)
                else:
                    dh[...] = dh_n
                if dY is not None:
                    dh += dY[t]
            elif small:
                for w, cols in blocks:
                    np.matmul(dA[t + 1], w, out=dh[:, cols])
                if dY is not None:
                    dh += dY[t]
            else:
                np.matmul(W_hh, dA[t + 1].T, out=gT)
                if dY is not None:
                    np.add(gT.T, dY[t], out=dh)
                else:
                    dh[...] = gT.T
            mul(dh, Kc[t], out=tmp)
            dc += tmp
            dAo[t] *= dh
            dA3[t] *= dc[:, None, :]
            dc *= F[t]                                # dc_{t-1} = dc_t * f_t

    yield  # the recurrent loop is done
    dh0 = dA[0] @ W_hh.T
    dX, dW_ih, dW_hh, db_ih, db_hh = _weight_grads(dA.reshape(T * B, H4), X, W_ih, Hs[:T], has_bi, has_bh)
    return dX, dh0, dc, dW_ih, dW_hh, db_ih, db_hh


# Batches of at most this many sequences, with at most _FEATURE_MAJOR_MAX_HIDDEN hidden units, take
# the LSTM's and the GRU's plain path feature-major: a step's gates and states are (features, batch)
# arrays, so the recurrent GEMMs are W_hh^T (G*H, H) @ h (H, B) and W_hh (H, G*H) @ da (G*H, B), which
# OpenBLAS runs about 30% faster for B = 10-20 than h (B, H) @ W (H, G*H), and each gate is a
# contiguous block of rows. Elsewhere the transposes cost what the GEMMs save, or more (LSTM kernel
# step, feature-major over batch-major: 0.87-0.94 at H = 200, 0.96-1.01 at H = 650, 1.17 at
# H = 1024 and B = 8, 1.12 at 64 x 1024): those stay batch-major. So do the sizes whose batch-major step
# GEMM splits into small-kernel blocks (_SMALL_GEMM_MACS: B <= 12 at H = 200 for the LSTM, B <= 16 for the
# GRU), which beat both (LSTM at B = 10: 0.84 of feature-major with one BLAS thread, 0.99 with two).
_FEATURE_MAJOR_MAX_BATCH = 32
_FEATURE_MAJOR_MAX_HIDDEN = 512


class _FeatureMajor(tuple):
    """saved of a feature-major plain path (_lstm_forward_fm, _gru_forward_fm)."""


def _feature_major_upstream(dY, finals, H, B, dt):
    """dY (T, B, H) as a (T, H, B) array (None stays None), and each final state's gradient (B, H) as a
    fresh (H, B) array (zeros for None): fresh because the backward writes it in place, and with B = 1 a
    transposed view would be contiguous, so writing it would change the caller's array."""
    # one copy each, whatever the layout that came (a bidirectional layer hands column halves of its dY)
    dYf = None if dY is None else np.ascontiguousarray(np.asarray(dY).transpose(0, 2, 1), dtype=dt)
    return dYf, [np.zeros((H, B), dt) if g is None else np.array(np.asarray(g).T, dtype=dt, order="C")
                 for g in finals]


def _lstm_forward_fm(X, h0, c0, W_ih, W_hh, b_ih, b_hh):
    """lstm_forward's plain path for small batches, feature-major (see _FEATURE_MAJOR_MAX_BATCH), with
    exactly its arithmetic. saved = _FeatureMajor((X, W_ih, W_hh, Hb, Cs, Gt, TC, has_b_ih, has_b_hh)):
    Hb (T+1, B, H) = [h0, h_1..h_T] batch-major (Y is Hb[1:], and Hb[:T] serves the dW_hh GEMM);
    Cs (T+1, H, B) = [c0, c_1..c_T], Gt (T, 4H, B) activated gates (rows i, f, o, g) and
    TC (T, H, B) = tanh(c_t), feature-major."""
    dt = X.dtype
    T, B, I = X.shape
    H = W_hh.shape[0]
    H2, H3, H4 = 2 * H, 3 * H, 4 * H
    WhT = _gates_t(W_hh, H, _LSTM_FWD, _LSTM_SCALE)                     # (4H, H)
    P = np.matmul(X.reshape(T * B, I), _gates(W_ih, H, _LSTM_FWD, _LSTM_SCALE)).reshape(T, B, H4)
    bias = _lstm_bias(b_ih, b_hh, H, dt)
    if bias is not None:
        P += bias
    PT = list(P.transpose(0, 2, 1))     # step t's projection as a (4H, B) view, read once by the loop
    Gt = np.empty((T, H4, B), dt)
    Hs = np.empty((T + 1, H, B), dt)
    Cs = np.empty((T + 1, H, B), dt)
    TC = np.empty((T, H, B), dt)
    Hs[0] = _h0(h0, B, H, dt).T
    Cs[0] = _h0(c0, B, H, dt).T
    tmp4 = np.empty((H4, B), dt)
    tmp = np.empty((H, B), dt)
    Hl, Cl, TCl, Gl = list(Hs), list(Cs), list(TC), list(Gt)
    mul = np.multiply
    yield  # the recurrent loop starts: run_phased may run it beside another kernel's loop
    for t in range(T):
        g4 = Gl[t]
        np.matmul(WhT, Hl[t], out=tmp4)
        np.add(tmp4, PT[t], out=g4)
        np.tanh(g4, out=g4)
        s = g4[:H3]
        s *= 0.5
        s += 0.5
        c = Cl[t + 1]
        mul(g4[H:H2], Cl[t], out=c)
        mul(g4[:H], g4[H3:], out=tmp)
        c += tmp
        np.tanh(c, out=TCl[t])
        mul(g4[H2:H3], TCl[t], out=Hl[t + 1])
    yield  # the recurrent loop is done
    Hb = np.empty((T + 1, B, H), dt)
    Hb[...] = Hs.transpose(0, 2, 1)
    saved = _FeatureMajor((X, W_ih, W_hh, Hb, Cs, Gt, TC, b_ih is not None, b_hh is not None))
    return Hb[1:], Hb[T].copy(), Cs[T].T.copy(), saved


def _lstm_backward_fm(dY, dh_n, dc_n, saved, grad_sq):
    """lstm_backward for _lstm_forward_fm: the same factors and recurrence on (features, batch) arrays;
    the gate gradients are turned batch-major once, after the loop, for the weight-gradient GEMMs."""
    X, W_ih, W_hh, Hb, Cs, Gt, TC, has_bi, has_bh = saved
    dt = X.dtype
    T, B, I = X.shape
    H = W_hh.shape[0]
    H2, H3, H4 = 2 * H, 3 * H, 4 * H
    gs = _grad_sq(grad_sq, T, B)
    dYf, (dh, dc) = _feature_major_upstream(dY, (dh_n, dc_n), H, B, dt)
    dA = np.empty((T, H4, B), dt)    # gate pre-activation gradients, rows (i, f, g, o)
    Kc = np.empty((T, H, B), dt)     # o * (1 - tanh(c)^2)
    dA3 = dA.reshape(T, 4, H, B)[:, :3]
    F = Gt[:, H:H2]
    tmp = np.empty((H, B), dt)
    mul = np.multiply
    yield  # the recurrent loop starts: run_phased may run it beside another kernel's loop
    for lo, hi in _blocks(T, B * H4 * dt.itemsize):
        _lstm_factors(Gt[lo:hi], dA[lo:hi], Cs[lo:hi], TC[lo:hi], Kc[lo:hi], H, 1)
        for t in range(hi - 1, lo - 1, -1):
            # dh = dL/dh_t = dY[t] + W_hh @ da_{t+1}  (dh_n at the last step)
            if t < T - 1:
                np.matmul(W_hh, dA[t + 1], out=dh)
            if dYf is not None:
                dh += dYf[t]
            if gs is not None:
                gs[t] = np.einsum("ij,ij->j", dh, dh)
            mul(dh, Kc[t], out=tmp)
            dc += tmp
            dA[t, H3:] *= dh
            dA3[t] *= dc
            dc *= F[t]                                # dc_{t-1} = dc_t * f_t
    yield  # the recurrent loop is done
    dh0 = dA[0].T @ W_hh.T
    dG = np.empty((T, B, H4), dt)
    dG[...] = dA.transpose(0, 2, 1)
    dX, dW_ih, dW_hh, db_ih, db_hh = _weight_grads(dG.reshape(T * B, H4), X, W_ih, Hb[:T], has_bi, has_bh)
    return dX, dh0, dc.T.copy(), dW_ih, dW_hh, db_ih, db_hh


def _lstm_factors(G, D, C_prev, TCb, Kb, H, axis):
    """The recurrence-independent factors of a block of LSTM steps (lstm_backward's docstring), from the
    activated gates G (i, f, o, g), c_{t-1} and tanh(c_t), into D (i, f, g, o) and Kb = o (1 - tanh(c)^2).
    Gates lie along `axis` (2 batch-major, 1 feature-major)."""
    def cut(A, lo, hi):
        return A[(slice(None),) * axis + (slice(lo * H, hi * H),)]
    mul, sub = np.multiply, np.subtract
    i, f_i, o, g = cut(G, 0, 1), cut(G, 0, 2), cut(G, 2, 3), cut(G, 3, 4)
    Di, Df, Dif, Dg, Do = cut(D, 0, 1), cut(D, 1, 2), cut(D, 0, 2), cut(D, 2, 3), cut(D, 3, 4)
    mul(f_i, f_i, out=Dif)
    sub(f_i, Dif, out=Dif)                            # s(1-s) for i, f
    mul(o, o, out=Do)
    sub(o, Do, out=Do)                                # s(1-s) for o
    mul(g, g, out=Dg)
    sub(1, Dg, out=Dg)                                # 1 - g^2
    Di *= g
    Df *= C_prev
    Dg *= i
    Do *= TCb
    mul(TCb, TCb, out=Kb)
    sub(1, Kb, out=Kb)
    Kb *= o


def _lstm_bias(b_ih, b_hh, H, dt):
    """b_ih + b_hh in the forward's gate order and scaling, as lstm_forward folds it; or None."""
    if b_ih is None and b_hh is None:
        return None
    b = np.zeros(4 * H, dt)
    if b_ih is not None:
        b += _arr(b_ih, dt)
    if b_hh is not None:
        b += _arr(b_hh, dt)
    return _gates(b, H, _LSTM_FWD, _LSTM_SCALE)


def _lstm_steps(G, Cl, TCl, Hs, blocks, lo, bt, tmp4, tmp, write_h):
    """Steps lo, lo+1, ..., lo+len(G)-1 of lstm_forward's loop, with exactly its operations, on
    the first bt[t] rows of each step (all rows when bt is None).
    G (n, B, 4H): pre-activations (gate order i, f, o, g), activated in place. Cl: n+1 arrays
    (B, H), Cl[0] = c before step lo, Cl[j+1] receives c after step lo+j (they may all be one
    array, updated in place). TCl: n arrays (B, H) receiving tanh(c). Reads h_t from Hs[t];
    writes Hs[t+1] when write_h. blocks: the gate-ordered W_hh as _column_blocks."""
    H = blocks[0][0].shape[0]
    H2, H3 = 2 * H, 3 * H
    B = G.shape[1]
    mul = np.multiply
    for j in range(G.shape[0]):
        t = lo + j
        b = B if bt is None else bt[t]
        g4 = G[j, :b]
        t4 = tmp4[:b]
        for w, cols in blocks:
            np.matmul(Hs[t, :b], w, out=t4[:, cols])
        g4 += t4
        np.tanh(g4, out=g4)
        s = g4[:, :H3]
        s *= 0.5
        s += 0.5
        c = Cl[j + 1][:b]
        mul(g4[:, H:H2], Cl[j][:b], out=c)
        tb = tmp[:b]
        mul(g4[:, :H], g4[:, H3:], out=tb)
        c += tb
        tc = TCl[j][:b]
        np.tanh(c, out=tc)
        if write_h:
            mul(g4[:, H2:H3], tc, out=Hs[t + 1, :b])


def _lstm_forward_general(X, h0, c0, W_ih, W_hh, b_ih, b_hh, bt, lens, k):
    """lstm_forward with lengths (bt, lens) and/or recompute_every (k)."""
    dt = X.dtype
    T, B, I = X.shape
    H = W_hh.shape[0]
    H4 = 4 * H
    Wi = _gates(W_ih, H, _LSTM_FWD, _LSTM_SCALE)
    blocks = _column_blocks(_gates(W_hh, H, _LSTM_FWD, _LSTM_SCALE), B)
    bias = _lstm_bias(b_ih, b_hh, H, dt)
    X2 = X.reshape(T * B, I)
    alloc = np.empty if bt is None else np.zeros     # padded rows stay zero
    Hs = alloc((T + 1, B, H), dt)
    Hs[0] = _h0(h0, B, H, dt)
    tmp4 = np.empty((B, H4), dt)
    tmp = np.empty((B, H), dt)
    has = (b_ih is not None, b_hh is not None)
    pack = _packs(bt, B, I, H, H4)
    if k is None or _RECOMPUTE_EXACT:
        Gt = np.empty((T, B, H4), dt)
        _project_into(X2, Wi, bias, Gt.reshape(T * B, H4), bt, B, _packed_input(X2, bt, B, pack))
    if k is None:
        Cs = alloc((T + 1, B, H), dt)
        Cs[0] = _h0(c0, B, H, dt)
        TC = alloc((T, B, H), dt)
        yield  # the recurrent loop starts: run_phased may run it beside another kernel's loop
        _lstm_steps(Gt, list(Cs), list(TC), Hs, blocks, 0, bt, tmp4, tmp, True)
        yield  # the recurrent loop is done
        saved = (X, W_ih, W_hh, Hs, Cs, Gt, TC) + has + ({"bt": bt, "pack": pack},)
        return Hs[1:], _finals(Hs, lens), _finals(Cs, lens), saved
    # recompute: c runs in one (B, H) array (a row stops changing after its sequence's last
    # step, so it ends as c_n), checkpointed at the start of every segment
    exact = _RECOMPUTE_EXACT
    segs = _segments(T, k)
    ck = np.empty((len(segs), B, H), dt)
    c = _h0(c0, B, H, dt).copy()
    tc = np.empty((B, H), dt)
    if not exact:
        Gs = np.empty((min(k, T), B, H4), dt)
    for s, (lo, hi) in enumerate(segs):
        ck[s] = c
        if exact:
            G = Gt[lo:hi]
        else:
            G = Gs[:hi - lo]
            _project(X2[lo * B:hi * B], Wi, bias, out=G.reshape(-1, H4))
        _lstm_steps(G, [c] * (hi - lo + 1), [tc] * (hi - lo), Hs, blocks, lo, bt, tmp4, tmp, True)
    ext = {"bt": bt, "pack": pack and exact, "k": k, "exact": exact, "ck": ck, "bias": bias}
    saved = (X, W_ih, W_hh, Hs, None, None, None) + has + (ext,)
    return Hs[1:], _finals(Hs, lens), c, saved


def _lstm_backward_general(dY, dh_n, dc_n, saved, grad_sq):
    """lstm_backward with lengths, recompute and/or grad_sq: lstm_backward's operations on the
    active rows of each step, segment by segment (recompute) or over the whole sequence."""
    X, W_ih, W_hh, Hs, Cs, Gt, TC, has_bi, has_bh, *ext = saved
    ext = ext[0] if ext else {}
    dt = X.dtype
    T, B, I = X.shape
    H = W_hh.shape[0]
    H2, H3, H4 = 2 * H, 3 * H, 4 * H
    bt = ext.get("bt") or [B] * T
    k = ext.get("k")
    exact = k is None or ext["exact"]
    gs = _grad_sq(grad_sq, T, B)
    dY = _arr(dY, dt)
    dh_n = _arr(dh_n, dt)
    dc_n = _arr(dc_n, dt)
    small = W_hh.size <= _WT_COPY_MAX
    if small:
        blocks = _column_blocks(_transpose(W_hh), B)   # W_hh^T (4H, H)
    else:
        gT = np.empty((H, B), dt)
    X2 = X.reshape(T * B, I)
    # running dL/dh and dL/dc: a sequence's rows keep dh_n, dc_n until its last step
    dh = np.zeros((B, H), dt) if dh_n is None else dh_n.copy()
    dc = np.zeros((B, H), dt) if dc_n is None else dc_n.copy()
    tmp = np.empty((B, H), dt)
    mul = np.multiply
    row_bytes = B * H4 * dt.itemsize
    dA = np.empty((T, B, H4), dt) if exact else None  # gate gradients (i, f, g, o), all steps
    pack = ext.get("pack", False)                     # else padded rows of dA are zeroed
    Xg = _packed_input(X2, bt, B, pack)
    if k is None:
        segs = [(0, T)]
        Kc = np.empty((T, B, H), dt)
    else:
        segs = _segments(T, k)
        n0 = min(k, T)
        bias, ck = ext["bias"], ext["ck"]
        # the forward's reordered, scaled weight copies, made again (exact: scaling by 1/2)
        Wi = _gates(W_ih, H, _LSTM_FWD, _LSTM_SCALE)
        fwd_blocks = _column_blocks(_gates(W_hh, H, _LSTM_FWD, _LSTM_SCALE), B)
        # segment buffers; zeros so that rows a segment leaves unwritten are finite
        Gs = np.zeros((n0, B, H4), dt)
        Cg = np.zeros((n0 + 1, B, H), dt)
        TCg = np.zeros((n0, B, H), dt)
        Kc = np.empty((n0, B, H), dt)
        tmp4 = np.empty((B, H4), dt)
        if exact:
            # the forward's projection GEMM again, into the gradient buffer
            _project_into(X2, Wi, None, dA.reshape(T * B, H4), bt, B, Xg)
        else:
            Dpp = (np.empty((n0, B, H4), dt), np.empty((n0, B, H4), dt))
            dX = np.empty((T, B, I), dt)
            dW_ih = np.zeros((I, H4), dt)
            dW_hh = np.zeros((H, H4), dt)
            db = np.zeros(H4, dt) if (has_bi or has_bh) else None
    nxt = None                                       # gate gradients of step t + 1
    if k is None:
        yield  # the recurrent loop starts: run_phased may run it beside another kernel's loop
    for si in range(len(segs) - 1, -1, -1):
        slo, shi = segs[si]
        n = shi - slo
        # arrays of this segment, indexed by j = t - slo
        if k is None:
            G, C, TCa, D, K = Gt, Cs, TC, dA, Kc
        else:
            G = Gs[:n]
            if exact:
                D = dA[slo:shi]
                if bias is not None:
                    np.add(D, bias, out=G)
                else:
                    G[...] = D
            else:
                D = Dpp[si % 2][:n]
                _project(X2[slo * B:shi * B], Wi, bias, out=G.reshape(n * B, H4))
            C = Cg[:n + 1]
            C[0] = ck[si]
            TCa = TCg[:n]
            K = Kc[:n]
            _lstm_steps(G, list(C), list(TCa), Hs, fwd_blocks, slo, bt, tmp4, tmp, False)
        for lo, hi in _blocks(n, row_bytes):
            # ---- recurrence-independent factors (as lstm_backward), rows active in the block ----
            bm = bt[slo + lo]
            _lstm_factors(G[lo:hi, :bm], D[lo:hi, :bm], C[lo:hi, :bm], TCa[lo:hi, :bm], K[lo:hi, :bm], H, 2)
            # ---- the recurrence over this block ----
            for j in range(hi - 1, lo - 1, -1):
                t = slo + j
                b = bt[t]
                b1 = bt[t + 1] if t + 1 < T else 0
                if b1:
                    if small:
                        for w, cols in blocks:
                            np.matmul(nxt[:b1], w, out=dh[:b1, cols])
                    else:
                        gt = gT[:, :b1]
                        np.matmul(W_hh, nxt[:b1].T, out=gt)
                        dh[:b1] = gt.T
                dhb = dh[:b]
                if dY is not None:
                    dhb += dY[t, :b]
                if gs is not None:
                    gs[t, :b] = np.einsum("ij,ij->i", dhb, dhb)
                dcb = dc[:b]
                tb = tmp[:b]
                mul(dhb, K[j, :b], out=tb)
                dcb += tb
                Dj = D[j]
                do = Dj[:b, H3:]
                do *= dhb
                d3 = Dj[:b].reshape(b, 4, H)[:, :3, :]
                mul(d3, dcb[:, None, :], out=d3)
                dcb *= G[j, :b, H:H2]                   # dc_{t-1} = dc_t * f_t
                if b < B:
                    if not pack:
                        Dj[b:] = 0
                    if gs is not None:
                        gs[t, b:] = 0
                nxt = Dj
        if not exact:
            Df = D.reshape(n * B, H4)
            rows = slice(slo * B, shi * B)
            np.matmul(Df, W_ih.T, out=dX.reshape(T * B, I)[rows])
            dW_ih += X2[rows].T @ Df
            dW_hh += Hs[slo:shi].reshape(n * B, H).T @ Df
            if db is not None:
                db += _col_sum(Df)
    if k is None:
        yield  # the recurrent loop is done
    dh0 = nxt @ W_hh.T
    if exact:
        dG, Xg, Hg = _grad_rows(dA.reshape(T * B, H4), X2, Hs, bt, B, pack, Xg)
        dX = _input_grad(dG, W_ih.T, T, B, bt, pack)
        dW_ih = Xg.T @ dG
        dW_hh = Hg.T @ dG
        db_ih, db_hh = _bias_grads(dG, has_bi, has_bh)
    else:
        db_ih = db.copy() if has_bi else None
        db_hh = db if has_bh else None
    return dX, dh0, dc, dW_ih, dW_hh, db_ih, db_hh


# ----------------------------------------------------------------------------------------
# GRU
# ----------------------------------------------------------------------------------------

# Input side in the order (n, r, z), hidden side in torch's (r, z, n): see gru_backward.
_GRU_IN = (2, 0, 1)
_GRU_IN_SCALE = (1, 0.5, 0.5)
_GRU_IN_BACK = (1, 2, 0)          # (n, r, z) -> torch (r, z, n)


def gru_forward_phases(X, h0, W_ih, W_hh, b_ih=None, b_hh=None, lengths=None, recompute_every=None):
    """GRU over a whole sequence.

    Returns (Y, h_n, saved). Y (T, B, H) is a view of the hidden-state buffer kept in saved;
    h_n is a fresh copy.
    saved = (X, W_ih, W_hh, Hs, Gt, HW, has_b_ih, has_b_hh):
      Hs (T+1, B, H) = [h0, h_1..h_T];
      Gt (T, B, 3H) = activated gates, column blocks (n, r, z);
      HW (T, B, 3H) = h_{t-1} W_hh in torch's order (r, z, n), with b_hn added to the n part
                      (only that part, h W_hn + b_hn, is used by the backward).
      O(T*B*7H) memory besides X; Hs[1:] is Y, so 6H of it beyond Y.
    With lengths (module docstring) saved has a 9th entry, a dict with "bt" (active rows per
    step) and "pack"; padded rows of Hs and HW are zero.
    With recompute_every=k, saved = (X, W_ih, W_hh, Hs, None, None, has_b_ih, has_b_hh, ext),
    ext holding the folded biases "bias" (3H,) and "b_hn" (H,), "bt", "pack", "k" and "exact":
    nothing beyond Y and X (a step's gates need only x_t and h_{t-1}, which Y holds, so no
    checkpoints are needed; k sets the size of the backward's segments). The forward's projection
    (T, B, 3H) is transient (_RECOMPUTE_EXACT) or per segment (k, B, 3H); the backward's transient
    memory: see the module docstring.
    """
    X, dt, W_ih, W_hh = _start(X, W_ih, W_hh)
    T, B, I = X.shape
    H = W_hh.shape[0]
    if lengths is not None or recompute_every is not None:
        order = _sort_order(lengths, B)
        if order is not None:
            return (yield from _forward_sorted(gru_forward_phases, order, X, (h0,), (W_ih, W_hh, b_ih, b_hh), lengths,
                                               recompute_every=recompute_every))
        k = _every(recompute_every)
        bt, lens = _active_rows(lengths, T, B)
        if bt is not None or k is not None:
            return (yield from _gru_forward_general(X, h0, W_ih, W_hh, b_ih, b_hh, bt, lens, k))
    if _feature_major(B, H, 3):
        return (yield from _gru_forward_fm(X, h0, W_ih, W_hh, b_ih, b_hh))
    H2, H3 = 2 * H, 3 * H
    # sigmoid(a) = 0.5 * tanh(a/2) + 0.5 with the 1/2 folded into the r, z weight columns
    Wh = _gates(W_hh, H, (0, 1, 2), (0.5, 0.5, 1))
    Gt = np.matmul(X.reshape(T * B, I), _gates(W_ih, H, _GRU_IN, _GRU_IN_SCALE))
    Gt = Gt.reshape(T, B, H3)
    bias, b_hn = _gru_bias(b_ih, b_hh, H, dt)    # b_hn sits inside r * (...), apart
    if bias is not None:
        Gt += bias
    Hs = np.empty((T + 1, B, H), dt)
    Hs[0] = _h0(h0, B, H, dt)
    HW = np.empty((T, B, H3), dt)
    tmp = np.empty((B, H), dt)
    Nl = list(Gt[:, :, :H])
    RZl = list(Gt[:, :, H:])
    Rl = list(Gt[:, :, H:H2])
    Zl = list(Gt[:, :, H2:])
    HWl = list(HW)
    HWrz = list(HW[:, :, :H2])
    HWn = list(HW[:, :, H2:])
    Hl = list(Hs)
    blocks = _column_blocks(Wh, B)
    mul = np.multiply
    yield  # the recurrent loop starts: run_phased may run it beside another kernel's loop
    for t in range(T):
        for w, cols in blocks:
            np.matmul(Hl[t], w, out=HWl[t][:, cols])
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
    yield  # the recurrent loop is done
    saved = (X, W_ih, W_hh, Hs, Gt, HW, b_ih is not None, b_hh is not None)
    return Hs[1:], Hs[T].copy(), saved


def gru_backward_phases(dY, dh_n, saved, grad_sq=None):
    """BPTT for gru_forward. Returns (dX, dh0, dW_ih, dW_hh, db_ih, db_hh).
    grad_sq: optional (T, B) float array filled with ||dL/dh_t||^2 (module docstring).

    The gradient buffer D (T, B, 4H) holds [da_n | da_r | da_z | d(h W_hn + b_hn)]; every
    entry is dh_t times a recurrence-independent factor P computed in bulk:
        P_n  = (1 - z)(1 - n^2)            P_r = P_n * (h W_hn + b_hn) * r(1 - r)
        P_z  = (h_prev - n) z(1 - z)       P_hn = P_n * r
    and dh_{t-1} = dY[t-1] + z * dh_t + D[t][:, H:] @ W_hh^T.
    D[:, :3H] is the input-side gradient (n, r, z), D[:, H:] the hidden side in torch's
    order (r, z, n): both weight-gradient GEMMs read plain column slices of D.
    """
    if isinstance(saved, _Sorted):
        return (yield from _backward_sorted(gru_backward_phases, (dY, dh_n), saved, grad_sq))
    if isinstance(saved, _FeatureMajor):
        return (yield from _gru_backward_fm(dY, dh_n, saved, grad_sq))
    if len(saved) > 8 or grad_sq is not None:
        return (yield from _gru_backward_general(dY, dh_n, saved, grad_sq))
    X, W_ih, W_hh, Hs, Gt, HW, has_bi, has_bh = saved
    dt = X.dtype
    T, B, I = X.shape
    H = W_hh.shape[0]
    H2, H4 = 2 * H, 4 * H
    dY = _arr(dY, dt)
    dh_n = _arr(dh_n, dt)
    small = W_hh.size <= _WT_COPY_MAX
    if small:
        blocks = _column_blocks(_transpose(W_hh), B)   # W_hh^T (3H, H), torch row order (r, z, n)
    else:
        gT = np.empty((H, B), dt)

    D = np.empty((T, B, H4), dt)
    D4 = D.reshape(T, B, 4, H)
    Dh = D[:, :, H:]
    Z = Gt[:, :, H2:]
    dh = np.zeros((B, H), dt) if dh_n is None else dh_n.copy()
    tmp = np.empty((B, H), dt)

    yield  # the recurrent loop starts: run_phased may run it beside another kernel's loop
    for lo, hi in _blocks(T, B * H4 * dt.itemsize):
        _gru_factors(Gt[lo:hi], HW[lo:hi, :, H2:], D[lo:hi], Hs[lo:hi], H, 2)
        for t in range(hi - 1, lo - 1, -1):
            if t < T - 1:
                # dh_t = dY[t] + z_{t+1} dh_{t+1} + D[t+1][:, H:] @ W_hh^T
                dh *= Z[t + 1]
                if small:
                    for w, cols in blocks:
                        np.matmul(Dh[t + 1], w, out=tmp[:, cols])
                    dh += tmp
                else:
                    np.matmul(W_hh, Dh[t + 1].T, out=gT)
                    dh += gT.T
            if dY is not None:
                dh += dY[t]
            D4[t] *= dh[:, None, :]

    yield  # the recurrent loop is done
    dh0 = Dh[0] @ W_hh.T
    dh *= Z[0]
    dh0 += dh
    dX, dW_ih, dW_hh, db_ih, db_hh = _gru_weight_grads(D.reshape(T * B, H4), X, W_ih, Hs[:T], has_bi, has_bh)
    return dX, dh0, dW_ih, dW_hh, db_ih, db_hh


def _gru_factors(G, HWn, D, H_prev, H, axis):
    """The recurrence-independent factors of a block of GRU steps (gru_backward's docstring), from the
    activated gates G (n, r, z), h_{t-1} W_hn + b_hn and h_{t-1}, into D [P_n | P_r | P_z | P_hn]. Gates
    lie along `axis` (2 batch-major, 1 feature-major)."""
    def cut(A, k):
        return A[(slice(None),) * axis + (slice(k * H, (k + 1) * H),)]
    mul, sub = np.multiply, np.subtract
    n, r, z = cut(G, 0), cut(G, 1), cut(G, 2)
    Pn, Pr, Pz, Phn = cut(D, 0), cut(D, 1), cut(D, 2), cut(D, 3)
    mul(n, n, out=Pn)
    sub(1, Pn, out=Pn)
    sub(1, z, out=Pz)
    Pn *= Pz                                          # P_n = (1 - z)(1 - n^2)
    mul(Pn, r, out=Phn)                               # P_hn = P_n r
    sub(1, r, out=Pr)
    Pr *= HWn
    Pr *= Phn                                         # P_r = P_hn hn (1 - r)
    Pz *= z
    Pz *= sub(H_prev, n)                              # P_z = (h_prev - n) z (1 - z)


def _gru_weight_grads(Df, X, W_ih, H_prev, has_bi, has_bh):
    """(dX, dW_ih, dW_hh, db_ih, db_hh) from the GRU's gradient buffer Df (T*B, 4H), columns
    [da_n | da_r | da_z | d(h W_hn + b_hn)] (see gru_backward), one GEMM each, in torch's gate order;
    H_prev (T, B, H) holds every step's h_{t-1}."""
    T, B, I = X.shape
    H = H_prev.shape[2]
    H3 = 3 * H
    Din = Df[:, :H3]
    dX = (Din @ _gates(W_ih, H, _GRU_IN).T).reshape(T, B, I)
    dW_ih = _gates(X.reshape(T * B, I).T @ Din, H, _GRU_IN_BACK)
    dW_hh = H_prev.reshape(T * B, H).T @ Df[:, H:]
    if not (has_bi or has_bh):
        return dX, dW_ih, dW_hh, None, None
    S = _col_sum(Df)
    db_ih = _gates(S[:H3], H, _GRU_IN_BACK) if has_bi else None
    db_hh = S[H:].copy() if has_bh else None
    return dX, dW_ih, dW_hh, db_ih, db_hh


def _gru_bias(b_ih, b_hh, H, dt):
    """(bias, b_hn) as gru_forward folds them: b_ih + (b_hr, b_hz) in the input side's order and
    scaling, and b_hn apart; (None, None) without biases."""
    if b_ih is None and b_hh is None:
        return None, None
    b = np.zeros(3 * H, dt)
    b_hn = None
    if b_ih is not None:
        b += _arr(b_ih, dt)
    if b_hh is not None:
        bh = _arr(b_hh, dt)
        b[:2 * H] += bh[:2 * H]
        b_hn = bh[2 * H:]
    return _gates(b, H, _GRU_IN, _GRU_IN_SCALE), b_hn


def _gru_forward_fm(X, h0, W_ih, W_hh, b_ih, b_hh):
    """gru_forward's plain path for small batches, feature-major (see _FEATURE_MAJOR_MAX_BATCH), with
    exactly its arithmetic. saved = _FeatureMajor((X, W_ih, W_hh, Hb, Gt, HW, has_b_ih, has_b_hh)):
    Hb (T+1, B, H) = [h0, h_1..h_T] batch-major (Y is Hb[1:]); Gt (T, 3H, B) activated gates (rows
    n, r, z) and HW (T, 3H, B) = W_hh^T h_{t-1} (rows r, z, n; b_hn added to n), feature-major."""
    dt = X.dtype
    T, B, I = X.shape
    H = W_hh.shape[0]
    H2, H3 = 2 * H, 3 * H
    WhT = _gates_t(W_hh, H, (0, 1, 2), (0.5, 0.5, 1))                  # (3H, H), rows r, z, n
    P = np.matmul(X.reshape(T * B, I), _gates(W_ih, H, _GRU_IN, _GRU_IN_SCALE)).reshape(T, B, H3)
    bias, b_hn = _gru_bias(b_ih, b_hh, H, dt)
    if bias is not None:
        P += bias
    b_hn = None if b_hn is None else b_hn[:, None]
    PT = list(P.transpose(0, 2, 1))     # step t's projection as a (3H, B) view (rows n, r, z)
    Gt = np.empty((T, H3, B), dt)
    HW = np.empty((T, H3, B), dt)
    Hs = np.empty((T + 1, H, B), dt)
    Hs[0] = _h0(h0, B, H, dt).T
    tmp = np.empty((H, B), dt)
    Hl, Gl, HWl = list(Hs), list(Gt), list(HW)
    mul = np.multiply
    yield  # the recurrent loop starts: run_phased may run it beside another kernel's loop
    for t in range(T):
        hw, g, p = HWl[t], Gl[t], PT[t]
        np.matmul(WhT, Hl[t], out=hw)
        hn = hw[H2:]
        if b_hn is not None:
            hn += b_hn
        rz = g[H:]
        np.add(p[H:], hw[:H2], out=rz)
        np.tanh(rz, out=rz)
        rz *= 0.5
        rz += 0.5
        n = g[:H]
        mul(g[H:H2], hn, out=tmp)
        np.add(p[:H], tmp, out=n)
        np.tanh(n, out=n)
        # h' = n + z * (h - n)
        np.subtract(Hl[t], n, out=tmp)
        tmp *= g[H2:]
        np.add(n, tmp, out=Hl[t + 1])
    yield  # the recurrent loop is done
    Hb = np.empty((T + 1, B, H), dt)
    Hb[...] = Hs.transpose(0, 2, 1)
    saved = _FeatureMajor((X, W_ih, W_hh, Hb, Gt, HW, b_ih is not None, b_hh is not None))
    return Hb[1:], Hb[T].copy(), saved


def _gru_backward_fm(dY, dh_n, saved, grad_sq):
    """gru_backward for _gru_forward_fm: the same factors and recurrence on (features, batch) arrays,
    D (T, 4H, B) with rows [da_n | da_r | da_z | d(h W_hn + b_hn)]; the gate gradients are turned
    batch-major once, after the loop, for the weight-gradient GEMMs."""
    X, W_ih, W_hh, Hb, Gt, HW, has_bi, has_bh = saved
    dt = X.dtype
    T, B, I = X.shape
    H = W_hh.shape[0]
    H2, H4 = 2 * H, 4 * H
    gs = _grad_sq(grad_sq, T, B)
    dYf, (dh,) = _feature_major_upstream(dY, (dh_n,), H, B, dt)
    D = np.empty((T, H4, B), dt)
    D4 = D.reshape(T, 4, H, B)
    Dh = D[:, H:]                                    # hidden side, rows (r, z, n)
    Z = Gt[:, H2:]
    tmp = np.empty((H, B), dt)
    yield  # the recurrent loop starts: run_phased may run it beside another kernel's loop
    for lo, hi in _blocks(T, B * H4 * dt.itemsize):
        _gru_factors(Gt[lo:hi], HW[lo:hi, H2:], D[lo:hi], Hb[lo:hi].transpose(0, 2, 1), H, 1)
        for t in range(hi - 1, lo - 1, -1):
            if t < T - 1:
                # dh_t = dY[t] + z_{t+1} dh_{t+1} + W_hh @ D[t+1][H:]
                dh *= Z[t + 1]
                np.matmul(W_hh, Dh[t + 1], out=tmp)
                dh += tmp
            if dYf is not None:
                dh += dYf[t]
            if gs is not None:
                gs[t] = np.einsum("ij,ij->j", dh, dh)
            D4[t] *= dh
    yield  # the recurrent loop is done
    dh0 = Dh[0].T @ W_hh.T
    dh *= Z[0]
    dh0 += dh.T
    dG = np.empty((T, B, H4), dt)
    dG[...] = D.transpose(0, 2, 1)
    dX, dW_ih, dW_hh, db_ih, db_hh = _gru_weight_grads(dG.reshape(T * B, H4), X, W_ih, Hb[:T], has_bi, has_bh)
    return dX, dh0, dW_ih, dW_hh, db_ih, db_hh


def _gru_steps(G, HWl, Hs, blocks, b_hn, lo, bt, tmp, write_h):
    """Steps lo, ..., lo+len(G)-1 of gru_forward's loop, with exactly its operations, on the first
    bt[t] rows of each step (all when bt is None). G (n, B, 3H): input-side pre-activations
    (n, r, z), activated in place; HWl: n arrays (B, 3H) receiving h_{t-1} W_hh (+ b_hn), possibly
    all one array. Reads h_{t-1} from Hs[t]; writes Hs[t+1] when write_h. blocks: the gate-scaled
    W_hh as _column_blocks."""
    H = blocks[0][0].shape[0]
    H2 = 2 * H
    B = G.shape[1]
    mul = np.multiply
    for j in range(G.shape[0]):
        t = lo + j
        b = B if bt is None else bt[t]
        hw = HWl[j][:b]
        for w, cols in blocks:
            np.matmul(Hs[t, :b], w, out=hw[:, cols])
        hn = hw[:, H2:]
        if b_hn is not None:
            hn += b_hn
        g = G[j, :b]
        rz = g[:, H:]
        rz += hw[:, :H2]
        np.tanh(rz, out=rz)
        rz *= 0.5
        rz += 0.5
        n = g[:, :H]
        tb = tmp[:b]
        mul(g[:, H:H2], hn, out=tb)
        n += tb
        np.tanh(n, out=n)
        if write_h:
            np.subtract(Hs[t, :b], n, out=tb)
            tb *= g[:, H2:]
            np.add(n, tb, out=Hs[t + 1, :b])


def _gru_forward_general(X, h0, W_ih, W_hh, b_ih, b_hh, bt, lens, k):
    """gru_forward with lengths (bt, lens) and/or recompute_every (k)."""
    dt = X.dtype
    T, B, I = X.shape
    H = W_hh.shape[0]
    H3 = 3 * H
    Wi = _gates(W_ih, H, _GRU_IN, _GRU_IN_SCALE)
    blocks = _column_blocks(_gates(W_hh, H, (0, 1, 2), (0.5, 0.5, 1)), B)
    bias, b_hn = _gru_bias(b_ih, b_hh, H, dt)
    X2 = X.reshape(T * B, I)
    alloc = np.empty if bt is None else np.zeros     # padded rows stay zero
    Hs = alloc((T + 1, B, H), dt)
    Hs[0] = _h0(h0, B, H, dt)
    tmp = np.empty((B, H), dt)
    has = (b_ih is not None, b_hh is not None)
    pack = _packs(bt, B, I, H, H3)
    if k is None or _RECOMPUTE_EXACT:
        Gt = np.empty((T, B, H3), dt)
        _project_into(X2, Wi, bias, Gt.reshape(T * B, H3), bt, B, _packed_input(X2, bt, B, pack))
    if k is None:
        HW = alloc((T, B, H3), dt)
        yield  # the recurrent loop starts: run_phased may run it beside another kernel's loop
        _gru_steps(Gt, list(HW), Hs, blocks, b_hn, 0, bt, tmp, True)
        yield  # the recurrent loop is done
        saved = (X, W_ih, W_hh, Hs, Gt, HW) + has + ({"bt": bt, "pack": pack},)
        return Hs[1:], _finals(Hs, lens), saved
    exact = _RECOMPUTE_EXACT
    hw = np.empty((B, H3), dt)
    if not exact:
        Gs = np.empty((min(k, T), B, H3), dt)
    for lo, hi in _segments(T, k):
        if exact:
            G = Gt[lo:hi]
        else:
            G = Gs[:hi - lo]
            _project(X2[lo * B:hi * B], Wi, bias, out=G.reshape(-1, H3))
        _gru_steps(G, [hw] * (hi - lo), Hs, blocks, b_hn, lo, bt, tmp, True)
    ext = {"bt": bt, "pack": pack and exact, "k": k, "exact": exact, "bias": bias, "b_hn": b_hn}
    saved = (X, W_ih, W_hh, Hs, None, None) + has + (ext,)
    return Hs[1:], _finals(Hs, lens), saved


def _gru_backward_general(dY, dh_n, saved, grad_sq):
    """gru_backward with lengths, recompute and/or grad_sq: gru_backward's operations on the
    active rows of each step, segment by segment (recompute) or over the whole sequence."""
    X, W_ih, W_hh, Hs, Gt, HW, has_bi, has_bh, *ext = saved
    ext = ext[0] if ext else {}
    dt = X.dtype
    T, B, I = X.shape
    H = W_hh.shape[0]
    H2, H3, H4 = 2 * H, 3 * H, 4 * H
    bt = ext.get("bt") or [B] * T
    k = ext.get("k")
    exact = k is None or ext["exact"]
    gs = _grad_sq(grad_sq, T, B)
    dY = _arr(dY, dt)
    dh_n = _arr(dh_n, dt)
    small = W_hh.size <= _WT_COPY_MAX
    if small:
        blocks = _column_blocks(_transpose(W_hh), B)   # W_hh^T (3H, H), torch row order (r, z, n)
    else:
        gT = np.empty((H, B), dt)
    X2 = X.reshape(T * B, I)
    dh = np.zeros((B, H), dt) if dh_n is None else dh_n.copy()
    tmp = np.empty((B, H), dt)
    mul = np.multiply
    row_bytes = B * H4 * dt.itemsize
    D = np.empty((T, B, H4), dt) if exact else None   # [da_n | da_r | da_z | d(h W_hn + b_hn)]
    pack = ext.get("pack", False)                      # else padded rows of D are zeroed
    Xg = _packed_input(X2, bt, B, pack)
    if k is None:
        segs = [(0, T)]
    else:
        segs = _segments(T, k)
        n0 = min(k, T)
        bias, b_hn = ext["bias"], ext["b_hn"]
        Wi = _gates(W_ih, H, _GRU_IN, _GRU_IN_SCALE)
        fwd_blocks = _column_blocks(_gates(W_hh, H, (0, 1, 2), (0.5, 0.5, 1)), B)
        # two gate buffers: step t reads z_{t+1}, which may sit in the later segment's buffer
        Gpp = (np.zeros((n0, B, H3), dt), np.zeros((n0, B, H3), dt))
        HWg = np.zeros((n0, B, H3), dt)
        if exact:
            # the forward's projection GEMM again, into the input-side columns of D
            _project_into(X2, Wi, None, D.reshape(T * B, H4)[:, :H3], bt, B, Xg)
        else:
            Dpp = (np.empty((n0, B, H4), dt), np.empty((n0, B, H4), dt))
            dX = np.empty((T, B, I), dt)
            Wi_in = _gates(W_ih, H, _GRU_IN)
            dW_in = np.zeros((I, H3), dt)              # input side, order (n, r, z)
            dW_hh = np.zeros((H, H3), dt)
            S = np.zeros(H4, dt) if (has_bi or has_bh) else None
    znext = Dnext = None                               # z and D of step t + 1
    if k is None:
        yield  # the recurrent loop starts: run_phased may run it beside another kernel's loop
    for si in range(len(segs) - 1, -1, -1):
        slo, shi = segs[si]
        n = shi - slo
        # arrays of this segment, indexed by j = t - slo
        if k is None:
            G, HWa, Dl = Gt, HW, D
        else:
            G = Gpp[si % 2][:n]
            if exact:
                Dl = D[slo:shi]
                if bias is not None:
                    np.add(Dl[:, :, :H3], bias, out=G)
                else:
                    G[...] = Dl[:, :, :H3]
            else:
                Dl = Dpp[si % 2][:n]
                _project(X2[slo * B:shi * B], Wi, bias, out=G.reshape(n * B, H3))
            HWa = HWg[:n]
            _gru_steps(G, list(HWa), Hs, fwd_blocks, b_hn, slo, bt, tmp, False)
        D4 = Dl.reshape(n, B, 4, H)
        for lo, hi in _blocks(n, row_bytes):
            # ---- recurrence-independent factors (as gru_backward), rows active in the block ----
            bm = bt[slo + lo]
            _gru_factors(G[lo:hi, :bm], HWa[lo:hi, :bm, H2:], Dl[lo:hi, :bm], Hs[slo + lo:slo + hi, :bm], H, 2)
            # ---- the recurrence over this block ----
            for j in range(hi - 1, lo - 1, -1):
                t = slo + j
                b = bt[t]
                b1 = bt[t + 1] if t + 1 < T else 0
                if b1:
                    # dh_t = dY[t] + z_{t+1} dh_{t+1} + D[t+1][:, H:] @ W_hh^T
                    d1 = dh[:b1]
                    d1 *= znext[:b1]
                    if small:
                        tb = tmp[:b1]
                        for w, cols in blocks:
                            np.matmul(Dnext[:b1, H:], w, out=tb[:, cols])
                        d1 += tb
                    else:
                        gt = gT[:, :b1]
                        np.matmul(W_hh, Dnext[:b1, H:].T, out=gt)
                        d1 += gt.T
                dhb = dh[:b]
                if dY is not None:
                    dhb += dY[t, :b]
                if gs is not None:
                    gs[t, :b] = np.einsum("ij,ij->i", dhb, dhb)
                d4 = D4[j, :b]
                mul(d4, dhb[:, None, :], out=d4)
                if b < B:
                    if not pack:
                        D4[j, b:] = 0
                    if gs is not None:
                        gs[t, b:] = 0
                znext = G[j, :, H2:]
                Dnext = Dl[j]
        if not exact:
            Df = Dl.reshape(n * B, H4)
            rows = slice(slo * B, shi * B)
            Din = Df[:, :H3]
            np.matmul(Din, Wi_in.T, out=dX.reshape(T * B, I)[rows])
            dW_in += X2[rows].T @ Din
            dW_hh += Hs[slo:shi].reshape(n * B, H).T @ Df[:, H:]
            if S is not None:
                S += _col_sum(Df)
    if k is None:
        yield  # the recurrent loop is done
    dh0 = Dnext[:, H:] @ W_hh.T
    dh *= znext
    dh0 += dh
    if exact:
        Df, Xg, Hg = _grad_rows(D.reshape(T * B, H4), X2, Hs, bt, B, pack, Xg)
        Din = Df[:, :H3]
        dX = _input_grad(Din, _gates(W_ih, H, _GRU_IN).T, T, B, bt, pack)
        dW_ih = _gates(Xg.T @ Din, H, _GRU_IN_BACK)
        dW_hh = Hg.T @ Df[:, H:]
        S = _col_sum(Df) if (has_bi or has_bh) else None
    else:
        dW_ih = _gates(dW_in, H, _GRU_IN_BACK)
    if S is not None:
        db_ih = _gates(S[:H3], H, _GRU_IN_BACK) if has_bi else None
        db_hh = S[H:].copy() if has_bh else None
    else:
        db_ih = db_hh = None
    return dX, dh0, dW_ih, dW_hh, db_ih, db_hh


# ----------------------------------------------------------------------------------------
# The plain kernels: each phased kernel run straight through
# ----------------------------------------------------------------------------------------

def _plain(phases):
    """The kernel that runs the generator `phases` to its end and returns what it returns."""
    @functools.wraps(phases)
    def kernel(*args, **kwargs):
        run = phases(*args, **kwargs)
        while True:
            try:
                next(run)
            except StopIteration as done:
                return done.value
    kernel.__name__ = kernel.__qualname__ = phases.__name__[:-len("_phases")]
    return kernel


rnn_forward = _plain(rnn_forward_phases)
rnn_backward = _plain(rnn_backward_phases)
lstm_forward = _plain(lstm_forward_phases)
lstm_backward = _plain(lstm_backward_phases)
gru_forward = _plain(gru_forward_phases)
gru_backward = _plain(gru_backward_phases)
