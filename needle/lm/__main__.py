"""needle-lm: train, evaluate and sample word-level recurrent language models from the command line.

    needle-lm train [--data DIR] [--out DIR] [--model rnn|lstm|gru] ... [--anneal F] [--patience N]
                    [--resume] [--grad-flow] [--detect-anomaly]
    mpirun -n K needle-lm train ...    (data-parallel: each process takes batch-size / K columns)
    needle-lm evaluate CHECKPOINT [--data DIR] [--split test|valid|train] [--json]
    needle-lm generate CHECKPOINT [--prompt TEXT] [--tokens N] [--temperature X] [--seed N]

Bad input ends with one line on stderr and exit status 2; a training loss that turns NaN or infinite ends
with one line and exit status 3.
"""
import argparse
import os
import sys

from . import commands
from .config import DEFAULTS, DEVICES, MODELS, OPTIMIZERS
from .errors import CLIError

__all__ = ["main", "build_parser"]


def _default(key):
    return f"default: {DEFAULTS[key]}"


def build_parser():
    parser = argparse.ArgumentParser(prog="needle-lm", description="Train, evaluate and sample word-level "
                                     "recurrent language models built with needle.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,generate}")

    # Every option of `train` defaults to None, so that the ones set on the command line can be told apart
    # (--resume warns about those); DEFAULTS fills in the rest.
    train = sub.add_parser("train", help="train a language model", description="Train a language model; "
                           "writes checkpoint.safetensors, best.safetensors, metrics.json and perplexity.png "
                           "to --out.")
    train.add_argument("--data", metavar="DIR", help="a corpus directory with train.txt, test.txt and "
                       "optionally valid.txt (default: the built-in corpus of Python's documentation topics)")
    train.add_argument("--out", metavar="DIR", default="runs/lm", help="output directory (default: runs/lm)")
    train.add_argument("--model", choices=MODELS, help=_default("model"))
    train.add_argument("--embedding-size", type=int, metavar="N", help=_default("embedding_size"))
    train.add_argument("--hidden-size", type=int, metavar="N", help=_default("hidden_size"))
    train.add_argument("--layers", type=int, metavar="N", help=_default("layers"))
    train.add_argument("--seq-len", type=int, metavar="N", help=f"BPTT window, {_default('seq_len')}")
    train.add_argument("--batch-size", type=int, metavar="N", help=_default("batch_size"))
    train.add_argument("--optimizer", choices=OPTIMIZERS, help=_default("optimizer"))
    train.add_argument("--lr", type=float, metavar="X", help=f"learning rate, {_default('lr')}")
    train.add_argument("--epochs", type=int, metavar="N", help=f"epochs in total, {_default('epochs')}")
    train.add_argument("--clip", type=float, metavar="X", help=f"max gradient norm, 0 for none, {_default('clip')}")
    train.add_argument("--dropout", type=float, metavar="X", help=_default("dropout"))
    train.add_argument("--tie-weights", action="store_true", default=None,
                       help="share the embedding with the output layer (needs embedding size == hidden size)")
    train.add_argument("--max-lines", type=int, metavar="N", help="read at most N lines of each split")
    train.add_argument("--seed", type=int, metavar="N", help=_default("seed"))
    train.add_argument("--device", choices=DEVICES, help=_default("device"))
    train.add_argument("--resume", action="store_true", help="continue the run in --out up to --epochs")
    train.add_argument("--anneal", type=float, metavar="F", help="divide the learning rate by F after an epoch "
                       f"without a better valid loss, 1 for never, {_default('anneal')}")
    train.add_argument("--patience", type=int, metavar="N", help="stop after N epochs in a row without a better "
                       f"valid loss, 0 for never, {_default('patience')}")
    train.add_argument("--grad-flow", action="store_true", help="record ||dL/dh_t|| per layer and step on each "
                       "epoch's first batch: grad_flow.json and grad_flow.png, and report NaN or inf")
    train.add_argument("--detect-anomaly", action="store_true", help="train under ndl.detect_anomaly(): name the "
                       "first op whose result or gradient turns NaN or infinite")

    evaluate = sub.add_parser("evaluate", help="perplexity of a split", description="Perplexity of a split.")
    evaluate.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file, or a run's directory (its "
                          "best.safetensors when there is one, else its checkpoint.safetensors)")
    evaluate.add_argument("--data", metavar="DIR", help="corpus directory (default: the one trained on)")
    evaluate.add_argument("--split", choices=("test", "valid", "train"), default="test", help="default: test")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")

    generate = sub.add_parser("generate", help="sample text", description="Print the prompt followed by "
                              "sampled words.")
    generate.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file, or a run's directory (its "
                          "best.safetensors when there is one, else its checkpoint.safetensors)")
    generate.add_argument("--prompt", metavar="TEXT", default="", help="text to start from (default: none)")
    generate.add_argument("--tokens", type=int, metavar="N", default=20, help="words to sample (default: 20)")
    generate.add_argument("--temperature", type=float, metavar="X", default=1.0, help="default: 1.0")
    generate.add_argument("--seed", type=int, metavar="N", help="the same seed gives the same text "
                          "(default: a fresh one)")
    return parser


def _run(args):
    if args.command == "train":
        given = {key: value for key, value in vars(args).items() if key in DEFAULTS and value is not None}
        if "data" in given:
            given["data"] = os.path.abspath(given["data"])
        commands.train(given, args.out, resume=args.resume, grad_flow=args.grad_flow,
                       detect_anomaly=args.detect_anomaly)
    elif args.command == "evaluate":
        commands.evaluate(args.checkpoint, data=args.data, split=args.split, as_json=args.json)
    else:
        commands.generate(args.checkpoint, prompt=args.prompt, tokens=args.tokens,
                          temperature=args.temperature, seed=args.seed)


def main(argv=None):
    """Run needle-lm with `argv` (default: sys.argv[1:]); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed help (0) or usage and one error line (2)
        return e.code if isinstance(e.code, int) else 2
    try:
        _run(args)
    except CLIError as e:
        print(f"needle-lm: error: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("needle-lm: interrupted (the last checkpoint stays; --resume continues it)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
