"""Memory-budgeted BPTT: one training step of an LSTM over a 10,000-step sequence, with and without
`recompute_every`.

Each configuration runs in its own process under an address-space limit (the budget, RLIMIT_AS), so a
configuration that needs more fails there with MemoryError. Printed per configuration: whether it fits,
the peak traced memory of numpy's allocations (tracemalloc, over forward and backward), resident-set
peak, and the time of the step.

    python benchmarks/bench_recompute.py [--steps 10000] [--batch 32] [--hidden 256] [--budget-gib 3]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(args):
    resource.setrlimit(resource.RLIMIT_AS, (int(args.budget_gib * 2 ** 30),) * 2)
    import numpy as np

    import needle as ndl

    k = None if args.k[0] == 0 else args.k[0]
    result = {"k": k}
    try:
        np.random.seed(0)
        lstm = ndl.nn.LSTM(args.hidden, args.hidden, recompute_every=k)
        X = ndl.Tensor(np.random.randn(args.steps, args.batch, args.hidden).astype(np.float32), requires_grad=True)
        tracemalloc.start()
        start = time.perf_counter()
        out, _ = lstm(X)
        out.sum().backward()
        result["seconds"] = time.perf_counter() - start
        result["traced_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2 ** 20
        result["fits"] = True
    except MemoryError:
        result["fits"] = False
    result["rss_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--budget-gib", type=float, default=3.0)
    parser.add_argument("--k", type=int, nargs="+", default=[0, 100], help="recompute_every values; 0 is None")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(f"# LSTM, {args.steps} steps, batch {args.batch}, input and hidden {args.hidden}; one step "
          f"(forward, backward of output.sum()); address-space budget {args.budget_gib} GiB per process")
    print(f"{'recompute_every':>15} {'fits':>5} {'traced peak MiB':>16} {'RSS peak MiB':>13} {'seconds':>8}")
    for k in args.k:
        command = [sys.executable, os.path.abspath(__file__), "--worker", "--k", str(k), "--steps",
                   str(args.steps), "--batch", str(args.batch), "--hidden", str(args.hidden), "--budget-gib",
                   str(args.budget_gib)]
        child = subprocess.run(command, capture_output=True, text=True)
        out = child.stdout.strip().splitlines()
        if not out:
            sys.exit(f"recompute_every={k}: the worker failed:\n{child.stderr}")
        r = json.loads(out[-1])
        label = "None" if k == 0 else str(k)
        traced = f"{r['traced_peak_mib']:16.0f}" if r["fits"] else f"{'-':>16}"
        seconds = f"{r['seconds']:8.1f}" if r["fits"] else f"{'-':>8}"
        print(f"{label:>15} {'yes' if r['fits'] else 'no':>5} {traced} {r['rss_peak_mib']:13.0f} {seconds}",
              flush=True)


if __name__ == "__main__":
    main()
