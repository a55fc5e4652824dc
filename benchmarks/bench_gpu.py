"""needle's LSTM on the GPU (the cuda device: CuPy, reference path) against torch.nn.LSTM on the GPU (cuDNN).

One training step (forward, backward of output.sum(), X requiring a gradient), each framework in its own
process, the processes alternating round by round; each figure is the median over rounds of each round's
median step, timed with the device synchronised before and after. Printed: ms a step and needle/torch.
needle has no fused GPU kernels yet, so this measures how far its per-step reference path is from cuDNN.
Needs a CUDA GPU, CuPy and a CUDA build of torch.

    python benchmarks/bench_gpu.py
    python benchmarks/bench_gpu.py --workloads tiny small --rounds 5
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

WORKLOADS = {"tiny": (13, 15, 11, 12, 2), "small": (35, 20, 200, 200, 2), "medium": (35, 20, 650, 650, 2),
             "large": (35, 64, 1024, 1024, 2)}   # seq_len, batch, input, hidden, layers


def needle_steps(workload, steps):
    import cupy
    import numpy as np
    import needle as ndl
    T, B, F, H, L = WORKLOADS[workload]
    device = ndl.cuda()
    module = ndl.nn.LSTM(F, H, L, device=device)
    X = ndl.Tensor(np.random.default_rng(0).standard_normal((T, B, F), dtype=np.float32), device=device,
                   requires_grad=True)   # as torch's X: both compute dX

    def step():
        cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        out, _ = module(X)
        out.sum().backward()
        cupy.cuda.Device().synchronize()
        return time.perf_counter() - start

    return [step() for _ in range(steps)]


def torch_steps(workload, steps):
    import torch
    T, B, F, H, L = WORKLOADS[workload]
    module = torch.nn.LSTM(F, H, L).cuda()
    X = torch.randn(T, B, F, device="cuda", requires_grad=True)

    def step():
        torch.cuda.synchronize()
        start = time.perf_counter()
        out, _ = module(X)
        out.sum().backward()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    return [step() for _ in range(steps)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["tiny", "small", "medium"], choices=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per process after 3 warm-up steps")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        framework, workload = args.child
        run = needle_steps if framework == "needle" else torch_steps
        times = run(workload, args.steps + 3)[3:]
        print(json.dumps(statistics.median(times) * 1e3))
        return
    print(f"{'workload':<10}{'needle ms':>12}{'torch ms':>12}{'needle/torch':>14}")
    for workload in args.workloads:
        ms = {"needle": [], "torch": []}
        for _ in range(args.rounds):
            for framework in ms:
                proc = subprocess.run([sys.executable, __file__, "--child", framework, workload, "--steps",
                                       str(args.steps)], capture_output=True, text=True, check=True)
                ms[framework].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        n, t = statistics.median(ms["needle"]), statistics.median(ms["torch"])
        print(f"{workload:<10}{n:>12.2f}{t:>12.2f}{n / t:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
