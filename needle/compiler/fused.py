"""Run a compiled cell: one op per layer over the whole sequence, with the derived BPTT as its gradient.

`compile_cell(cell, in_features)` traces the cell, derives the backward, renders both, and loads the
kernels (cached in memory and on disk). `CompiledLayer` is the autograd op of one layer:

    compute(X (T, B, F), *states (B, H), *matrices, *vectors) -> (Y (T, B, H), *final_states)

What the forward keeps for backward, per step: every state (T + 1 of each, also the output), the hoisted
products X @ M, and the forward values the derived backward reads that are not among those (for an LSTM the
four gate activations and tanh(c'); for a GRU r, z, n and the recurrent product), plus the operand of each
per-step product that is not a state. With `lengths` (sorted longest first), step t runs only the nb[t]
sequences still going; finished ones keep zeros in Y and their final state is read at their own last step.
With `recompute_every` k, the forward runs in pieces of k steps and keeps only Y and each piece's initial
states; the backward runs each piece's forward again, from the last piece, just before its backward (memory
O(T/k + k) steps of states and saved values instead of O(T); each weight gradient a sum of one GEMM a piece,
so results equal the whole-sequence run to rounding).
"""
import os
import time

import numpy as np

from ..autograd import Tensor, TensorTupleOp
from ..backend_ndarray.ndarray import NDArray
from .blas import gemm
from .cache import load_source
from .codegen_numba import render
from .derive import derive
from .trace import _get, trace_cell

__all__ = ["CompiledCell", "CompiledLayer", "compile_cell"]

_COMPILED = {}


class CompiledCell:
    """A traced cell's kernels and what the runtime needs to call them."""

    def __init__(self, trace):
        self.trace = trace
        self.backward_graph = derive(trace.graph)
        self.source, self.plan, dims = render(trace.graph, self.backward_graph, trace.num_states,
                                              trace.hidden_size)
        self.dims = np.array(dims, dtype=np.int64)
        self.module = load_source(self.source)
        self.thread_choices = {}   # (kernel, batch, dtype) -> _ThreadChoice

    @property
    def path(self):
        """The generated source file (readable)."""
        return self.module.path

    def parameters(self, cell):
        """The kernel's matrices and vectors (Tensors) from the cell's current tensors, via the prelude."""
        values = [_get(cell, path) for path in self.trace.paths]
        needed = _needed_steps(self.trace)
        for k, (op, slots) in enumerate(self.trace.prelude):
            values.append(op(*[values[s] for s in slots]) if k in needed else None)
        matrices = [values[s] for s in self.trace.matrices]
        vectors = []
        for s in self.trace.vectors:
            v = values[s]
            vectors.append(v if len(v.shape) == 1 else v.reshape((int(np.prod(v.shape)),)))
        return matrices + vectors

    def kernels(self, dtype):
        suffix = "f32" if np.dtype(dtype) == np.float32 else "f64"
        return getattr(self.module, "forward_" + suffix), getattr(self.module, "backward_" + suffix)


def _needed_steps(trace):
    """Indices of the prelude steps that the kernel's matrices and vectors depend on."""
    if getattr(trace, "needed", None) is None:
        first, needed = len(trace.paths), set()
        stack = [s for s in trace.matrices + trace.vectors if s >= first]
        while stack:
            k = stack.pop() - first
            if k not in needed:
                needed.add(k)
                stack.extend(s for s in trace.prelude[k][1] if s >= first)
        trace.needed = needed
    return trace.needed


def compile_cell(cell, in_features):
    """The CompiledCell of `cell` for inputs of `in_features` (traced now; kernels shared by structure)."""
    trace = trace_cell(cell, in_features)
    key = (trace.graph.text(), trace.num_states, trace.hidden_size)
    if key not in _COMPILED:
        _COMPILED[key] = CompiledCell(trace)
    compiled = _COMPILED[key]
    if compiled.trace is not trace:
        compiled = _Retargeted(compiled, trace)
    return compiled


class _Retargeted:
    """The same kernels, with the paths and prelude of another trace of an identical step graph."""

    def __init__(self, compiled, trace):
        self.__dict__.update(compiled.__dict__)
        self.trace = trace

    parameters = CompiledCell.parameters
    kernels = CompiledCell.kernels
    path = CompiledCell.path


