"""Train the same LSTM language model on Penn Treebank in needle and in PyTorch, side by side.

A 2-layer LSTM language model (embedding 200, hidden 200, BPTT window 35, batch 20) is trained for the same
number of epochs with the same recipe in both frameworks: plain SGD, gradient clipping on the global norm,
truncated BPTT with the state carried and detached across windows, the same batchify layout (column-major
split, target = next row) and, unless --torch-init is given, the very same initial weights (needle's model is
built from the seed and copied into torch). The training text is ptb.valid.txt and the test text
ptb.test.txt; the vocabulary is built over both with needle.data.Dictionary (`<eos>` after every line).

Each framework runs in a child process of its own (numpy's OpenBLAS and torch's OpenMP thread pools slow
each other down in one process), 2 threads each (--threads; the needle child gets OPENBLAS_NUM_THREADS; the
torch child keeps glibc's default malloc settings, NEEDLE_MALLOC_TUNING=0), and reports JSON; --same-process
runs both here, one after the other. Printed: per epoch train perplexity and seconds for both, test
perplexity for both and their ratio, total wall time for both and needle/torch.
The machine may be shared: --repeat N runs each framework N times, alternating, and the table shows each
framework's fastest run (every run's total is listed too; the perplexities do not change from run to run).

    python benchmarks/bench_lm_ptb.py
    python benchmarks/bench_lm_ptb.py --epochs 1 --lr 20
    python benchmarks/bench_lm_ptb.py --framework needle --epochs 1   # one side only, JSON on stdout
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import needle  # noqa: F401  first: sets OPENBLAS_THREAD_TIMEOUT before numpy loads (needle/__init__.py)
import numpy as np

# ../shared beside the repository, as in the project layout
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "ptb")
FRAMEWORKS = ("needle", "torch")


def load_ptb(data_dir, max_lines=None):
    """(train ids, test ids, vocabulary size): ptb.valid.txt is the training text, ptb.test.txt the test text."""
    from needle.data import Dictionary

    dictionary = Dictionary()
    splits = []
    for name in ("ptb.valid.txt", "ptb.test.txt"):
        ids = []
        with open(os.path.join(data_dir, name), encoding="utf-8") as f:
            for n, line in enumerate(f):
                if max_lines is not None and n >= max_lines:
                    break
                ids.extend(dictionary.add_word(word) for word in line.split() + ["<eos>"])
        splits.append(ids)
    return splits[0], splits[1], len(dictionary)


def build_needle_model(args, vocab):
    """needle's LanguageModel, drawn from numpy's RNG seeded with args.seed."""
    from needle.models import LanguageModel

    np.random.seed(args.seed)
    return LanguageModel(args.embedding, vocab, args.hidden, num_layers=args.layers, seq_model="lstm",
                         seq_len=args.seq_len)


def perplexity(loss):
    return math.exp(min(loss, 700.0))


# ---- needle --------------------------------------------------------------------------------------------

def run_needle(args):
    import needle as ndl
    from needle.data import batchify
    from needle.training import epoch_general_ptb, evaluate_ptb

    train_ids, test_ids, vocab = load_ptb(args.data, args.max_lines)
    train = batchify(train_ids, args.batch_size)
    test = batchify(test_ids, args.eval_batch_size)
    model = build_needle_model(args, vocab)
    opt = ndl.optim.SGD(model.parameters(), lr=args.lr, momentum=0.0)
    epochs = []
    start = time.perf_counter()
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        acc, loss = epoch_general_ptb(train, model, seq_len=args.seq_len, loss_fn=ndl.nn.SoftmaxLoss(), opt=opt,
                                      clip=args.clip)
        epochs.append({"loss": loss, "ppl": perplexity(loss), "acc": acc, "seconds": time.perf_counter() - t0})
        _log(args, "needle", epochs)
    train_seconds = time.perf_counter() - start
    t0 = time.perf_counter()
    test_acc, test_loss = evaluate_ptb(model, test, seq_len=args.seq_len)
    eval_seconds = time.perf_counter() - t0
    return _result("needle", vocab, train, epochs, train_seconds, test_loss, test_acc, eval_seconds)


# ---- torch ---------------------------------------------------------------------------------------------

def _torch_model_class():
    import torch

    class TorchLM(torch.nn.Module):
        """Embedding -> LSTM -> Linear, the layout of needle.models.LanguageModel."""

        def __init__(self, vocab, embedding, hidden, layers):
            super().__init__()
            self.embedding = torch.nn.Embedding(vocab, embedding)
            self.lstm = torch.nn.LSTM(embedding, hidden, layers)
            self.linear = torch.nn.Linear(hidden, vocab)

        def forward(self, x, h=None):
            out, h = self.lstm(self.embedding(x), h)
            return self.linear(out.reshape(-1, out.shape[-1])), h

    return TorchLM


def copy_needle_weights(needle_model, torch_model):
    """needle stores weights input-major (the transpose of torch's); LSTM gate order i, f, g, o in both."""
    import torch

    def put(dst, src, transpose=False):
        src = src.numpy()
        src = src.T if transpose else src.reshape(dst.shape)
        with torch.no_grad():
            dst.copy_(torch.from_numpy(np.ascontiguousarray(src)))

    put(torch_model.embedding.weight, needle_model.embedding.weight)
    for l, cell in enumerate(needle_model.seq.lstm_cells):
        put(getattr(torch_model.lstm, f"weight_ih_l{l}"), cell.W_ih, transpose=True)
        put(getattr(torch_model.lstm, f"weight_hh_l{l}"), cell.W_hh, transpose=True)
        put(getattr(torch_model.lstm, f"bias_ih_l{l}"), cell.bias_ih)
        put(getattr(torch_model.lstm, f"bias_hh_l{l}"), cell.bias_hh)
    put(torch_model.linear.weight, needle_model.linear.weight, transpose=True)
    put(torch_model.linear.bias, needle_model.linear.bias)


def torch_epoch(model, data, seq_len, opt=None, clip=None):
    """needle.training.epoch_general_ptb by hand: returns (average accuracy, average loss) over the tokens."""
    import torch

    training = opt is not None
    model.train(training)
    loss_fn = torch.nn.CrossEntropyLoss()
    total_loss, total_correct, total_tokens = 0.0, 0, 0
    h = None
    with torch.set_grad_enabled(training):
        for i in range(0, data.shape[0] - 1, seq_len):
            length = min(seq_len, data.shape[0] - 1 - i)
            x, y = data[i:i + length], data[i + 1:i + 1 + length].reshape(-1)
            logits, h = model(x, h)
            loss = loss_fn(logits, y)
            if training:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
            h = tuple(s.detach() for s in h)
            tokens = y.shape[0]
            total_loss += loss.item() * tokens
            total_correct += int((logits.argmax(dim=1) == y).sum())
            total_tokens += tokens
    return total_correct / total_tokens, total_loss / total_tokens


def run_torch(args):
    import torch
    from needle.data import batchify

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_ids, test_ids, vocab = load_ptb(args.data, args.max_lines)
    train = torch.from_numpy(batchify(train_ids, args.batch_size, dtype="int64"))
    test = torch.from_numpy(batchify(test_ids, args.eval_batch_size, dtype="int64"))
    model = _torch_model_class()(vocab, args.embedding, args.hidden, args.layers)
    if not args.torch_init:
        copy_needle_weights(build_needle_model(args, vocab), model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.0)
    epochs = []
    start = time.perf_counter()
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        acc, loss = torch_epoch(model, train, args.seq_len, opt, args.clip)
        epochs.append({"loss": loss, "ppl": perplexity(loss), "acc": acc, "seconds": time.perf_counter() - t0})
        _log(args, "torch", epochs)
    train_seconds = time.perf_counter() - start
    t0 = time.perf_counter()
    with torch.no_grad():
        test_acc, test_loss = torch_epoch(model.eval(), test, args.seq_len)
    eval_seconds = time.perf_counter() - t0
    return _result("torch", vocab, train, epochs, train_seconds, test_loss, test_acc, eval_seconds)


# ---- reporting -----------------------------------------------------------------------------------------

def _log(args, name, epochs):
    e = epochs[-1]
    print(f"  [{name}] epoch {len(epochs)}/{args.epochs}: train ppl {e['ppl']:.2f}, {e['seconds']:.1f} s",
          file=sys.stderr, flush=True)


def _result(name, vocab, train, epochs, train_seconds, test_loss, test_acc, eval_seconds):
    return {"framework": name, "vocab": vocab, "train_shape": list(train.shape), "epochs": epochs,
            "train_seconds": train_seconds, "test_loss": test_loss, "test_ppl": perplexity(test_loss),
            "test_acc": test_acc, "eval_seconds": eval_seconds, "total_seconds": train_seconds + eval_seconds}


def run_child(args, framework):
    """Run one framework in a fresh interpreter and return its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--framework", framework] + _forwarded(args)
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(args.threads))  # read when numpy loads
    if framework == "torch":
        # the torch child imports needle for the data and the initial weights: keep glibc's malloc as a
        # PyTorch user has it (needle's import would otherwise tune it for torch too, needle/__init__.py)
        env["NEEDLE_MALLOC_TUNING"] = "0"
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"bench_lm_ptb: the {framework} child failed with status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _forwarded(args):
    out = []
    for key in ("data", "epochs", "lr", "clip", "seq_len", "batch_size", "eval_batch_size", "embedding", "hidden",
                "layers", "seed", "max_lines", "threads"):
        value = getattr(args, key)
        if value is not None:
            out += ["--" + key.replace("_", "-"), str(value)]
    if args.torch_init:
        out.append("--torch-init")
    return out


def machine_line(threads):
    import torch

    torch.set_num_threads(threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    return (f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
            f"{platform.python_version()}, numpy {np.__version__}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads; numpy {threads} in the needle child), needle commit {commit}"
            + (" (+ local changes)" if dirty else ""))


def report(args, results):
    n, t = results["needle"], results["torch"]
    print(machine_line(args.threads))
    mode = "one process" if args.same_process else "separate processes"
    print(f"# PTB LM: train ptb.valid.txt {n['train_shape'][0]}x{n['train_shape'][1]} ids, test ptb.test.txt, "
          f"vocab {n['vocab']}; LSTM {args.layers}x{args.hidden}, embedding {args.embedding}, seq_len "
          f"{args.seq_len}, batch {args.batch_size} (test {args.eval_batch_size}); SGD lr {args.lr}, clip "
          f"{args.clip}, {args.epochs} epochs, seed {args.seed}; "
          f"{'torch default init' if args.torch_init else 'same initial weights'}; {mode}")
    print(f"{'epoch':>5} {'needle ppl':>11} {'torch ppl':>10} {'ppl ratio':>9} {'needle s':>9} {'torch s':>8} "
          f"{'time ratio':>10}")
    for k, (a, b) in enumerate(zip(n["epochs"], t["epochs"]), 1):
        print(f"{k:5d} {a['ppl']:11.2f} {b['ppl']:10.2f} {a['ppl'] / b['ppl']:9.4f} {a['seconds']:9.2f} "
              f"{b['seconds']:8.2f} {a['seconds'] / b['seconds']:10.3f}")
    print(f"{'test':>5} {n['test_ppl']:11.2f} {t['test_ppl']:10.2f} {n['test_ppl'] / t['test_ppl']:9.4f} "
          f"{n['eval_seconds']:9.2f} {t['eval_seconds']:8.2f} {n['eval_seconds'] / t['eval_seconds']:10.3f}")
    ratio = n["test_ppl"] / t["test_ppl"]
    speed = n["total_seconds"] / t["total_seconds"]
    print(f"test ppl: needle {n['test_ppl']:.2f}, torch {t['test_ppl']:.2f}, needle/torch {ratio:.4f} "
          f"({'within' if abs(ratio - 1) <= 0.02 else 'OUTSIDE'} 2%)")
    print(f"total wall time (train + test): needle {n['total_seconds']:.1f} s, torch {t['total_seconds']:.1f} s, "
          f"needle/torch {speed:.3f} ({'meets' if speed <= 1 else 'misses'} <= 1)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DATA, help="directory with ptb.valid.txt and ptb.test.txt")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=20.0)
    parser.add_argument("--clip", type=float, default=0.25)
    parser.add_argument("--seq-len", type=int, default=35)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--eval-batch-size", type=int, default=10, help="test batch (PyTorch's example uses 10)")
    parser.add_argument("--embedding", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, and numpy's in the needle child")
    parser.add_argument("--max-lines", type=int, default=None, help="read at most this many lines per file")
    parser.add_argument("--torch-init", action="store_true",
                        help="leave torch's own initial weights instead of copying needle's")
    parser.add_argument("--framework", choices=FRAMEWORKS, help="run one framework only and print its JSON")
    parser.add_argument("--same-process", action="store_true", help="run both frameworks in this process")
    parser.add_argument("--repeat", type=int, default=1, help="runs per framework; the fastest is shown")
    args = parser.parse_args()

    runners = {"needle": run_needle, "torch": run_torch}
    if args.framework:
        print(json.dumps(runners[args.framework](args)))
        return
    load_before = os.getloadavg()[0]
    runs = {name: [] for name in FRAMEWORKS}
    for _ in range(args.repeat):
        for name in FRAMEWORKS:
            runs[name].append(runners[name](args) if args.same_process else run_child(args, name))
    report(args, {name: min(r, key=lambda result: result["total_seconds"]) for name, r in runs.items()})
    if args.repeat > 1:
        for name, r in runs.items():
            print(f"# {name} totals over {args.repeat} runs: " + ", ".join(f"{x['total_seconds']:.1f} s" for x in r))
    # the machine is shared: a load well above 0 at either end makes the timings suspect
    print(f"# 1-minute load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
