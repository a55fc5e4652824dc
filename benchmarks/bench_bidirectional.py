"""A bidirectional layer's two loops side by side against one after the other, and both against unidirectional.

needle runs a fused bidirectional layer as one op whose two directions' recurrent loops run on two threads,
one BLAS thread each (needle/backend_ndarray/parallel_numpy.py, run_phased); the big GEMMs before and after
the loops keep every BLAS thread. This times one training step (forward, backward of output.sum()) of three
modules in one process, interleaved step by step: the unidirectional module ("uni"), the bidirectional one
with its loops one after the other ("bi seq", the side-by-side threshold set out of reach) and side by side
("bi side"). Printed: median ms of each and both bidirectional times over the unidirectional one. A 2-layer
bidirectional stack does 2.5 times the GEMM work of a unidirectional one (layer 2 reads 2 x hidden inputs).

    python benchmarks/bench_bidirectional.py
    python benchmarks/bench_bidirectional.py --kinds lstm --workloads medium --steps 20
"""
import argparse
import statistics
import time

import needle as ndl  # noqa: I001  first: sets OPENBLAS_THREAD_TIMEOUT before numpy loads OpenBLAS
import numpy as np
from needle.backend_ndarray import parallel_numpy

WORKLOADS = {  # seq_len, batch, input, hidden, layers (as bench_recurrent.py)
    "tiny": (13, 15, 11, 12, 2),
    "small": (35, 20, 200, 200, 2),
    "medium": (35, 20, 650, 650, 2),
}
STEPS = {"tiny": 200, "small": 30, "medium": 8}
MODULES = {"rnn": ndl.nn.RNN, "lstm": ndl.nn.LSTM, "gru": ndl.nn.GRU}


def training_step(kind, workload, bidirectional):
    seq_len, batch, input_size, hidden, layers = workload
    model = MODULES[kind](input_size, hidden, num_layers=layers, bidirectional=bidirectional)
    X = ndl.Tensor(np.random.randn(seq_len, batch, input_size).astype(np.float32), requires_grad=True)

    def step():
        for p in model.parameters():
            p.grad = None
        X.grad = None
        out, _ = model(X)
        out.sum().backward()
    return step


def timed(step, side_by_side_min):
    parallel_numpy._SIDE_BY_SIDE_MIN = side_by_side_min
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=list(MODULES), choices=list(MODULES))
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps per module (default: per workload)")
    args = parser.parse_args()
    np.random.seed(0)
    default_min = parallel_numpy._SIDE_BY_SIDE_MIN
    print(f"# needle threads {parallel_numpy.num_threads()}, side-by-side threshold {default_min} elements per step")
    print(f"{'kind':5} {'workload':8} {'uni ms':>8} {'bi seq ms':>10} {'bi side ms':>11} {'seq/uni':>8} "
          f"{'side/uni':>9}")
    for kind in args.kinds:
        for name in args.workloads:
            uni = training_step(kind, WORKLOADS[name], False)
            bi = training_step(kind, WORKLOADS[name], True)
            runs = [(uni, default_min), (bi, 1 << 62), (bi, 0)]
            times = [[] for _ in runs]
            for step, threshold in runs + runs:   # warm-up
                timed(step, threshold)
            for _ in range(args.steps or STEPS[name]):
                for k, (step, threshold) in enumerate(runs):
                    times[k].append(timed(step, threshold))
            parallel_numpy._SIDE_BY_SIDE_MIN = default_min
            ms = [1e3 * statistics.median(t) for t in times]
            print(f"{kind:5} {name:8} {ms[0]:8.2f} {ms[1]:10.2f} {ms[2]:11.2f} {ms[1] / ms[0]:8.2f} "
                  f"{ms[2] / ms[0]:9.2f}", flush=True)


if __name__ == "__main__":
    main()