# How many BLAS threads a step's GEMMs get. The products are small and sit between compiled elementwise
# loops, so a second OpenBLAS thread has to be woken for each one: on a quiet 2-core machine two threads beat
# one by up to 25% (LSTM at hidden 650, 35 steps, batch 20: 198 ms against 260 a training step), but while
# another process keeps a core busy each product waits for its second thread to be scheduled, and two
# threads lost (the same step 743 ms against 503; MGU at hidden 650, 1.9 s against 0.15). No fixed rule
# fits both, so the runtime measures: per kernel (forward, backward) and batch size it times its first
# calls on one thread and on all, runs the faster, and tries the other again after _RETRY calls (twice as
# long after each retry that changes nothing, up to _RETRY_MAX; at once when the one it runs gets slower than
# the other was), so that it follows the machine's load at little cost. Threads change no result. Steps
# below _ONE_THREAD_BELOW multiply-adds (tiny cells) always run on one thread, NEEDLE_STEP_GEMM_ONE_THREAD
# sets that bound (0: always measure; a huge value: always one thread); below _BLAS_ALONE_BELOW OpenBLAS
# itself runs a product on one thread (measured: (32, 64) @ (64, 128) 5.2 us either way, (20, 128) @
# (128, 512) 25 us on two threads, 34 on one), so nothing is set there; products from _ALL_THREADS_FROM on
# (hidden 1024 at batch 64: 268M) always run on all, where the probing calls on one thread cost more than
# any wake-up (a layer-normalised LSTM there: 2.98 s a step with probing in a short run, 2.51 s without).
_ONE_THREAD_BELOW = int(os.environ.get("NEEDLE_STEP_GEMM_ONE_THREAD", 2 ** 18))
_BLAS_ALONE_BELOW = 2 ** 18
_ALL_THREADS_FROM = 64 * 2 ** 20
_RETRY, _RETRY_MAX = 16, 128


class _ThreadChoice:
    """One kernel's measured choice between one BLAS thread (1) and all of them (0)."""

    def __init__(self):
        self.seconds = {1: [], 0: []}   # choice -> its latest two timings (seconds a step)
        self.best, self.retry, self.countdown = None, _RETRY, 0

    def pick(self):
        if self.best is None:
            one, all_ = len(self.seconds[1]), len(self.seconds[0])
            if min(one, all_) < 2:
                return 1 if one <= all_ else 0            # 1, 0, 1, 0 first
            self.best = min((1, 0), key=self._mean)
            self.countdown = self.retry
        self.countdown -= 1
        return 1 - self.best if self.countdown <= 0 else self.best

    def record(self, choice, seconds):
        if self.best is None or choice == self.best:
            self.seconds[choice] = (self.seconds[choice] + [seconds])[-2:]
            if self.best is not None and self._mean(choice) > self._mean(1 - choice):
                self.countdown = 0                         # now slower than the other was: retry it next
            return
        # a retry of the other choice: switch if it now wins, else wait twice as long before the next
        if seconds < self._mean(self.best):
            self.best, self.retry, self.seconds[choice] = choice, _RETRY, [seconds]
        else:
            self.retry = min(2 * self.retry, _RETRY_MAX)
        self.countdown = self.retry

    def _mean(self, choice):
        return sum(self.seconds[choice]) / len(self.seconds[choice])


class _step_threads:
    """Runs a kernel call on the BLAS threads its _ThreadChoice picks, and times it for that choice."""

    def __init__(self, compiled, which, M, B, T, side_by_side=False):
        # a step's biggest product: the per-step ones only (the hoisted input products run outside the loop)
        work = B * max((M[k].shape[0] * M[k].shape[1] for k in compiled.plan.mm_matrix), default=0)
        self.blas, self.choice, self.record, self.steps = None, 1, None, max(T, 1)
        if work >= max(_ALL_THREADS_FROM, _ONE_THREAD_BELOW):
            self.choice = 0
        if side_by_side or work < min(_BLAS_ALONE_BELOW, _ONE_THREAD_BELOW):
            # beside another loop (run_phased) the BLAS threads are run_phased's to set; below the bound one
            # thread without asking: no limit to set and restore (5 us a call)
            return
        from ..backend_ndarray.parallel_numpy import _blas, num_threads
        self.blas = _blas()
        if self.choice == 1 and self.blas and num_threads() > 1 and work >= _ONE_THREAD_BELOW:
            chooser = compiled.thread_choices.setdefault((which, B, M[0].dtype.char if M else ""),
                                                         _ThreadChoice())
            self.choice, self.record = chooser.pick(), chooser.record

    def __enter__(self):
        self.limit = self.blas.limit(limits=1) if self.blas and self.choice == 1 else None
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        seconds = time.perf_counter() - self.start
        if self.limit is not None:
            self.limit.restore_original_limits()
        if self.record is not None and exc[0] is None:
            self.record(self.choice, seconds / self.steps)
        return False


