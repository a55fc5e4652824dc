"""The recurrent kernels' three step layouts, on the same inputs, interleaved.

A plain-path (no lengths, no recompute) LSTM or GRU step runs one of three ways
(needle/backend_ndarray/recurrent_numpy.py):
  * feature-major: gates and states are (features, batch) arrays, the step GEMMs are weights @ states;
  * batch-major, small-GEMM blocks: states are (batch, features) and the step GEMM is split into a few
    column blocks of the weights, each small enough for OpenBLAS's small-matrix kernel, which reads its
    operands in place instead of packing the weights on every call (_SMALL_GEMM_MACS);
  * batch-major, one GEMM per step.
This forces each in turn and times one kernel training step (forward, then backward with upstream
gradients for Y, h_n and c_n) step by step, and prints the median ms of each, the layout the defaults
pick for that size and BLAS thread count (n/a: blocks do not apply, the same as one GEMM), and the largest
difference of any output or gradient between the layouts relative to its largest entry. Workloads (seq_len,
batch, input, hidden) are bench_recurrent.py's, plus "eval" (batch 10, the language model benchmark's test
batch and each of two MPI ranks' share of its training batch), "wide" (batch 64) and "h1024" (batch 8,
hidden 1024). Run it with OPENBLAS_NUM_THREADS=1 as well: the best layout depends on the BLAS threads.

    python benchmarks/bench_layouts.py
    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_layouts.py --kinds lstm --workloads small eval
"""
import argparse
import statistics
import time

import needle  # noqa: F401, I001  first: sets OPENBLAS_THREAD_TIMEOUT before numpy loads OpenBLAS
import numpy as np
from needle.backend_ndarray import recurrent_numpy as kernels

WORKLOADS = {  # seq_len, batch, input, hidden
    "tiny": (13, 15, 11, 12),
    "small": (35, 20, 200, 200),
    "eval": (35, 10, 200, 200),
    "medium": (35, 20, 650, 650),
    "wide": (35, 64, 200, 200),
    "h1024": (35, 8, 1024, 1024),
    "large": (100, 64, 1024, 1024),
}
STEPS = {"tiny": 300, "small": 40, "eval": 40, "medium": 10, "wide": 20, "h1024": 5, "large": 3}
GATES = {"lstm": 4, "gru": 3}
# (feature-major size limits, small-GEMM blocks at most): each layout forced through the kernels' knobs
# (small-gemm with as many blocks as it takes)
LAYOUTS = {"feature-major": (1 << 30, 0), "small-gemm": (0, 1 << 30), "one-gemm": (0, 0)}


def kernel_step(kind, workload, seed=0):
    T, B, I, H = workload
    rng = np.random.default_rng(seed)
    s = 1 / np.sqrt(H)
    G = GATES[kind]
    X = rng.standard_normal((T, B, I)).astype(np.float32)
    h0, c0 = (rng.standard_normal((B, H)).astype(np.float32) for _ in range(2))
    W_ih = rng.uniform(-s, s, (I, G * H)).astype(np.float32)
    W_hh = rng.uniform(-s, s, (H, G * H)).astype(np.float32)
    b_ih, b_hh = (rng.uniform(-s, s, G * H).astype(np.float32) for _ in range(2))
    dY = rng.standard_normal((T, B, H)).astype(np.float32)
    dh_n, dc_n = (rng.standard_normal((B, H)).astype(np.float32) for _ in range(2))

    def step():
        if kind == "lstm":
            Y, h_n, c_n, saved = kernels.lstm_forward(X, h0, c0, W_ih, W_hh, b_ih, b_hh)
            return (Y, h_n, c_n) + tuple(kernels.lstm_backward(dY, dh_n, dc_n, saved))
        Y, h_n, saved = kernels.gru_forward(X, h0, W_ih, W_hh, b_ih, b_hh)
        return (Y, h_n) + tuple(kernels.gru_backward(dY, dh_n, saved))
    return step


def blas_threads():
    from threadpoolctl import threadpool_info

    return max((p["num_threads"] for p in threadpool_info() if p.get("internal_api") == "openblas"), default=0)


def set_knobs(fm_batch, fm_hidden, blocks):
    kernels._FEATURE_MAJOR_MAX_BATCH, kernels._FEATURE_MAJOR_MAX_HIDDEN = fm_batch, fm_hidden
    kernels._SMALL_GEMM_MAX_BLOCKS = blocks


def with_layout(step, layout):
    fm, blocks = LAYOUTS[layout]
    set_knobs(fm, fm, blocks)
    start = time.perf_counter()
    out = step()
    return time.perf_counter() - start, out


def default_layout(kind, B, H):
    """The layout the kernels' current settings give this size."""
    if kernels._feature_major(B, H, GATES[kind]):
        return "feature-major"
    return "one-gemm" if kernels._small_gemm_width(B, H, GATES[kind] * H) is None else "small-gemm"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=list(GATES), choices=list(GATES))
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    args = parser.parse_args()
    knobs = kernels._FEATURE_MAJOR_MAX_BATCH, kernels._FEATURE_MAJOR_MAX_HIDDEN, kernels._SMALL_GEMM_MAX_BLOCKS
    print(f"# {blas_threads()} BLAS thread(s); by default feature-major up to batch {knobs[0]} and hidden "
          f"{knobs[1]}, unless small-GEMM blocks apply (at most {knobs[2]} blocks of "
          f"{kernels._SMALL_GEMM_MACS:,} multiply-adds); each layout forced below (small-gemm: n/a where one "
          f"block is all it takes)")
    print(f"{'kind':5} {'workload':8} {'feature-major':>13} {'small-gemm':>11} {'one-gemm':>9} {'default':>14} "
          f"{'max rel diff':>13}")
    try:
        for kind in args.kinds:
            for name in args.workloads:
                step = kernel_step(kind, WORKLOADS[name])
                _, B, _, H = WORKLOADS[name]
                set_knobs(*knobs)
                default = default_layout(kind, B, H)
                set_knobs(0, 0, LAYOUTS["small-gemm"][1])
                blocked = kernels._small_gemm_width(B, H, GATES[kind] * H) is not None
                layouts = [x for x in LAYOUTS if blocked or x != "small-gemm"]
                outs = {layout: with_layout(step, layout)[1] for layout in layouts}
                diff = max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
                           for other in layouts[1:]
                           for a, b in zip(outs[layouts[0]], outs[other]) if a is not None)
                times = {layout: [] for layout in layouts}
                for _ in range(STEPS[name]):
                    for layout in layouts:
                        times[layout].append(with_layout(step, layout)[0])
                ms = {layout: f"{1e3 * statistics.median(times[layout]):.2f}" for layout in layouts}
                print(f"{kind:5} {name:8} {ms['feature-major']:>13} {ms.get('small-gemm', 'n/a'):>11} "
                      f"{ms['one-gemm']:>9} {default:>14} {diff:13.1e}", flush=True)
    finally:
        set_knobs(*knobs)


if __name__ == "__main__":
    main()
