"""A training run's configuration: its defaults and the checks that reject nonsensical values.

The configuration is a flat dict whose keys are the `train` options' names; it is stored in every
checkpoint, and `--resume`, `evaluate` and `generate` rebuild the run from it.
"""
import math
import numbers

from .errors import CLIError

__all__ = ["BUILTIN", "DEFAULTS", "MODELS", "OPTIMIZERS", "DEVICES", "option_flag", "validate_config"]

BUILTIN = "builtin"  # the `data` of a run on the built-in corpus
MODELS = ("rnn", "lstm", "gru")
OPTIMIZERS = ("sgd", "adam")
DEVICES = ("cpu", "cuda")

# A one-layer LSTM that learns the built-in corpus (92k train tokens, 1,778 words) in about a minute on two
# idle CPU cores: validation perplexity falls from about 40 after the first epoch to about 17 after the tenth.
DEFAULTS = {
    "data": BUILTIN,
    "model": "lstm",
    "embedding_size": 128,
    "hidden_size": 200,
    "layers": 1,
    "seq_len": 35,
    "batch_size": 20,
    "optimizer": "adam",
    "lr": 3e-3,
    "epochs": 10,
    "clip": 0.25,
    "dropout": 0.3,
    "tie_weights": False,
    "max_lines": None,
    "seed": 0,
    "device": "cpu",
    "anneal": 4.0,   # the learning rate is divided by this after an epoch without a better valid loss
    "patience": 0,   # stop after this many such epochs in a row (0: never)
}

_AT_LEAST_ONE = ("embedding_size", "hidden_size", "layers", "seq_len", "batch_size")


def option_flag(key):
    """The command-line option of a config key: embedding_size -> --embedding-size."""
    return "--" + key.replace("_", "-")


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate_config(config):
    """Raise CLIError naming the first option whose value makes no sense; return `config`."""
    missing = sorted(set(DEFAULTS) - set(config))
    if missing:
        raise CLIError(f"configuration lacks {', '.join(missing)}")
    for key, choices in (("model", MODELS), ("optimizer", OPTIMIZERS), ("device", DEVICES)):
        if config[key] not in choices:
            raise CLIError(f"{option_flag(key)} must be one of {', '.join(choices)}, got {config[key]!r}")
    for key in _AT_LEAST_ONE:
        if not _is_int(config[key]) or config[key] < 1:
            raise CLIError(f"{option_flag(key)} must be a whole number of at least 1, got {config[key]!r}")
    if not _is_int(config["epochs"]) or config["epochs"] < 0:
        raise CLIError(f"--epochs must be a whole number of at least 0, got {config['epochs']!r}")
    if config["max_lines"] is not None and (not _is_int(config["max_lines"]) or config["max_lines"] < 1):
        raise CLIError(f"--max-lines must be a whole number of at least 1, got {config['max_lines']!r}")
    if not _is_int(config["seed"]) or not 0 <= config["seed"] < 2**32:
        raise CLIError(f"--seed must be a whole number in [0, 2**32), got {config['seed']!r}")
    if not _is_real(config["lr"]) or not (config["lr"] > 0 and math.isfinite(config["lr"])):
        raise CLIError(f"--lr must be a number above 0, got {config['lr']!r}")
    if not _is_real(config["clip"]) or not (config["clip"] >= 0 and math.isfinite(config["clip"])):
        raise CLIError(f"--clip must be a number of at least 0 (0: no clipping), got {config['clip']!r}")
    if not _is_real(config["anneal"]) or not (config["anneal"] >= 1 and math.isfinite(config["anneal"])):
        raise CLIError(f"--anneal must be a number of at least 1 (1: keep the learning rate), got "
                       f"{config['anneal']!r}")
    if not _is_int(config["patience"]) or config["patience"] < 0:
        raise CLIError(f"--patience must be a whole number of at least 0 (0: never stop early), got "
                       f"{config['patience']!r}")
    if not _is_real(config["dropout"]) or not 0 <= config["dropout"] < 1:
        raise CLIError(f"--dropout must lie in [0, 1), got {config['dropout']!r}")
    if not isinstance(config["tie_weights"], bool):
        raise CLIError(f"--tie-weights must be true or false, got {config['tie_weights']!r}")
    if config["tie_weights"] and config["embedding_size"] != config["hidden_size"]:
        raise CLIError(f"--tie-weights needs --embedding-size equal to --hidden-size, got "
                       f"{config['embedding_size']} and {config['hidden_size']}")
    if not isinstance(config["data"], str) or not config["data"]:
        raise CLIError(f"--data must be a directory or {BUILTIN!r}, got {config['data']!r}")
    return config