def _c(a, dtype):
    return np.ascontiguousarray(a, dtype=dtype)


# a stand-in for the matrices the backward kernel does not read (a tuple of arrays must hold one type)
_UNUSED = {"f": np.zeros((1, 1), np.float32), "d": np.zeros((1, 1), np.float64)}
_SLAB_FROM = 1 << 20


def _transposed(m):
    """A contiguous copy of m.T; from _SLAB_FROM elements on copied 16 rows at a time, which is up to 2.4x
    faster than numpy's transposing copy there ((1024, 4096): 6.3 ms against 15.1; it loses on small ones)."""
    if m.size < _SLAB_FROM:
        return np.ascontiguousarray(m.T)
    rows, cols = m.shape
    out = np.empty((cols, rows), m.dtype)
    for i in range(0, rows, 16):
        out[:, i:i + 16] = m[i:i + 16].T
    return out


# With lengths, the GEMMs before and after the loop run over the active (step, sequence) rows only, gathered
# (and scattered back) by index, where the padded rows would cost at least this many multiply-adds; below it
# the copies cost more than they save and the GEMMs run over all T*B rows (the padded ones are zeros).
_PACK_MIN_MACS = 1 << 20


def _active_rows(nbs, B, macs_per_row):
    """Indices into the (T*B) rows of the steps' active sequences (the first nbs[t] at step t), or None
    where every row is active or packing would not pay (_PACK_MIN_MACS)."""
    T = len(nbs)
    padded = T * B - int(nbs.sum())
    if padded == 0 or padded * macs_per_row < _PACK_MIN_MACS:
        return None
    batch = np.arange(B)
    return (np.arange(T)[:, None] * B + batch)[batch < nbs[:, None]]


def _drain(phases):
    """Run a generator of phases (see CompiledLayer.forward_arrays) to its end; its return value."""
    while True:
        try:
            next(phases)
        except StopIteration as done:
            return done.value


