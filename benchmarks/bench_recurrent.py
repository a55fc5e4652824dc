"""One training step of needle's RNN, LSTM and GRU against torch.nn on the CPU.

A step is forward over the whole sequence, then backward of output.sum() (X requires a gradient on both
sides, as the embedding output does in a language model). Each framework runs in its own process (no
other framework's threads or allocator beside it; torch with 2 threads), the processes alternating round by
round; a process warms up, then times its steps, and each figure is the median over rounds of each round's
median step. Printed per kind, workload and variant: needle ms, torch ms, needle/torch, and needle's GEMM
GFLOP/s as a share of numpy's float32 GEMM peak (measured once at the start).

needle's fused path compiles each kind's cell on its first use on a machine (needle.compiler, kernels
cached on disk); the warm-up steps absorb that, so the figures are steady-state steps.

--variants adds rows for bidirectional layers ("bi") and for per-sequence lengths drawn uniformly from
[seq_len/2, seq_len] ("len"; torch through pack_padded_sequence(enforce_sorted=False) and
pad_packed_sequence). --reference adds needle's per-step reference path (fused=False).

    python benchmarks/bench_recurrent.py
    python benchmarks/bench_recurrent.py --kinds lstm --workloads medium large --reference
    python benchmarks/bench_recurrent.py --variants uni bi len --rounds 5
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

WORKLOADS = {  # seq_len, batch, input, hidden, layers
    "tiny": (13, 15, 11, 12, 2),
    "small": (35, 20, 200, 200, 2),
    "medium": (35, 20, 650, 650, 2),
    "large": (100, 64, 1024, 1024, 1),
}
STEPS = {"tiny": 100, "small": 15, "medium": 7, "large": 3}
GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def step_flops(kind, seq_len, batch, input_size, hidden, layers, directions=1):
    """GEMM flops of a training step: forward's projections, then twice that in backward."""
    width = GATES[kind] * hidden
    forward = sum(2 * seq_len * batch * ((input_size if l == 0 else directions * hidden) + hidden) * width
                  for l in range(layers))
    return 3 * forward * directions


def _lengths(variant, seq_len, batch):
    import numpy as np
    return np.random.default_rng(0).integers(seq_len // 2, seq_len + 1, size=batch) if variant == "len" else None


def _needle_step(kind, workload, variant, fused):
    import numpy as np
    import needle as ndl
    seq_len, batch, input_size, hidden, layers = workload
    lengths = _lengths(variant, seq_len, batch)
    model = {"rnn": ndl.nn.RNN, "lstm": ndl.nn.LSTM, "gru": ndl.nn.GRU}[kind](
        input_size, hidden, num_layers=layers, fused=fused, bidirectional=variant == "bi")
    X = ndl.Tensor(np.random.default_rng(1).standard_normal((seq_len, batch, input_size), dtype=np.float32),
                   requires_grad=True)

    def step():
        for p in model.parameters():
            p.grad = None
        X.grad = None
        out, _ = model(X, None, lengths)
        out.sum().backward()
    return step


def _torch_step(kind, workload, variant):
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    torch.set_num_threads(2)
    seq_len, batch, input_size, hidden, layers = workload
    lengths = _lengths(variant, seq_len, batch)
    model = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind](
        input_size, hidden, num_layers=layers, bidirectional=variant == "bi")
    X = torch.randn(seq_len, batch, input_size, requires_grad=True)
    lengths = None if lengths is None else torch.tensor(lengths)

    def step():
        model.zero_grad(set_to_none=True)
        X.grad = None
        if lengths is None:
            out, _ = model(X)
        else:
            out, _ = model(pack_padded_sequence(X, lengths, enforce_sorted=False))
            out, _ = pad_packed_sequence(out, total_length=seq_len)
        out.sum().backward()
    return step


def child(setup, kind, workload, variant, steps):
    """Median ms of `steps` timed steps of one setup ('needle', 'torch' or 'reference'), after warm-up."""
    if setup == "torch":
        step = _torch_step(kind, WORKLOADS[workload], variant)
    else:
        step = _needle_step(kind, WORKLOADS[workload], variant, fused=setup == "needle")
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def gemm_peak_gflops(n=2048, repeats=5):
    import numpy as np
    a = np.random.rand(n, n).astype(np.float32)
    b = np.random.rand(n, n).astype(np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=list(GATES), choices=list(GATES))
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--variants", nargs="+", default=["uni"], choices=["uni", "bi", "len"])
    parser.add_argument("--reference", action="store_true", help="also time needle's per-step reference path")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of one process per setup, alternating")
    parser.add_argument("--repeats", type=float, default=1.0, help="scale the number of timed steps")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        setup, kind, workload, variant, steps = args.child
        print(json.dumps(child(setup, kind, workload, variant, int(steps))))
        return

    peak = gemm_peak_gflops()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, needle commit {commit}; "
          f"each framework in its own process, {args.rounds} rounds alternating, torch with 2 threads")
    print(f"# numpy float32 GEMM peak (2048^3): {peak:.0f} GFLOP/s")
    setups = ["needle", "torch"] + (["reference"] if args.reference else [])
    header = (f"{'kind':5} {'workload':8} {'variant':7} {'needle ms':>10} {'torch ms':>10} {'ratio':>6} "
              f"{'GFLOP/s':>8} {'% peak':>7}" + (f" {'reference ms':>13}" if args.reference else ""))
    print(header)
    for kind in args.kinds:
        for name in args.workloads:
            for variant in args.variants:
                steps = str(max(3, int(STEPS[name] * args.repeats)))
                times = {s: [] for s in setups}
                for _ in range(args.rounds):
                    for setup in setups:
                        proc = subprocess.run([sys.executable, __file__, "--child", setup, kind, name, variant,
                                               steps], capture_output=True, text=True, check=True)
                        times[setup].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                ms = {s: statistics.median(v) for s, v in times.items()}
                flops = step_flops(kind, *WORKLOADS[name], directions=2 if variant == "bi" else 1)
                gflops = flops / (ms["needle"] / 1e3) / 1e9
                line = (f"{kind:5} {name:8} {variant:7} {ms['needle']:10.2f} {ms['torch']:10.2f} "
                        f"{ms['needle'] / ms['torch']:6.2f} {gflops:8.1f} {100 * gflops / peak:6.0f}%")
                if args.reference:
                    line += f" {ms['reference']:13.2f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
