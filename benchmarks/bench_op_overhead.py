"""What every op pays for the floating-point switch and the detect_anomaly flag, and what a small op costs.

autograd's make_from_op switches numpy's floating-point warnings off around each op's compute (a context
variable set and reset: needle/backend_ndarray/float_errors.py) and tests one flag for detect_anomaly. This
times those steps alone, np.errstate (the public way) beside them, and then whole small ops (a + b on 4 x 4
float32, recording a graph; a small forward and backward). Printed: the minimum over rounds of the mean per
call, in ns (us for the backward), with the machine and commit. Run it again with PYTHONPATH pointing at a
tree without the switch to compare whole ops; that tree lacks the first rows.

    python benchmarks/bench_op_overhead.py
    PYTHONPATH=/path/to/other/tree python benchmarks/bench_op_overhead.py --rounds 50
"""
import argparse
import platform
import subprocess
import timeit

import needle as ndl  # noqa: I001  first: sets OPENBLAS_THREAD_TIMEOUT before numpy loads OpenBLAS
import numpy as np


def per_call(fn, number, rounds):
    return min(timeit.repeat(fn, number=number, repeat=rounds)) / number


def building_blocks(rounds):
    """ns per call of each step alone, the empty function subtracted."""
    try:
        from needle import anomaly
        from needle.backend_ndarray.float_errors import QUIET, STATE
    except ImportError:
        return {}

    def empty():
        pass

    def flag():
        if anomaly.enabled:
            pass

    def switch():
        token = STATE.set(QUIET)
        try:
            pass
        finally:
            STATE.reset(token)

    def errstate():
        with np.errstate(all="ignore"):
            pass

    base = per_call(empty, 200_000, rounds)
    return {name: (per_call(fn, 200_000, rounds) - base) * 1e9
            for name, fn in (("detect_anomaly flag test", flag), ("float_errors switch (set + reset)", switch),
                             ("np.errstate(all='ignore') for comparison", errstate))}


def whole_ops(rounds):
    a = ndl.Tensor(np.ones((4, 4), np.float32), requires_grad=True)
    b = ndl.Tensor(np.ones((4, 4), np.float32))

    def add():
        return a + b

    def forward_backward():
        a.grad = None
        ndl.summation(ndl.tanh(a * b + a)).backward()

    return {"a + b, 4 x 4 (ns per op)": per_call(add, 20_000, rounds) * 1e9,
            "tanh(a * b + a).sum().backward() (us)": per_call(forward_backward, 2_000, rounds) * 1e6}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="repeats; the minimum is kept (default: 30)")
    args = parser.parse_args()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ndl.__path__[0]).stdout.strip()
    except OSError:
        commit = "?"
    machine = platform.processor() or platform.machine()
    print(f"needle {ndl.__path__[0]} @ {commit or '?'}, numpy {np.__version__}, {machine}")
    for name, value in {**building_blocks(args.rounds), **whole_ops(args.rounds)}.items():
        print(f"  {name:45s} {value:8.1f}")


if __name__ == "__main__":
    main()
