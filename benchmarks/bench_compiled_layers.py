"""The built-in layers' hand-written kernels against the same cells compiled through nn.Recurrent.

One training step (forward, backward of output.sum(), X requiring a gradient) of `nn.RNN` / `nn.LSTM` /
`nn.GRU` with fused=True ("hand": backend_ndarray/recurrent_numpy.py) and of `nn.Recurrent` over
`RNNCell` / `LSTMCell` / `GRUCell` with fused=True ("compiled": needle/compiler). With --bidirectional both
are bidirectional, and two more setups run: "compiled-bi-in-turn" (the two directions' compiled loops one after
the other instead of side by side) and "compiled-uni" (unidirectional, for the ratio). Each setup runs in
its own process (no other framework's threads beside it), the processes alternating round by round; each
figure is the median over rounds of each round's median step. Printed: ms a step and setup / hand.

    python benchmarks/bench_compiled_layers.py
    python benchmarks/bench_compiled_layers.py --kinds lstm --workloads small medium --bidirectional
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORKLOADS = {"tiny": (13, 15, 11, 12, 2), "small": (35, 20, 200, 200, 2), "medium": (35, 20, 650, 650, 2),
             "large": (35, 64, 1024, 1024, 2)}   # seq_len, batch, input, hidden, layers


def child(kind, workload, setup, steps):
    import numpy as np
    import needle as ndl
    from needle import nn
    T, B, F, H, L = WORKLOADS[workload]
    bidirectional = "-bi" in setup
    cell = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}[kind]
    if setup.startswith("hand"):
        module = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[kind](F, H, L, fused=True,
                                                                        bidirectional=bidirectional)
    else:
        module = nn.Recurrent(lambda n: cell(n, H), F, L, fused=True, bidirectional=bidirectional)
        if setup.endswith("in-turn"):
            module._pairs_side_by_side = lambda X: False
    X = ndl.Tensor(np.random.default_rng(0).standard_normal((T, B, F), dtype=np.float32), requires_grad=True)

    def step():
        start = time.perf_counter()
        out, _ = module(X)
        out.sum().backward()
        return time.perf_counter() - start

    for _ in range(3):
        step()
    return statistics.median(step() for _ in range(steps)) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["rnn", "lstm", "gru"], choices=["rnn", "lstm", "gru"])
    parser.add_argument("--workloads", nargs="+", default=["tiny", "small", "medium"], choices=list(WORKLOADS))
    parser.add_argument("--bidirectional", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=9, help="timed steps per process (median kept)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.steps)))
        return
    setups = ["hand", "compiled"]
    if args.bidirectional:
        setups = ["hand-bi", "compiled-bi", "compiled-bi-in-turn", "compiled-uni"]
    print(f"# {os.cpu_count()} cores; each setup in its own process, {args.rounds} rounds, ms a training step")
    ratios = [s + "/" + setups[0] for s in setups[1:]]
    print(f"{'kind':<6}{'workload':<9}" + "".join(f"{s:>{len(s) + 2}}" for s in setups + ratios))
    for kind in args.kinds:
        for workload in args.workloads:
            times = {s: [] for s in setups}
            for _ in range(args.rounds):
                for setup in setups:
                    proc = subprocess.run([sys.executable, __file__, "--child", kind, workload, setup,
                                           "--steps", str(args.steps)], capture_output=True, text=True, check=True)
                    times[setup].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            ms = {s: statistics.median(v) for s, v in times.items()}
            print(f"{kind:<6}{workload:<9}" + "".join(f"{ms[s]:>{len(s) + 2}.2f}" for s in setups) +
                  "".join(f"{ms[s] / ms[setups[0]]:>{len(r) + 2}.2f}" for s, r in zip(setups[1:], ratios)),
                  flush=True)


if __name__ == "__main__":
    main()
