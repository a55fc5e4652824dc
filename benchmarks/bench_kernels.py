"""Dev timing: the numpy recurrent kernels vs torch.nn.RNN/LSTM/GRU on CPU.

One training step = forward over the whole sequence, then the backward of output.sum()
(numpy: *_backward with dY = ones, dh_n = None; torch: Y.sum().backward() with X requiring
grad, so both sides compute dX; h0 = zeros, float32 everywhere).
Reported: median over N steps after warm-up, in ms, and the ratio numpy / torch.

By default each framework runs in its own process (their thread pools slow each other down
when they share one): the parent spawns `--framework numpy` and `--framework torch` children.
With --rounds R the children are run R times, alternating, and each entry is the smallest of
the R medians: this machine is shared, and a round that overlapped someone else's work is
slower, never faster.

    python benchmarks/bench_kernels.py                       # everything, separate processes
    python benchmarks/bench_kernels.py --kinds lstm --workloads medium large
    python benchmarks/bench_kernels.py --same-process        # both in one process
    python benchmarks/bench_kernels.py --omp-passive         # OMP_WAIT_POLICY=PASSIVE for torch
"""

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKLOADS = {  # (T, B, I, H)
    "tiny": (13, 15, 11, 12),
    "small": (35, 20, 200, 200),
    "medium": (35, 20, 650, 650),
    "large": (100, 64, 1024, 1024),
}
STEPS = {"tiny": 300, "small": 40, "medium": 12, "large": 4}
KINDS = ("rnn", "lstm", "gru")
GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def load_kernels():
    path = ROOT / "needle" / "backend_ndarray" / "recurrent_numpy.py"
    spec = importlib.util.spec_from_file_location("recurrent_numpy", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _median_ms(step, n, warm):
    for _ in range(warm):
        step()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def numpy_step_fn(kind, T, B, I, H):
    import numpy as np
    K = load_kernels()
    rng = np.random.default_rng(0)
    G = GATES[kind]
    s = 1 / np.sqrt(H)
    f32 = np.float32
    X = rng.standard_normal((T, B, I)).astype(f32)
    h0 = np.zeros((B, H), f32)
    W_ih = rng.uniform(-s, s, (I, G * H)).astype(f32)
    W_hh = rng.uniform(-s, s, (H, G * H)).astype(f32)
    b_ih = rng.uniform(-s, s, G * H).astype(f32)
    b_hh = rng.uniform(-s, s, G * H).astype(f32)
    dY = np.ones((T, B, H), f32)
    if kind == "rnn":
        def step():
            Y, hn, saved = K.rnn_forward(X, h0, W_ih, W_hh, b_ih, b_hh)
            return K.rnn_backward(dY, None, saved)
    elif kind == "lstm":
        def step():
            Y, hn, cn, saved = K.lstm_forward(X, h0, h0, W_ih, W_hh, b_ih, b_hh)
            return K.lstm_backward(dY, None, None, saved)
    else:
        def step():
            Y, hn, saved = K.gru_forward(X, h0, W_ih, W_hh, b_ih, b_hh)
            return K.gru_backward(dY, None, saved)
    return step


def torch_step_fn(kind, T, B, I, H):
    import torch
    torch.manual_seed(0)
    mod = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind](I, H, num_layers=1)
    X = torch.randn(T, B, I, requires_grad=True)

    def step():
        mod.zero_grad(set_to_none=True)
        X.grad = None
        Y, _ = mod(X)
        Y.sum().backward()
    return step


def run(framework, kinds, workloads, threads):
    if framework == "torch":
        import torch
        torch.set_num_threads(threads)
    res = {}
    for kind in kinds:
        for w in workloads:
            fn = (numpy_step_fn if framework == "numpy" else torch_step_fn)(kind, *WORKLOADS[w])
            n = STEPS[w]
            res["%s/%s" % (kind, w)] = _median_ms(fn, n, warm=max(2, n // 10))
    return res


def child(framework, args, env_extra=None):
    cmd = [sys.executable, __file__, "--framework", framework, "--json",
           "--threads", str(args.threads), "--kinds", *args.kinds, "--workloads", *args.workloads]
    env = dict(os.environ)
    env.update(env_extra or {})
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(np_res, th_res, title):
    print(title)
    print("%-5s %-7s %11s %11s %7s" % ("kind", "work", "numpy ms", "torch ms", "ratio"))
    for key in np_res:
        kind, w = key.split("/")
        a, b = np_res[key], th_res[key]
        print("%-5s %-7s %11.3f %11.3f %7.2f" % (kind, w, a, b, a / b))
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--framework", choices=("numpy", "torch"), help="(child) run one framework")
    ap.add_argument("--json", action="store_true", help="(child) print results as JSON")
    ap.add_argument("--same-process", action="store_true",
                    help="run both frameworks in this one process (torch imported first)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the children R times, keep the best median")
    ap.add_argument("--omp-passive", action="store_true",
                    help="set OMP_WAIT_POLICY=PASSIVE before torch is imported")
    args = ap.parse_args()

    if args.framework:
        res = run(args.framework, args.kinds, args.workloads, args.threads)
        print(json.dumps(res) if args.json else res)
        return
    env_extra = {"OMP_WAIT_POLICY": "PASSIVE"} if args.omp_passive else {}
    if args.same_process:
        os.environ.update(env_extra)
        import torch  # noqa: F401  (both pools alive in one process)
        th = run("torch", args.kinds, args.workloads, args.threads)
        nu = run("numpy", args.kinds, args.workloads, args.threads)
        where = "one process"
    else:
        nu, th = {}, {}
        for _ in range(args.rounds):
            for res, r in ((nu, child("numpy", args)), (th, child("torch", args, env_extra))):
                for k, v in r.items():
                    res[k] = min(v, res.get(k, v))
        where = "separate processes, best of %d round(s)" % args.rounds
    table(nu, th, "numpy kernels vs torch.nn, float32, torch threads=%d, %s%s" % (
        args.threads, where, ", OMP_WAIT_POLICY=PASSIVE" if args.omp_passive else ""))


if __name__ == "__main__":
    main()
