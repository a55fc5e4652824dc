"""The LSTM and GRU kernels feature-major against batch-major, on the same inputs, interleaved.

Batches of at most _FEATURE_MAJOR_MAX_BATCH sequences with at most _FEATURE_MAJOR_MAX_HIDDEN hidden units run
the plain LSTM and GRU kernels feature-major (needle/backend_ndarray/recurrent_numpy.py): a step's gates and
states are (features, batch) arrays and the recurrent GEMMs are weights @ states. This forces each layout in
turn and times one kernel training step (forward, then backward with
upstream gradients for Y, h_n and c_n) both ways in one process, step by step, and prints the median ms of
each, their ratio, and the largest difference of any output or gradient relative to its largest entry.
Workloads (seq_len, batch, input, hidden) are bench_recurrent.py's, plus "eval" (batch 10, the language
model benchmark's test batch), "wide" (batch 64) and "h1024" (batch 8, hidden 1024), where by default the
kernels stay batch-major, as on large.

    python benchmarks/bench_layouts.py
    python benchmarks/bench_layouts.py --kinds lstm --workloads small eval
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
LAYOUTS = {"feature-major": 1 << 30, "batch-major": 0}   # both size limits, for each


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


def with_layout(step, layout):
    kernels._FEATURE_MAJOR_MAX_BATCH = kernels._FEATURE_MAJOR_MAX_HIDDEN = LAYOUTS[layout]
    start = time.perf_counter()
    out = step()
    return time.perf_counter() - start, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=list(GATES), choices=list(GATES))
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    args = parser.parse_args()
    default = kernels._FEATURE_MAJOR_MAX_BATCH, kernels._FEATURE_MAJOR_MAX_HIDDEN
    print(f"# feature-major up to batch {default[0]} and hidden {default[1]}; both layouts forced below")
    print(f"{'kind':5} {'workload':8} {'feature-major ms':>17} {'batch-major ms':>15} {'fm/bm':>6} "
          f"{'max rel diff':>13}")
    for kind in args.kinds:
        for name in args.workloads:
            step = kernel_step(kind, WORKLOADS[name])
            outs = {layout: with_layout(step, layout)[1] for layout in LAYOUTS}
            diff = max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
                       for a, b in zip(outs["feature-major"], outs["batch-major"]) if a is not None)
            times = {layout: [] for layout in LAYOUTS}
            for _ in range(STEPS[name]):
                for layout in LAYOUTS:
                    times[layout].append(with_layout(step, layout)[0])
            fm, bm = (1e3 * statistics.median(times[layout]) for layout in LAYOUTS)
            print(f"{kind:5} {name:8} {fm:17.2f} {bm:15.2f} {fm / bm:6.2f} {diff:13.1e}", flush=True)
    kernels._FEATURE_MAJOR_MAX_BATCH, kernels._FEATURE_MAJOR_MAX_HIDDEN = default


if __name__ == "__main__":
    main()
