"""One training step of needle's RNN, LSTM and GRU against torch.nn on the CPU.

A step is forward over the whole sequence, then backward of output.sum() (X requires a gradient on both
sides, as the embedding output does in a language model). needle and torch run in one process,
interleaved step by step, torch limited to 2 threads, needle imported first (see the imports); each figure is the median of several steps after
warm-up. Printed per kind and workload: needle ms, torch ms, needle/torch, and needle's GEMM GFLOP/s as
a share of numpy's float32 GEMM peak measured at the start of the run.

--variants adds rows for bidirectional layers ("bi") and for per-sequence lengths drawn uniformly from
[seq_len/2, seq_len] ("len"; torch through pack_padded_sequence(enforce_sorted=False) and
pad_packed_sequence); their last column is needle's time over its own unidirectional, full-length time,
measured interleaved with it in the same group of steps.

    python benchmarks/bench_recurrent.py
    python benchmarks/bench_recurrent.py --kinds lstm --workloads medium large --reference
    python benchmarks/bench_recurrent.py --variants uni bi len
"""
import argparse
import os
import platform
import statistics
import subprocess
import time

# needle first: it sets OPENBLAS_THREAD_TIMEOUT before numpy loads OpenBLAS (needle/__init__.py). Without
# it, OpenBLAS's idle workers spin for ~0.1 s after every needle GEMM and hold the core that torch's next
# step needs: torch's LSTM small step then measures 33 ms instead of 17.
import needle as ndl  # noqa: I001
import numpy as np
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

WORKLOADS = {  # seq_len, batch, input, hidden, layers
    "tiny": (13, 15, 11, 12, 2),
    "small": (35, 20, 200, 200, 2),
    "medium": (35, 20, 650, 650, 2),
    "large": (100, 64, 1024, 1024, 1),
}
STEPS = {"tiny": 200, "small": 30, "medium": 10, "large": 5}
GATES = {"rnn": 1, "lstm": 4, "gru": 3}
NEEDLE = {"rnn": ndl.nn.RNN, "lstm": ndl.nn.LSTM, "gru": ndl.nn.GRU}
TORCH = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}


def gemm_peak_gflops(n=2048, repeats=5):
    a = np.random.rand(n, n).astype(np.float32)
    b = np.random.rand(n, n).astype(np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_flops(kind, seq_len, batch, input_size, hidden, layers, directions=1):
    """GEMM flops of a training step: forward's projections, then twice that in backward."""
    width = GATES[kind] * hidden
    forward = sum(2 * seq_len * batch * ((input_size if l == 0 else directions * hidden) + hidden) * width
                  for l in range(layers))
    return 3 * forward * directions


def variant_options(variant, workload):
    """(bidirectional, lengths) of a benchmark variant: 'uni', 'bi' or 'len'."""
    seq_len, batch = workload[:2]
    lengths = np.random.default_rng(0).integers(seq_len // 2, seq_len + 1, size=batch) if variant == "len" else None
    return variant == "bi", lengths


def needle_step(kind, workload, fused, variant="uni", compiled=False):
    seq_len, batch, input_size, hidden, layers = workload
    bidirectional, lengths = variant_options(variant, workload)
    model = NEEDLE[kind](input_size, hidden, num_layers=layers, fused=fused, bidirectional=bidirectional)
    if compiled:  # the same cells through the cell compiler (nn.Recurrent)
        cells = list(getattr(model, model.cells_name))
        model = ndl.nn.Recurrent(lambda n: cells.pop(0), input_size, layers, fused=True)
    X = ndl.Tensor(np.random.randn(seq_len, batch, input_size).astype(np.float32), requires_grad=True)

    def step():
        for p in model.parameters():
            p.grad = None
        X.grad = None
        out, _ = model(X, None, lengths)
        out.sum().backward()
    return step


def torch_step(kind, workload, variant="uni"):
    seq_len, batch, input_size, hidden, layers = workload
    bidirectional, lengths = variant_options(variant, workload)
    model = TORCH[kind](input_size, hidden, num_layers=layers, bidirectional=bidirectional)
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


def interleaved_medians(steps, n):
    for step in steps:
        step()
        step()
    times = [[] for _ in steps]
    for _ in range(n):
        for k, step in enumerate(steps):
            times[k].append(_timed(step))
    return [1e3 * statistics.median(t) for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=list(GATES), choices=list(GATES))
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--reference", action="store_true", help="also time needle's per-step reference path")
    parser.add_argument("--repeats", type=float, default=1.0, help="scale the number of timed steps")
    parser.add_argument("--variants", nargs="+", default=["uni"], choices=["uni", "bi", "len"])
    parser.add_argument("--compiled", action="store_true",
                        help="also time the same cells compiled by needle.compiler (nn.Recurrent; uni and len)")
    args = parser.parse_args()

    torch.set_num_threads(2)
    np.random.seed(0)
    torch.manual_seed(0)
    peak = gemm_peak_gflops()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), needle commit {commit}")
    print(f"# numpy float32 GEMM peak (2048^3): {peak:.0f} GFLOP/s")
    header = (f"{'kind':5} {'workload':8} {'variant':7} {'needle ms':>10} {'torch ms':>10} {'ratio':>6} "
              f"{'GFLOP/s':>8} {'% peak':>7}")
    if args.reference:
        header += f" {'reference ms':>13}"
    if args.compiled:
        header += f" {'compiled ms':>12} {'compiled/torch':>14}"
    if set(args.variants) - {"uni"}:
        header += f" {'vs uni':>7}"
    print(header)
    for kind in args.kinds:
        for name in args.workloads:
            workload = WORKLOADS[name]
            for variant in args.variants:
                steps = [needle_step(kind, workload, True, variant), torch_step(kind, workload, variant)]
                if args.reference:
                    steps.append(needle_step(kind, workload, False, variant))
                compiled = args.compiled and variant != "bi"
                if compiled:
                    steps.append(needle_step(kind, workload, True, variant, compiled=True))
                if variant != "uni":  # its own unidirectional, full-length step, interleaved with it
                    steps.append(needle_step(kind, workload, True, "uni"))
                times = interleaved_medians(steps, max(3, int(STEPS[name] * args.repeats)))
                uni_ms = times[-1]
                flops = step_flops(kind, *workload, directions=2 if variant == "bi" else 1)
                gflops = flops / (times[0] / 1e3) / 1e9
                line = (f"{kind:5} {name:8} {variant:7} {times[0]:10.2f} {times[1]:10.2f} "
                        f"{times[0] / times[1]:6.2f} {gflops:8.1f} {100 * gflops / peak:6.0f}%")
                if args.reference:
                    line += f" {times[2]:13.2f}"
                if compiled:
                    at = 3 if args.reference else 2
                    line += f" {times[at]:12.2f} {times[at] / times[1]:14.2f}"
                if variant != "uni":
                    line += f" {times[0] / uni_ms:7.2f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
