"""The commands: train, evaluate and generate, thin over needle.models.LanguageModel and needle.training.

Each takes plain values (parsed by __main__), prints its results on stdout and its progress, notes and
warnings on stderr, and raises CLIError for bad input.
"""
import json
import math
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from .. import distributed, nn, optim
from ..autograd import Tensor, no_grad
from ..backend_ndarray import cpu, cuda
from ..data import batchify
from ..models import LanguageModel
from ..training import epoch_general_ptb, perplexity
from .checkpoint import (FILENAME, Checkpoint, checkpoint_file, load_checkpoint, load_optimizer_state, load_weights,
                         save_checkpoint)
from .config import BUILTIN, DEFAULTS, option_flag, validate_config
from .corpus import Encoder, build_vocab, check_nonempty, prompt_words, read_splits
from .corpus_builtin import EOS
from .errors import CLIError, note, warn
from .files import write_json
from .grad_flow import GRAD_FLOW_JSON, GRAD_FLOW_PNG, first_nonfinite, save_grad_flow
from .plots import plot_perplexity

__all__ = ["METRICS", "PLOT", "train", "evaluate", "generate", "build_model", "run_epoch"]

METRICS, PLOT = "metrics.json", "perplexity.png"


def _device(name, fall_back=False):
    device = cpu() if name == "cpu" else cuda()
    if device.enabled():
        return device
    if fall_back:
        note(f"device {name} is not available here: running on cpu")
        return cpu()
    raise CLIError(f"device {name} is not available (needle.{name}().enabled() is False)")


def build_model(config, vocab_size, device):
    return LanguageModel(config["embedding_size"], vocab_size, config["hidden_size"], config["layers"],
                         config["model"], config["seq_len"], device=device, dropout=config["dropout"],
                         tie_weights=config["tie_weights"])


def _optimizer(config, model):
    kind = optim.SGD if config["optimizer"] == "sgd" else optim.Adam
    return kind(model.parameters(), lr=config["lr"])


