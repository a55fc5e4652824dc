"""One training step of user-written recurrent cells: needle's compiled nn.Recurrent beside JAX and torch.

Cells: CIFG (coupled input-forget LSTM), MGU (minimal gated unit) and a layer-normalised LSTM, each written
once per framework in its ops. A step is forward over the sequence and backward of output.sum() (gradients
of every parameter and of X). needle runs the compiled path (and, on tiny and small, its own reference path);
JAX runs the cell under lax.scan inside jit(value_and_grad); torch runs the cell eagerly in a Python loop.
Each framework runs in its own process with 2 threads, in alternating rounds; a figure is the median over
rounds of each round's median step. Printed: ms per framework, needle/JAX, needle/torch, compiled/reference,
and needle's GEMM GFLOP/s as a share of numpy's float32 GEMM peak.

    python benchmarks/bench_cells.py
    python benchmarks/bench_cells.py --cells cifg --workloads tiny small --rounds 3
    python benchmarks/bench_cells.py --compile-time      # cold and cached compile time, import time
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

WORKLOADS = {  # seq_len, batch, input, hidden, layers
    "tiny": (13, 15, 11, 12, 2),
    "small": (35, 20, 200, 200, 2),
    "medium": (35, 20, 650, 650, 2),
    "large": (100, 64, 1024, 1024, 1),
}
STEPS = {"tiny": 100, "small": 15, "medium": 5, "large": 3}
# per layer: widths of the input product and of each recurrent product, in units of hidden
SHAPES = {"cifg": (3, [3]), "mgu": (2, [1, 1]), "lnlstm": (4, [4])}


def step_flops(cell, seq_len, batch, input_size, hidden, layers):
    x_width, h_widths = SHAPES[cell]
    forward = 0
    for layer in range(layers):
        n = input_size if layer == 0 else hidden
        forward += 2 * seq_len * batch * (n * x_width * hidden + sum(hidden * w * hidden for w in h_widths))
    return 3 * forward


# ---- the cells, in each framework -------------------------------------------------------------------------

def _needle_cell(kind, n, hidden):
    import needle as ndl
    from needle import nn, ops

    def param(*shape):
        bound = 1.0 / hidden ** 0.5
        return nn.Parameter(ndl.init.rand(*shape, low=-bound, high=bound))

    def bias(b, rows):
        return ops.broadcast_to(ops.reshape(b, (1, b.shape[0])), (rows, b.shape[0]))

    def norm(v, g, b):
        rows, width = v.shape
        mean = ops.broadcast_to(ops.reshape(v.sum(axes=(1,)) / width, (rows, 1)), v.shape)
        d = v - mean
        var = ops.broadcast_to(ops.reshape((d * d).sum(axes=(1,)) / width, (rows, 1)), v.shape)
        return d / ops.power_scalar(var + 1e-5, 0.5) * bias(g, rows) + bias(b, rows)

    class Cell(nn.Module):
        num_states = 1 if kind == "mgu" else 2

        def __init__(self):
            super().__init__()
            self.hidden_size = hidden
            g = SHAPES[kind][0]
            if kind == "mgu":
                self.W = [param(n, hidden), param(n, hidden)]
                self.U = [param(hidden, hidden), param(hidden, hidden)]
                self.b = [param(hidden), param(hidden)]
            else:
                self.W, self.U, self.b = param(n, g * hidden), param(hidden, g * hidden), param(g * hidden)
            if kind == "lnlstm":
                self.norms = [param(g * hidden), param(g * hidden), param(g * hidden), param(g * hidden),
                              param(hidden), param(hidden)]

        def forward(self, X, state):
            rows = X.shape[0]
            if kind == "mgu":
                h = state
                f = ops.sigmoid(X @ self.W[0] + h @ self.U[0] + bias(self.b[0], rows))
                c = ops.tanh(X @ self.W[1] + (f * h) @ self.U[1] + bias(self.b[1], rows))
                return (1 - f) * h + f * c
            h, c = state
            if kind == "cifg":
                pre = X @ self.W + h @ self.U + bias(self.b, rows)
                f, g, o = ops.split(ops.reshape(pre, (rows, 3, hidden)), 1)
                f = ops.sigmoid(f)
                c = f * c + (1 - f) * ops.tanh(g)
                return ops.sigmoid(o) * ops.tanh(c), c
            p = self.norms
            pre = norm(X @ self.W, p[0], p[1]) + norm(h @ self.U, p[2], p[3]) + bias(self.b, rows)
            i, f, g, o = ops.split(ops.reshape(pre, (rows, 4, hidden)), 1)
            c = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
            return ops.sigmoid(o) * ops.tanh(norm(c, p[4], p[5])), c

    return Cell()


def run_needle(kind, workload, steps, fused):
    import needle as ndl
    import numpy as np
    seq_len, batch, input_size, hidden, layers = workload
    model = ndl.nn.Recurrent(lambda n: _needle_cell(kind, n, hidden), input_size, layers, fused=fused)
    X = ndl.Tensor(np.random.randn(seq_len, batch, input_size).astype(np.float32), requires_grad=True)

    def step():
        out, _ = model(X)
        out.sum().backward()
    return _time(step, steps)


def _torch_params(kind, n, hidden, torch):
    g = SHAPES[kind][0]

    def p(*shape):
        return (torch.rand(*shape) * 2 - 1).div_(hidden ** 0.5).requires_grad_()
    if kind == "mgu":
        return [p(n, hidden), p(n, hidden), p(hidden, hidden), p(hidden, hidden), p(hidden), p(hidden)]
    ps = [p(n, g * hidden), p(hidden, g * hidden), p(g * hidden)]
    if kind == "lnlstm":
        ps += [p(g * hidden), p(g * hidden), p(g * hidden), p(g * hidden), p(hidden), p(hidden)]
    return ps


def _step_fn(kind, xp, sigmoid):
    """The cell as a function of (params, x, state) over an array module (torch or jax.numpy)."""
    def norm(v, g, b):
        mean = v.mean(-1, keepdims=True) if xp.__name__ != "torch" else v.mean(-1, keepdim=True)
        d = v - mean
        var = (d * d).mean(-1, keepdims=True) if xp.__name__ != "torch" else (d * d).mean(-1, keepdim=True)
        return d / xp.sqrt(var + 1e-5) * g + b

    def step(p, x, state):
        if kind == "mgu":
            W_f, W_n, U_f, U_n, b_f, b_n = p
            h = state[0]
            f = sigmoid(x @ W_f + h @ U_f + b_f)
            n = xp.tanh(x @ W_n + (f * h) @ U_n + b_n)
            return ((1 - f) * h + f * n,)
        h, c = state
        if kind == "cifg":
            W, U, b = p
            H = h.shape[-1]
            pre = x @ W + h @ U + b
            f, g, o = sigmoid(pre[:, :H]), xp.tanh(pre[:, H:2 * H]), sigmoid(pre[:, 2 * H:])
            c = f * c + (1 - f) * g
            return o * xp.tanh(c), c
        W, U, b, g1, b1, g2, b2, g3, b3 = p
        H = h.shape[-1]
        pre = norm(x @ W, g1, b1) + norm(h @ U, g2, b2) + b
        i, f, g, o = (sigmoid(pre[:, :H]), sigmoid(pre[:, H:2 * H]), xp.tanh(pre[:, 2 * H:3 * H]),
                      sigmoid(pre[:, 3 * H:]))
        c = f * c + i * g
        return o * xp.tanh(norm(c, g3, b3)), c
    return step


def run_torch(kind, workload, steps):
    import torch
    torch.set_num_threads(2)
    seq_len, batch, input_size, hidden, layers = workload
    params = [_torch_params(kind, input_size if l == 0 else hidden, hidden, torch) for l in range(layers)]
    n_states = 1 if kind == "mgu" else 2
    cell = _step_fn(kind, torch, torch.sigmoid)
    X = torch.randn(seq_len, batch, input_size, requires_grad=True)

    def step():
        xs = list(X)
        for p in params:
            state = tuple(torch.zeros(batch, hidden) for _ in range(n_states))
            outs = []
            for x in xs:
                state = cell(p, x, state)
                outs.append(state[0])
            xs = outs
        torch.stack(xs).sum().backward()
    return _time(step, steps)


def run_jax(kind, workload, steps):
    import jax
    import jax.numpy as jnp
    seq_len, batch, input_size, hidden, layers = workload
    rng = __import__("numpy").random.default_rng(0)
    n_states = 1 if kind == "mgu" else 2

    params = []
    for l in range(layers):
        n = input_size if l == 0 else hidden
        g = SHAPES[kind][0]
        shapes = ([(n, hidden), (n, hidden), (hidden, hidden), (hidden, hidden), (hidden,), (hidden,)]
                  if kind == "mgu" else [(n, g * hidden), (hidden, g * hidden), (g * hidden,)] +
                  ([(g * hidden,)] * 4 + [(hidden,)] * 2 if kind == "lnlstm" else []))
        params.append([jnp.asarray(rng.uniform(-1, 1, s).astype("float32") / hidden ** 0.5) for s in shapes])
    cell = _step_fn(kind, jnp, jax.nn.sigmoid)
    X = jnp.asarray(rng.standard_normal((seq_len, batch, input_size)).astype("float32"))

    def loss(params, X):
        xs = X
        for p in params:
            init_state = tuple(jnp.zeros((batch, hidden)) for _ in range(n_states))

            def body(state, x, p=p):
                new = cell(p, x, state)
                return new, new[0]
            _, xs = jax.lax.scan(body, init_state, xs)
        return xs.sum()
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    def step():
        jax.block_until_ready(grad(params, X))
    return _time(step, steps)


def _time(step, steps):
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


# ---- the parent: one child per framework and round ------------------------------------------------------

def child(args):
    workload = WORKLOADS[args.workload]
    steps = STEPS[args.workload]
    if args.framework == "needle":
        ms = run_needle(args.cell, workload, steps, True)
    elif args.framework == "reference":
        ms = run_needle(args.cell, workload, max(3, steps // 5), False)
    elif args.framework == "torch":
        ms = run_torch(args.cell, workload, steps)
    else:
        ms = run_jax(args.cell, workload, steps)
    print(json.dumps({"ms": ms}))


def spawn(framework, cell, workload, env):
    cmd = [sys.executable, __file__, "--child", framework, "--cell", cell, "--workload", workload]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{framework} {cell} {workload} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["ms"]


def gemm_peak_gflops(n=2048):
    import numpy as np
    a = np.random.rand(n, n).astype(np.float32)
    a @ a
    best = min(_timed_once(lambda: a @ a) for _ in range(5))
    return 2 * n ** 3 / best / 1e9


def _timed_once(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compile_times():
    """Cold compile (fresh cache) and cached load of a new cell in a fresh process; import needle time."""
    code = ("import time; t = time.perf_counter(); import numpy as np, needle as ndl; t1 = time.perf_counter()\n"
            "import sys; sys.path.insert(0, %r)\n"
            "from bench_cells import _needle_cell\n"
            "m = ndl.nn.Recurrent(lambda n: _needle_cell('cifg', n, 16), 8, 1, fused=True)\n"
            "X = ndl.Tensor(np.ones((3, 2, 8)))\n"
            "t2 = time.perf_counter(); out, _ = m(X); out.sum().backward(); t3 = time.perf_counter()\n"
            "print(t1 - t, t3 - t2)\n") % os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NEEDLE_CACHE_DIR=cache)
        cold = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        warm = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    import_s, cold_s = map(float, cold.stdout.split())
    _, warm_s = map(float, warm.stdout.split())
    print(f"import needle {import_s:.2f} s; first fused step of a new cell (trace + compile forward and "
          f"backward), cold: {cold_s:.2f} s; from the disk cache: {warm_s:.2f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=sorted(SHAPES), choices=sorted(SHAPES))
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--frameworks", nargs="+", default=["needle", "jax", "torch", "reference"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile-time", action="store_true")
    parser.add_argument("--child")
    parser.add_argument("--cell")
    parser.add_argument("--workload")
    args = parser.parse_args()
    if args.child:
        args.framework = args.child
        return child(args)
    env = dict(os.environ, OMP_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2", MKL_NUM_THREADS="2",
               XLA_FLAGS="--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    peak = gemm_peak_gflops()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, commit {commit}, "
          f"numpy float32 GEMM peak {peak:.0f} GFLOP/s, {args.rounds} rounds")
    if args.compile_time:
        compile_times()
    header = f"{'cell':7} {'workload':8} " + " ".join(f"{f:>10}" for f in args.frameworks) + \
        "   needle/jax needle/torch compiled/ref  %peak"
    print(header)
    for cell in args.cells:
        for workload in args.workloads:
            frameworks = [f for f in args.frameworks if f != "reference" or workload in ("tiny", "small")]
            results = {f: [] for f in frameworks}
            for _ in range(args.rounds):
                for f in frameworks:
                    results[f].append(spawn(f, cell, workload, env))
            ms = {f: statistics.median(v) for f, v in results.items()}
            share = step_flops(cell, *WORKLOADS[workload]) / (ms["needle"] / 1e3) / 1e9 / peak \
                if "needle" in ms else float("nan")

            def ratio(a, b):
                return f"{ms[a] / ms[b]:.2f}" if a in ms and b in ms else "-"
            print(f"{cell:7} {workload:8} " + " ".join(f"{ms.get(f, float('nan')):10.2f}" for f in args.frameworks)
                  + f"   {ratio('needle', 'jax'):>10} {ratio('needle', 'torch'):>12} "
                  f"{ratio('needle', 'reference'):>12} {100 * share:5.0f}%", flush=True)


if __name__ == "__main__":
    main()
