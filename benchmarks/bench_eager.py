"""Eager per-op cost: needle against PyTorch on small tensors, where Python overhead is the whole cost.

Four workloads, each framework in its own subprocess on one thread (OMP, MKL and OpenBLAS threads = 1,
torch.set_num_threads(1)), the subprocesses alternating round by round; each figure is the median over
rounds (one round = one timed repetition after warm-up). Printed: needle and torch figures and
needle/torch, with the machine and the commit.

1. chain: `x = x * b + a` on (20, 20) float32, 2,000 times, then backward of x.sum(); us per op (4,000 ops).
2. chain under no_grad: the same forward, nothing recorded; us per op.
3. mlp: one training step of 784 -> 100 -> ReLU -> 10, batch 32, softmax cross-entropy, SGD; us per step.
4. lstm: one training step of needle's nn.LSTM(fused=False) on the tiny workload (seq 13, batch 15,
   input 11, hidden 12, 2 layers) against torch's LSTMCell stepped in Python; backward of output.sum()
   and SGD; us per step.

    python benchmarks/bench_eager.py
    python benchmarks/bench_eager.py --rounds 21
    PYTHONPATH=/path/to/other/tree python benchmarks/bench_eager.py   # the same figures for another tree
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CHAIN_N = 2000
MLP = (32, 784, 100, 10)
LSTM = (13, 15, 11, 12, 2)  # seq_len, batch, input, hidden, layers
WORKLOADS = ("chain", "chain_no_grad", "mlp", "lstm")
UNITS = {"chain": "us/op", "chain_no_grad": "us/op", "mlp": "us/step", "lstm": "us/step"}


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _chain(x0, a, b):
    """The chain workload, the same text for both frameworks."""
    x = x0
    for _ in range(CHAIN_N):
        x = x * b + a
    return x


def _per_workload(chain, chain_no_grad, mlp_step, lstm_step, repeats):
    """Median time of each workload's callable, in its unit (us an op or us a step)."""
    out = {}
    for name, fn, per in (("chain", chain, 2 * CHAIN_N), ("chain_no_grad", chain_no_grad, 2 * CHAIN_N),
                          ("mlp", mlp_step, 1), ("lstm", lstm_step, 1)):
        fn()
        out[name] = _median_time(fn, repeats) / per * 1e6
    return out


def needle_round(repeats):
    import needle as ndl
    import numpy as np
    rng = np.random.default_rng(0)

    a = ndl.Tensor(rng.standard_normal((20, 20), dtype=np.float32))
    b = ndl.Tensor(rng.standard_normal((20, 20), dtype=np.float32) * 0.5)
    x0 = ndl.Tensor(rng.standard_normal((20, 20), dtype=np.float32))

    def chain():
        _chain(x0, a, b).sum().backward()

    @ndl.no_grad()
    def chain_no_grad():
        _chain(x0, a, b)

    batch, n_in, n_hidden, n_out = MLP
    mlp = ndl.nn.Sequential(ndl.nn.Linear(n_in, n_hidden), ndl.nn.ReLU(), ndl.nn.Linear(n_hidden, n_out))
    loss_fn, opt = ndl.nn.SoftmaxLoss(), ndl.optim.SGD(mlp.parameters(), lr=0.01)
    X = ndl.Tensor(rng.standard_normal((batch, n_in), dtype=np.float32), requires_grad=False)
    y = ndl.Tensor(rng.integers(0, n_out, batch).astype(np.float32), requires_grad=False)

    def mlp_step():
        opt.reset_grad()
        loss_fn(mlp(X), y).backward()
        opt.step()

    seq, bs, n_in, hidden, layers = LSTM
    lstm = ndl.nn.LSTM(n_in, hidden, layers, fused=False)
    lstm_opt = ndl.optim.SGD(lstm.parameters(), lr=0.01)
    S = ndl.Tensor(rng.standard_normal((seq, bs, n_in), dtype=np.float32), requires_grad=False)

    def lstm_step():
        lstm_opt.reset_grad()
        lstm(S)[0].sum().backward()
        lstm_opt.step()

    return _per_workload(chain, chain_no_grad, mlp_step, lstm_step, repeats)


def torch_round(repeats):
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)

    a, b, x0 = torch.randn(20, 20), torch.randn(20, 20) * 0.5, torch.randn(20, 20)
    x0.requires_grad_(True)
    a.requires_grad_(True)
    b.requires_grad_(True)

    def chain():
        _chain(x0, a, b).sum().backward()

    @torch.no_grad()
    def chain_no_grad():
        _chain(x0, a, b)

    batch, n_in, n_hidden, n_out = MLP
    mlp = torch.nn.Sequential(torch.nn.Linear(n_in, n_hidden), torch.nn.ReLU(), torch.nn.Linear(n_hidden, n_out))
    loss_fn, opt = torch.nn.CrossEntropyLoss(), torch.optim.SGD(mlp.parameters(), lr=0.01)
    X, y = torch.randn(batch, n_in), torch.randint(0, n_out, (batch,))

    def mlp_step():
        opt.zero_grad()
        loss_fn(mlp(X), y).backward()
        opt.step()

    seq, bs, n_in, hidden, layers = LSTM
    cells = [torch.nn.LSTMCell(n_in if i == 0 else hidden, hidden) for i in range(layers)]
    lstm_opt = torch.optim.SGD([p for c in cells for p in c.parameters()], lr=0.01)
    S = torch.randn(seq, bs, n_in)

    def lstm_step():
        lstm_opt.zero_grad()
        states = [(torch.zeros(bs, hidden), torch.zeros(bs, hidden)) for _ in cells]
        outputs = []
        for t in range(seq):
            h = S[t]
            for i, cell in enumerate(cells):
                states[i] = cell(h, states[i])
                h = states[i][0]
            outputs.append(h)
        torch.stack(outputs).sum().backward()
        lstm_opt.step()

    return _per_workload(chain, chain_no_grad, mlp_step, lstm_step, repeats)


def run_child(framework, repeats):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, "--child", framework, "--repeats", str(repeats)],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or "?"
    except OSError:
        return "?"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="subprocess rounds per framework, alternating")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per round (median kept)")
    parser.add_argument("--child", choices=("needle", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps((needle_round if args.child == "needle" else torch_round)(args.repeats)))
        return

    import needle
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
          f"python {platform.python_version()}; needle from {os.path.dirname(needle.__file__)}; commit {commit()}")
    results = {"needle": [], "torch": []}
    for _ in range(args.rounds):
        for framework in ("needle", "torch"):
            results[framework].append(run_child(framework, args.repeats))
    print(f"{'workload':<16}{'unit':>9}{'needle':>10}{'torch':>10}{'needle/torch':>14}")
    for name in WORKLOADS:
        n = statistics.median(r[name] for r in results["needle"])
        t = statistics.median(r[name] for r in results["torch"])
        print(f"{name:<16}{UNITS[name]:>9}{n:>10.2f}{t:>10.2f}{n / t:>14.2f}")


if __name__ == "__main__":
    main()