def _batchify(ids, batch_size, split, training=False):
    """(nbatch, bs) ids; an evaluated split too short for the batch size gets fewer columns."""
    if not training:
        batch_size = min(batch_size, len(ids) // 2)
    if batch_size < 1 or len(ids) < 2 * batch_size:
        raise CLIError(f"the {split} split is too short: {len(ids)} tokens" +
                       (f", --batch-size {batch_size} needs at least {2 * batch_size}" if training else ""))
    return batchify(ids, batch_size)


def run_epoch(data, model, config, device, opt=None, desc="", on_first_window=None):
    """One pass of epoch_general_ptb under a tqdm bar (stderr, rank 0 only) showing loss, perplexity and
    tokens/s. Under mpirun each rank passes its own columns and the results are summed over the ranks.

    Returns (accuracy, loss, predicted tokens, seconds) of all ranks together."""
    size = distributed.world_size()
    seen = {"tokens": 0, "loss": 0.0}
    total = (data.shape[0] - 1) * data.shape[1] * size
    with tqdm(total=total, desc=desc, unit="tok", unit_scale=True, file=sys.stderr, leave=False,
              dynamic_ncols=True, disable=not distributed.is_main()) as bar:
        def progress(tokens, loss_sum):
            if seen["tokens"] == 0 and on_first_window is not None:
                on_first_window()
            seen["tokens"] += tokens
            seen["loss"] += loss_sum
            loss = seen["loss"] / seen["tokens"]
            bar.set_postfix(loss=f"{loss:.3f}", ppl=f"{perplexity(loss):.1f}", refresh=False)
            bar.update(tokens * size)

        start = time.perf_counter()
        accuracy, loss = epoch_general_ptb(data, model, config["seq_len"], nn.SoftmaxLoss(), opt,
                                           config["clip"] or None, device, progress=progress)
        bar.refresh()  # draw the final loss and perplexity even when the epoch beat tqdm's refresh interval
    tokens = seen["tokens"]
    if size > 1:
        correct, loss_sum, tokens = distributed.allreduce_sum([accuracy * tokens, loss * tokens, tokens])
        accuracy, loss, tokens = correct / tokens, loss_sum / tokens, int(tokens)
    return accuracy, loss, tokens, time.perf_counter() - start


def _shard(data):
    """This rank's share of the batch columns (all of them in a single process)."""
    rank, size = distributed.init()
    share = data.shape[1] // size
    return data[:, rank * share:(rank + 1) * share]


def _make_out_dir(out):
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create the output directory {out}: {e.strerror}") from None


def _save_run(out, model, opt, config, vocab, epoch, metrics):
    """Checkpoint first: metrics.json and the plot never run ahead of it."""
    save_checkpoint(os.path.join(out, FILENAME), Checkpoint.capture(model, opt, config, vocab, epoch, metrics))
    write_json(os.path.join(out, METRICS), metrics)
    corpus = "the built-in corpus" if config["data"] == BUILTIN else os.path.basename(config["data"])
    plot_perplexity(os.path.join(out, PLOT), metrics, title=f"needle-lm: {config['model']} on {corpus}")


def _training_data(config, vocab=None):
    """(vocab, train batches, validation batches, the split validated on) of a run; a fresh run (vocab None)
    builds its vocabulary from the data."""
    splits = read_splits(config["data"], config["max_lines"])
    check_nonempty(splits["train"], config["data"], "train")
    valid_split = "valid" if splits["valid"] is not None else "test"
    check_nonempty(splits[valid_split], config["data"], valid_split)
    if valid_split == "test":
        note(f"no valid.txt in {config['data']}: validating on the test split")
    vocab = build_vocab(splits) if vocab is None else vocab
    encoder = Encoder(vocab)
    train_ids, valid_ids = encoder.encode(splits["train"]), encoder.encode(splits[valid_split])
    encoder.warn_unknown()
    train_data = _batchify(train_ids, config["batch_size"], "train", training=True)
    return vocab, train_data, _batchify(valid_ids, config["batch_size"], valid_split), valid_split


def train(given, out, resume=False, grad_flow=False):
    """Train a language model (options in `given`, the ones set on the command line) into `out`.

    With `resume`, the checkpoint in `out` supplies the configuration (only `epochs` is read from `given`)
    and the run goes on to `epochs` in total, ending where an uninterrupted run ends. With `grad_flow`, the
    recurrent layers record ||dL/dh_t|| and each epoch's first batch goes to grad_flow.json and .png.
    Under `mpirun -n K` every rank trains on batch-size / K of the columns and rank 0 alone writes.
    """
    rank, world = distributed.init()
    path = os.path.join(out, FILENAME)
    checkpoint = None
    if resume:
        if not os.path.isfile(path):
            raise CLIError(f"--resume: no checkpoint in {out} ({FILENAME} not found)")
        checkpoint = load_checkpoint(path)
        config = dict(checkpoint.config)
        validate_config({**config, **given})  # nonsense is an error even where it would be ignored
        ignored = [f"{option_flag(k)} {v}" for k, v in given.items() if k != "epochs" and v != config[k]]
        if ignored:
            warn(f"--resume keeps the checkpoint's configuration; ignoring {', '.join(ignored)}")
        config["epochs"] = given.get("epochs", config["epochs"])
    else:
        config = validate_config({**DEFAULTS, **given})
    if config["batch_size"] % world:
        raise CLIError(f"--batch-size {config['batch_size']} must be divisible by the {world} processes of mpirun")
    device = _device(config["device"])
    main_rank = rank == 0
    if main_rank:
        _make_out_dir(out)

    np.random.seed(config["seed"])
    vocab, train_data, valid_data, valid_split = _training_data(config, checkpoint.vocab if checkpoint else None)
    train_data, valid_data = _shard(train_data), _shard(valid_data[:, :valid_data.shape[1] // world * world])
    model = build_model(config, len(vocab), device)
    opt = _optimizer(config, model)
    metrics, done = [], 0
    if checkpoint:
        load_weights(model, checkpoint.weights, path)
        load_optimizer_state(opt, checkpoint.optimizer_state, path)
        np.random.set_state(checkpoint.rng_state)
        metrics, done = list(checkpoint.metrics), checkpoint.epoch
        if done >= config["epochs"]:
            if main_rank:
                print(f"{path} is at epoch {done} of --epochs {config['epochs']}: nothing to train")
            return
        if main_rank:
            print(f"resuming {path} at epoch {done + 1} of {config['epochs']}")
    else:
        if os.path.isfile(path):
            note(f"a fresh run replaces {path} (--resume continues it)")
        size = sum(int(np.prod(p.shape)) for p in model.parameters())
        if main_rank:
            print(f"{config['model']} language model, {size:,} parameters, vocabulary {len(vocab):,}, "
                  f"{train_data.size * world:,} train and {valid_data.size * world:,} {valid_split} tokens")
        if config["epochs"] == 0 and main_rank:
            _save_run(out, model, opt, config, vocab, 0, metrics)
    if world > 1:
        distributed.broadcast_parameters(model.parameters())
        opt = distributed.DistributedOptimizer(opt)
    flows = _grad_flow_history(out, done) if grad_flow else None
    model.seq.record_grad_flow = grad_flow

    epochs = config["epochs"]
    for epoch in range(done + 1, epochs + 1):
        def capture(epoch=epoch):
            flows.append({"epoch": epoch, "grad_flow": model.seq.grad_flow.copy()})
        _, train_loss, tokens, train_seconds = run_epoch(train_data, model, config, device, opt,
                                                         desc=f"epoch {epoch}/{epochs}",
                                                         on_first_window=capture if grad_flow else None)
        _, valid_loss, _, valid_seconds = run_epoch(valid_data, model, config, device, desc=valid_split)
        row = {"epoch": epoch, "train_loss": train_loss, "train_ppl": perplexity(train_loss),
               "valid_loss": valid_loss, "valid_ppl": perplexity(valid_loss),
               "seconds": train_seconds + valid_seconds, "tokens_per_s": tokens / train_seconds}
        metrics.append(row)
        if not main_rank:
            continue
        print(f"epoch {epoch:3d}/{epochs} | train loss {train_loss:.3f} ppl {row['train_ppl']:8.2f} | "
              f"{valid_split} loss {valid_loss:.3f} ppl {row['valid_ppl']:8.2f} | {row['seconds']:6.1f} s | "
              f"{row['tokens_per_s']:,.0f} tok/s", flush=True)
        _save_run(out, model, opt, config, vocab, epoch, metrics)
        if grad_flow:
            bad = first_nonfinite(flows[-1]["grad_flow"])
            if bad:
                warn(f"epoch {epoch}: the gradient dL/dh_t turned NaN or infinite first at step {bad['step']} "
                     f"of layer {bad['layer']} (see {GRAD_FLOW_PNG})")
            save_grad_flow(os.path.join(out, GRAD_FLOW_JSON), os.path.join(out, GRAD_FLOW_PNG), flows,
                           config["model"])


def _grad_flow_history(out, done):
    """The grad-flow records of the epochs a resumed run already has (none for a fresh run)."""
    path = os.path.join(out, GRAD_FLOW_JSON)
    if not done or not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    return [{"epoch": r["epoch"], "grad_flow": np.array(r["grad_flow"], dtype=float)} for r in rows
            if r["epoch"] <= done]


def _restore(checkpoint_path):
    """(checkpoint, model in eval mode, device) from a checkpoint file or directory."""
    path = checkpoint_file(checkpoint_path)
    checkpoint = load_checkpoint(path)
    device = _device(checkpoint.config["device"], fall_back=True)
    model = build_model(checkpoint.config, len(checkpoint.vocab), device)
    load_weights(model, checkpoint.weights, path)
    return checkpoint, model.eval(), device


def evaluate(checkpoint_path, data=None, split="test", as_json=False):
    """Loss, perplexity, accuracy and token count of one split (default data: the run's own, with its
    --max-lines; another directory is read whole)."""
    checkpoint, model, device = _restore(checkpoint_path)
    config = checkpoint.config
    source = config["data"] if data is None else data
    splits = read_splits(source, config["max_lines"] if data is None else None)
    if splits[split] is None:
        raise CLIError(f"no valid split: {os.path.join(source, 'valid.txt')} not found")
    check_nonempty(splits[split], source, split)
    encoder = Encoder(checkpoint.vocab)
    ids = encoder.encode(splits[split])
    encoder.warn_unknown()
    accuracy, loss, tokens, _ = run_epoch(_batchify(ids, config["batch_size"], split), model, config, device,
                                          desc=split)
    result = {"loss": loss, "perplexity": perplexity(loss), "accuracy": accuracy, "tokens": tokens}
    if as_json:
        print(json.dumps(result))
    else:
        print(f"{split}: loss {loss:.4f} | perplexity {result['perplexity']:.2f} | accuracy {accuracy:.4f} | "
              f"{tokens:,} tokens")
    return result


def generate(checkpoint_path, prompt="", tokens=20, temperature=1.0, seed=None):
    """Print `prompt` and `tokens` words sampled from softmax(logits / temperature), one at a time."""
    if tokens < 0:
        raise CLIError(f"--tokens must be a whole number of at least 0, got {tokens}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise CLIError(f"--temperature must be a number above 0, got {temperature}")
    if seed is not None and seed < 0:
        raise CLIError(f"--seed must be a whole number of at least 0, got {seed}")
    checkpoint, model, device = _restore(checkpoint_path)
    vocab = checkpoint.vocab
    encoder = Encoder(vocab)
    # a prompt starts a line, as every line of the corpus follows an <eos>
    ids = encoder.encode([EOS] + prompt_words(prompt, checkpoint.config["data"]))
    encoder.warn_unknown()
    rng = np.random.default_rng(seed)
    words = []
    with no_grad():
        x = Tensor(np.array(ids, dtype=np.float32).reshape(-1, 1), device=device, requires_grad=False)
        logits, h = model(x)
        for n in range(tokens):
            scores = logits.numpy()[-1].astype(np.float64) / temperature
            cdf = np.cumsum(np.exp(scores - scores.max()))
            i = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(vocab) - 1)
            words.append(vocab[i])
            if n + 1 < tokens:
                logits, h = model(Tensor(np.array([[i]], dtype=np.float32), device=device, requires_grad=False), h)
    text = " ".join(([prompt.strip()] if prompt.strip() else []) + words)
    print(text)
    return text
