"""The checkpoint: one safetensors file holding everything a run needs to go on, and nothing pickled.

Tensors: `weight.<attribute path>` for every parameter (float32, in `parameters()` order), `optimizer.<key>`
for the arrays of `optimizer.state_dict()`, and `rng.keys` (numpy's MT19937 key, as int64). The header's
metadata (string -> string) holds `needle-lm`, a JSON object with the format tag, the config, the
vocabulary (idx2word), the epoch, the metrics so far, the learning rate the next epoch trains with, the
weight order, the optimiser's numbers and the rest of numpy's RNG state. It is one entry because
safetensors writes its metadata map in no fixed order: one entry keeps the file's bytes a function of its
content. Anything that does not read back as exactly that is rejected as corrupt or foreign with a CLIError.
best.safetensors, the run at its best valid loss so far, has the same format.
"""
import json
import math
import numbers
import os
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load as _load_tensors
from safetensors.numpy import save as _save_tensors

from .. import nn
from ..backend_ndarray import NDArray
from .config import validate_config
from .corpus_builtin import EOS, UNK
from .errors import CLIError
from .files import atomic_write

__all__ = ["FILENAME", "BEST", "FORMAT", "Checkpoint", "checkpoint_file", "model_file", "named_parameters",
           "save_checkpoint", "checkpoint_bytes", "load_checkpoint", "load_weights", "load_optimizer_state"]

FILENAME = "checkpoint.safetensors"
BEST = "best.safetensors"  # the epoch with the best valid loss so far, in the same format
FORMAT = "needle-lm/1"
_META = "needle-lm"
# options added after FORMAT was fixed, with the values that reproduce a run made before they existed
_LATER_OPTIONS = {"anneal": 1.0, "patience": 0}


@dataclass
class Checkpoint:
    """A run after `epoch` epochs. `weights` maps attribute paths to float32 arrays in parameters() order;
    `optimizer_state` is optimizer.state_dict(); `rng_state` is np.random.get_state(); `lr` is the learning
    rate the next epoch trains with (None: the config's)."""

    config: dict
    vocab: list
    epoch: int
    metrics: list
    weights: dict
    optimizer_state: dict
    rng_state: tuple
    lr: float = None

    @classmethod
    def capture(cls, model, optimizer, config, vocab, epoch, metrics, lr=None):
        """The run as it stands now, numpy's global RNG included."""
        weights = {name: p.numpy() for name, p in named_parameters(model)}
        return cls(dict(config), list(vocab), epoch, [dict(row) for row in metrics], weights,
                   dict(optimizer.state_dict()), np.random.get_state(), lr)


def checkpoint_file(path):
    """CHECKPOINT names the file or the directory holding it."""
    path = os.fspath(path)
    return os.path.join(path, FILENAME) if os.path.isdir(path) else path


