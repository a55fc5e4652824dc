"""Data-parallel scaling of the language-model benchmark over MPI.

Trains the 2-layer LSTM language model (embedding and hidden 200, seq_len 35, global batch 20) on the Penn
Treebank text in ../shared/data/ptb (ptb.valid.txt) for a fixed number of windows, three ways:
1 process with 1 BLAS thread, 2 processes with 1 BLAS thread each (each takes 10 of the 20 batch columns),
and 1 process with 2 BLAS threads. Prints tokens per second (global), the scaling factor against one
single-threaded process, and the time per step spent in all-reduce.

    python benchmarks/bench_distributed.py [--steps 40] [--repeat 3] [--data ../shared/data/ptb/ptb.valid.txt]

The machine may be shared: --repeat N runs the three setups in turn N times and shows each setup's fastest
run (the all-reduce column is that run's), listing every run below the table.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "..", "..", "shared", "data", "ptb", "ptb.valid.txt")


def worker(args):
    import needle as ndl  # first: sets OPENBLAS_THREAD_TIMEOUT before numpy loads (needle/__init__.py)
    import numpy as np
    from needle import distributed
    from needle.data import Dictionary, batchify
    from needle.models import LanguageModel
    from needle.training import epoch_general_ptb

    rank, size = distributed.init()
    dictionary = Dictionary()
    with open(args.data, encoding="utf-8") as f:
        ids = [dictionary.add_word(w) for line in f for w in line.split() + ["<eos>"]]
    batches = batchify(ids, args.batch_size)
    share = args.batch_size // size
    local = batches[:, rank * share:(rank + 1) * share]
    np.random.seed(0)
    model = LanguageModel(200, len(dictionary), 200, num_layers=2, seq_model="lstm")
    distributed.broadcast_parameters(model.parameters())
    opt = distributed.DistributedOptimizer(ndl.optim.SGD(model.parameters(), lr=20.0))

    def run(steps):
        epoch_general_ptb(local[:steps * args.seq_len + 1], model, args.seq_len, opt=opt, clip=0.25)

    run(3)  # warm-up
    opt.allreduce_seconds = 0.0
    start = time.perf_counter()
    run(args.steps)
    seconds = time.perf_counter() - start
    if distributed.is_main():
        tokens = args.steps * args.seq_len * args.batch_size
        print(json.dumps({"processes": size, "seconds": seconds, "tokens_per_s": tokens / seconds,
                          "allreduce_ms_per_step": 1e3 * opt.allreduce_seconds / args.steps}))


def launch(processes, threads, args):
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--steps", str(args.steps),
               "--data", args.data, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    if processes > 1:
        mpiexec = os.path.join(sysconfig.get_path("scripts"), "mpiexec")
        command = [mpiexec if os.path.exists(mpiexec) else shutil.which("mpiexec"), "-n", str(processes)] + command
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=35)
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per setup, in turn; the table shows each setup's fastest (all are listed)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    print(f"# {os.cpu_count()} cores, needle commit {commit}; {args.steps} windows of {args.seq_len} x "
          f"{args.batch_size} tokens; 2-layer LSTM LM, 200 units")
    setups = (("1 process, 1 BLAS thread", 1, 1), ("2 processes, 1 BLAS thread each", 2, 1),
              ("1 process, 2 BLAS threads", 1, 2))
    runs = {label: [] for label, _, _ in setups}
    for _ in range(args.repeat):          # the setups in turn, so that a slow spell of the machine hits all
        for label, processes, threads in setups:
            runs[label].append(launch(processes, threads, args))
    best = {label: max(results, key=lambda r: r["tokens_per_s"]) for label, results in runs.items()}
    base = best[setups[0][0]]["tokens_per_s"]
    print(f"{'setup':32} {'tokens/s':>9} {'scaling':>8} {'all-reduce ms/step':>19}")
    for label, _, _ in setups:
        result = best[label]
        print(f"{label:32} {result['tokens_per_s']:9.0f} {result['tokens_per_s'] / base:8.2f} "
              f"{result['allreduce_ms_per_step']:19.1f}")
    if args.repeat > 1:
        print(f"# the fastest of {args.repeat} runs each; every run's tokens/s (all-reduce ms/step):")
        for label, results in runs.items():
            print(f"#   {label}: " + ", ".join(f"{r['tokens_per_s']:.0f} ({r['allreduce_ms_per_step']:.1f})"
                                           for r in results))

if __name__ == "__main__":
    main()