class CompiledLayer(TensorTupleOp):
    """One layer of a compiled cell over a whole sequence; see the module docstring. Beside compute and
    gradient it offers forward_arrays and backward_arrays, in phases, so that ops.BidirectionalLayer runs
    two of them with their loops side by side. `name` (default "Recurrent") is the module's, for errors."""
    name = "Recurrent"

    def __init__(self, compiled, lengths=None, recompute_every=None, record=None, name=None):
        self.compiled, self.lengths, self.every, self.record = compiled, lengths, recompute_every, record
        if name is not None:
            self.name = name   # the module's, for errors and detect_anomaly (LSTM rather than Recurrent)
        self.n_states = compiled.trace.num_states
        H = compiled.trace.hidden_size
        self.gates = max(1, sum(compiled.plan.widths[i] for i in compiled.plan.mm) // H)   # a step's work / H
        self.saved = None

    def _run_forward(self, x, states, M, P, nbs, side_by_side=False):
        """The forward kernel over x (T, B, F) from `states`: (S, XW, SV), every state of every step, the
        hoisted products and the saved values."""
        c = self.compiled
        plan, dtype = c.plan, x.dtype
        T, B, _ = x.shape
        H = c.trace.hidden_size
        S = tuple(np.zeros((T + 1, B, H), dtype) for _ in states)
        for k, state in enumerate(states):
            S[k][0] = state
        widths = plan.widths
        XW = tuple(np.empty((T, B, widths[i]), dtype) for i in plan.xw)
        make = np.zeros if self.lengths is not None else np.empty
        SV = tuple(make((T, B, widths[i]), dtype) for i in plan.saved)
        x2 = x.reshape(T * B, -1)
        rows = _active_rows(nbs, B, x.shape[2] * sum(widths[i] for i in plan.xw))
        for q, i in enumerate(plan.xw):   # the hoisted products: one GEMM over all steps each
            if rows is None:
                np.dot(x2, M[plan.xw_matrix[q]], XW[q].reshape(T * B, -1))
            else:                         # the active rows only (the kernel reads no others)
                XW[q].reshape(T * B, -1)[rows] = x2[rows] @ M[plan.xw_matrix[q]]
        forward, _ = c.kernels(dtype)
        with _step_threads(c, "forward", M, B, T, side_by_side):
            forward(x, S, XW, SV, M, P, nbs, c.dims, gemm(dtype))
        return S, XW, SV

    def _segments(self, T):
        """[(t0, t1)]: the whole sequence, or pieces of recompute_every steps."""
        every = self.every if self.every is not None and self.every < T else T
        return [(t0, min(t0 + every, T)) for t0 in range(0, T, every)]

    def compute(self, X, *args):
        return tuple(NDArray.from_xp(a, X.device) for a in self.forward_arrays(X.device, X.x, args))

    def gradient(self, out_grad, node):
        device = node.inputs[0].device
        grads = self.backward_arrays(device, [g.x for g in out_grad.cached_data])
        return tuple(Tensor.make_const(NDArray.from_xp(g, device)) for g in grads)

    def forward_arrays(self, device, X, args, phased=False):
        """(Y, *final_states) as numpy arrays for X (T, B, F) and args (the NDArrays of the states, matrices and
        vectors); keeps what backward needs. phased: a generator instead that yields just before and just after
        the loops and returns them (for run_phased)."""
        phases = self._forward_phases(X, args, phased)
        return phases if phased else _drain(phases)

    def _forward_phases(self, X, args, side_by_side):
        c = self.compiled
        n = self.n_states
        dtype = X.dtype
        x = _c(X, dtype)
        T, B, _ = x.shape
        states = [_c(a.x, dtype) for a in args[:n]]
        n_mat = len(c.trace.matrices)
        M = tuple(_c(a.x, dtype) for a in args[n:n + n_mat])
        P = tuple(_c(a.x, dtype) for a in args[n + n_mat:])
        if self.lengths is None:
            nbs = np.full(T, B, dtype=np.int64)
        else:
            nbs = (self.lengths[None, :] > np.arange(T)[:, None]).sum(axis=1).astype(np.int64)
        segments = self._segments(T)
        rows = np.arange(B)
        yield
        if len(segments) == 1:
            S, XW, SV = self._run_forward(x, states, M, P, nbs, side_by_side)
            self.saved = (x, S, XW, SV, M, P, nbs)
            Y = S[0][1:]
            finals = [S[k][T] for k in range(n)] if self.lengths is None else \
                [S[k][self.lengths, rows] for k in range(n)]
        else:
            # recompute_every: keep each piece's initial states only; backward runs the piece again
            Y = (np.zeros if self.lengths is not None else np.empty)((T, B, c.trace.hidden_size), dtype)
            starts, finals = [], [np.zeros_like(s) for s in states]
            for t0, t1 in segments:
                starts.append(states if t0 else [a.copy() for a in states])
                S, _, _ = self._run_forward(x[t0:t1], states, M, P, nbs[t0:t1], side_by_side)
                Y[t0:t1] = S[0][1:]
                states = [S[k][t1 - t0].copy() for k in range(n)]
                if self.lengths is not None:   # sequences that end in this piece: their final states
                    ending = rows[(self.lengths > t0) & (self.lengths <= t1)]
                    for k in range(n):
                        finals[k][ending] = S[k][self.lengths[ending] - t0, ending]
            if self.lengths is None:
                finals = states
            self.saved = (x, starts, M, P, nbs)
        yield
        return (Y, *finals)

    @staticmethod
    def _operand(where, x2, S, SV, T):
        """The (T*B, K) rows of a per-step product's operand over all steps."""
        if where[0] == "x":
            return x2
        if where[0] == "state":
            _, k, first = where
            return S[k][first:first + T].reshape(x2.shape[0], -1)
        return SV[where[1]].reshape(x2.shape[0], -1)

    def backward_arrays(self, device, upstream, phased=False):
        """(dX, *initial state gradients, *matrix gradients, *vector gradients) as numpy arrays for the
        upstream gradients (dY, *final_state_gradients); phased as in forward_arrays."""
        phases = self._backward_phases(upstream, phased)
        return phases if phased else _drain(phases)

    def _backward_phases(self, upstream, side_by_side):
        x, M, P, nbs = self.saved[0], self.saved[-3], self.saved[-2], self.saved[-1]
        dtype = x.dtype
        per_step = set(self.compiled.plan.mm_matrix)
        T, B, F = x.shape
        dY = _c(upstream[0], dtype)
        C = tuple(np.array(g, dtype=dtype, order="C") for g in upstream[1:])
        dP = tuple(np.zeros_like(p) for p in P)
        # the per-step products' matrices transposed (a step's GEMM runs up to 1.6x faster on a contiguous copy
        # than on a transposed view); the hoisted ones are only read by the GEMMs after the loop, as views
        MT = tuple(_transposed(m) if k in per_step else _UNUSED[dtype.char] for k, m in enumerate(M))
        dM = [None] * len(M)
        GF = np.zeros((T if self.record is not None else 0, B))   # squared norms of dL/dh_t, if recorded
        segments = self._segments(T)
        yield
        if len(segments) == 1:
            dX, dS0 = self._backward_piece(x, self.saved[1:4], M, MT, P, nbs, dY, C, dP, dM, GF, side_by_side)
        else:   # piece by piece from the last: run its forward again from its kept states, then its backward
            dX = np.empty((T, B, F), dtype)
            for (t0, t1), states in zip(reversed(segments), reversed(self.saved[1])):
                piece = self._run_forward(x[t0:t1], states, M, P, nbs[t0:t1], side_by_side)
                dX[t0:t1], C = self._backward_piece(x[t0:t1], piece, M, MT, P, nbs[t0:t1], dY[t0:t1], C, dP, dM,
                                                    GF[t0:t1], side_by_side)
            dS0 = C
        yield
        self.saved = None
        if self.record is not None:
            self.record(GF)
        dM = [np.zeros_like(m) if g is None else g for m, g in zip(M, dM)]
        return (dX, *dS0, *dM, *dP)

    def _backward_piece(self, x, forward_values, M, MT, P, nbs, dY, C, dP, dM, GF, side_by_side):
        """The backward kernel over x's steps, given the state gradients C after them: (dX, the state
        gradients before them); dP and dM (None or arrays) gather the parameters' gradients, GF (steps, B)
        the squared norms of dL/dh_t (or nothing, with no rows)."""
        c = self.compiled
        plan = c.plan
        S, XW, SV = forward_values
        dtype = x.dtype
        T, B, F = x.shape
        Cn = tuple(np.empty_like(a) for a in C)
        widths = plan.widths
        # the kernel writes every row still going at each step; rows already finished must read as zeros
        def make(kind, q, shape):
            filled = self.lengths is None and (kind, q) in plan.written
            return (np.empty if filled else np.zeros)(shape, dtype)
        dXW = tuple(make("dxw", q, (T, B, widths[i])) for q, i in enumerate(plan.xw))
        DY = tuple(dXW[plan.dmm_alias[q]] if q in plan.dmm_alias else make("dmm", q, (T, B, widths[i]))
                   for q, i in enumerate(plan.mm))
        dXe = make("dx", 0, (T, B, F)) if plan.has_dx_direct else np.zeros((1, 1, 1), dtype)
        _, backward = c.kernels(dtype)
        with _step_threads(c, "backward", MT, B, T, side_by_side):
            dS0 = backward(x, S, XW, SV, MT, P, nbs, c.dims, dY, C, Cn, dXW, DY, dXe, dP, gemm(dtype), GF)
        # after the loop, every weight gradient and dX as one GEMM over all T*B rows (or the active ones)
        x2 = x.reshape(T * B, F)
        products = [(x2, dXW[q], plan.xw_matrix[q]) for q in range(len(plan.xw))]
        products += [(self._operand(where, x2, S, SV, T), DY[q], plan.mm_matrix[q])
                     for q, where in enumerate(plan.mm_operand)]
        rows = _active_rows(nbs, B, sum(o.shape[1] * g.shape[2] for o, g, _ in products)
                            + F * sum(g.shape[2] for g in dXW))
        pick = (lambda a: a) if rows is None else (lambda a: a[rows])
        for operand, grad, k in products:
            g = pick(operand).T @ pick(grad.reshape(T * B, -1))
            dM[k] = g if dM[k] is None else dM[k] + g
        dX = dXe.reshape(T * B, F) if plan.has_dx_direct else np.zeros((T * B, F), dtype)
        for q in range(len(plan.xw)):
            if rows is None:
                dX += dXW[q].reshape(T * B, -1) @ M[plan.xw_matrix[q]].T
            else:                 # padded rows of dX stay zero
                dX[rows] += dXW[q].reshape(T * B, -1)[rows] @ M[plan.xw_matrix[q]].T
        return dX.reshape(T, B, F), dS0