def model_file(path):
    """The weights `evaluate` and `generate` use: a file as given; in a directory its best.safetensors when
    there is one, else its checkpoint.safetensors."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, BEST)):
        return os.path.join(path, BEST)
    return checkpoint_file(path)


def named_parameters(module):
    """[(attribute path, Parameter)] in `module.parameters()` order; a shared parameter keeps its first name."""
    named, seen = [], set()

    def walk(value, path):
        if isinstance(value, nn.Parameter):
            if id(value) not in seen:
                seen.add(id(value))
                named.append((path, value))
        elif isinstance(value, nn.Module):
            walk(value.__dict__, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}" if path else str(key))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{path}.{i}")

    walk(module, "")
    assert [id(p) for _, p in named] == [id(p) for p in module.parameters()], "parameter order differs"
    return named


def save_checkpoint(path, checkpoint):
    """Write `checkpoint` to `path` atomically (temporary file, fsync, rename)."""
    data = checkpoint_bytes(checkpoint)
    atomic_write(path, lambda f: f.write(data))


def checkpoint_bytes(checkpoint):
    """The file's bytes: a function of the checkpoint's content."""
    tensors = {f"weight.{name}": np.ascontiguousarray(a, dtype=np.float32) for name, a in checkpoint.weights.items()}
    numbers_ = {}
    for key, value in checkpoint.optimizer_state.items():
        if isinstance(value, np.ndarray):
            tensors[f"optimizer.{key}"] = np.ascontiguousarray(value)
        else:
            numbers_[key] = value.item() if isinstance(value, np.generic) else value
    kind, keys, pos, has_gauss, cached_gaussian = checkpoint.rng_state
    tensors["rng.keys"] = np.asarray(keys, dtype=np.int64)  # safetensors has no uint32
    meta = {
        "format": FORMAT,
        "config": checkpoint.config,
        "vocab": checkpoint.vocab,
        "epoch": checkpoint.epoch,
        "metrics": checkpoint.metrics,
        "weights": list(checkpoint.weights),
        "optimizer_numbers": numbers_,
        "rng": [kind, int(pos), int(has_gauss), float(cached_gaussian)],
        "lr": None if checkpoint.lr is None else float(checkpoint.lr),
    }
    return _save_tensors(tensors, metadata={_META: json.dumps(meta)})


class _Foreign(Exception):
    """What is wrong with a file that is not one of our checkpoints."""


def load_checkpoint(path):
    """Read and check a checkpoint; CLIError if it is missing, corrupt or foreign."""
    path = checkpoint_file(path)
    if not os.path.isfile(path):
        raise CLIError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CLIError(f"cannot read checkpoint {path}: {e.strerror}") from None
    try:
        return _parse(data)
    except _Foreign as e:
        raise CLIError(f"corrupt or foreign checkpoint {path}: {e}") from None


def _parse(data):
    if len(data) < 8:
        raise _Foreign("too short to be a safetensors file")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise _Foreign("not a safetensors file, or a truncated one (header runs past the end)")
    try:
        header = json.loads(data[8 : 8 + size])
    except (ValueError, UnicodeDecodeError):
        raise _Foreign("not a safetensors file (unreadable header)") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not isinstance(metadata.get(_META), str):
        raise _Foreign("a safetensors file without needle-lm metadata")
    try:
        tensors = _load_tensors(data)
    except Exception as e:  # safetensors reports every malformed file with its own exception type
        raise _Foreign(f"unreadable tensors ({e})") from None
    try:
        meta = json.loads(metadata[_META])
    except ValueError:
        raise _Foreign("unreadable needle-lm metadata") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _Foreign(f"unreadable needle-lm metadata (expected format {FORMAT!r})")
    return _build(meta, tensors)


def _get(meta, key, kind):
    value = meta.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise _Foreign(f"metadata field {key!r} is missing or has the wrong type")
    return value


def _build(meta, tensors):
    config = _get(meta, "config", dict)
    for key, value in _LATER_OPTIONS.items():
        config.setdefault(key, value)
    try:
        validate_config(config)
    except CLIError as e:
        raise _Foreign(f"bad configuration: {e}") from None
    vocab = _get(meta, "vocab", list)
    if not all(isinstance(w, str) for w in vocab) or len(set(vocab)) != len(vocab) or not {UNK, EOS} <= set(vocab):
        raise _Foreign(f"the vocabulary must be distinct words including {UNK} and {EOS}")
    epoch = _get(meta, "epoch", int)
    metrics = _get(meta, "metrics", list)
    if epoch < 0 or len(metrics) != epoch or not all(isinstance(row, dict) for row in metrics):
        raise _Foreign(f"epoch {epoch} does not match its {len(metrics)} rows of metrics")
    names = _get(meta, "weights", list)
    numbers_ = _get(meta, "optimizer_numbers", dict)
    rng = _get(meta, "rng", list)
    lr = meta.get("lr")
    if lr is not None and not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 <= lr < math.inf):
        raise _Foreign(f"the learning rate must be a number of at least 0, got {lr!r}")

    expected = {f"weight.{name}" for name in names} | {"rng.keys"}
    unexpected = [k for k in tensors if k not in expected and not k.startswith("optimizer.")]
    missing = [k for k in expected if k not in tensors]
    if unexpected or missing:
        raise _Foreign(f"tensors do not match the metadata (missing {missing[:3]}, unexpected {unexpected[:3]})")
    weights = {}
    for name in names:
        array = tensors[f"weight.{name}"]
        if array.dtype != np.float32:
            raise _Foreign(f"weight {name} is {array.dtype}, not float32")
        weights[name] = array
    optimizer_state = {k[len("optimizer."):]: a for k, a in tensors.items() if k.startswith("optimizer.")}
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in numbers_.values()):
        raise _Foreign("optimizer numbers must be numbers")
    optimizer_state.update(numbers_)

    keys = tensors["rng.keys"]
    if (len(rng) != 4 or rng[0] != "MT19937" or keys.shape != (624,) or keys.dtype != np.int64
            or keys.min() < 0 or keys.max() >= 2**32 or not all(isinstance(x, int) for x in rng[1:3])
            or not isinstance(rng[3], (int, float))):
        raise _Foreign("unreadable random state")
    rng_state = ("MT19937", keys.astype(np.uint32), rng[1], rng[2], float(rng[3]))
    return Checkpoint(config, vocab, epoch, metrics, weights, optimizer_state, rng_state,
                      None if lr is None else float(lr))


def load_weights(model, weights, source):
    """Copy `weights` into `model`; CLIError naming `source` if a name or shape does not fit."""
    named = named_parameters(model)
    missing = [name for name, _ in named if name not in weights]
    unexpected = [name for name in weights if name not in dict(named)]
    if missing or unexpected:
        raise CLIError(f"foreign checkpoint {source}: its weights do not fit the configured model "
                       f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, p in named:
        if weights[name].shape != p.shape:
            raise CLIError(f"foreign checkpoint {source}: weight {name} has shape {weights[name].shape}, "
                           f"the configured model needs {p.shape}")
    for name, p in named:
        p.cached_data = NDArray(weights[name], device=p.device, dtype=p.dtype)


def load_optimizer_state(optimizer, state, source):
    """optimizer.load_state_dict, after checking that every per-parameter array fits its parameter.

    The optimisers key their state `<name>.<parameter index>`."""
    for key, value in state.items():
        if not isinstance(value, np.ndarray):
            continue
        index = key.rpartition(".")[2]
        if not index.isdigit() or int(index) >= len(optimizer.params) \
                or value.shape != optimizer.params[int(index)].shape:
            raise CLIError(f"foreign checkpoint {source}: optimizer state {key} does not fit the model")
    optimizer.load_state_dict(state)
