"""The commands: train, evaluate and generate, thin over needle.models.LanguageModel and needle.training.

Each takes plain values (parsed by __main__), prints its results on stdout and its progress, notes and
warnings on stderr, and raises CLIError for bad input (TrainingDiverged when the loss turns NaN or infinite).
"""
import contextlib
import json
import math
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from .. import distributed, nn, optim
from ..anomaly import AnomalyError
from ..anomaly import detect_anomaly as anomaly_mode
from ..autograd import Tensor, no_grad
from ..backend_ndarray import cpu, cuda
from ..data import batchify
from ..models import LanguageModel
from ..training import epoch_general_ptb, perplexity
from .checkpoint import (BEST, FILENAME, Checkpoint, checkpoint_bytes, load_checkpoint, load_optimizer_state,
                         load_weights, model_file, named_parameters)
from .config import BUILTIN, DEFAULTS, option_flag, validate_config
from .corpus import Encoder, build_vocab, check_nonempty, prompt_words, read_splits
from .corpus_builtin import EOS
from .errors import CLIError, TrainingDiverged, note, warn
from .files import atomic_write, json_safe, write_json
from .grad_flow import GRAD_FLOW_JSON, GRAD_FLOW_PNG, first_nonfinite, save_grad_flow
from .plots import plot_perplexity

__all__ = ["METRICS", "PLOT", "train", "evaluate", "generate", "build_model", "run_epoch", "format_ppl"]

METRICS, PLOT = "metrics.json", "perplexity.png"


def format_ppl(ppl):
    """A perplexity as people read it: two decimals below 1e6, scientific notation from there (1.2e+15, inf)."""
    return f"{ppl:.2f}" if ppl < 1e6 else f"{ppl:.1e}"


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


class _NonFinite(Exception):
    """A training window whose loss turned NaN or infinite (`loss`), or in which detect_anomaly found an op
    that produced NaN or infinity (`anomaly`); `batch` counts the epoch's windows from 1."""

    def __init__(self, batch, batches, loss=None, anomaly=None):
        super().__init__(f"batch {batch} of {batches}")
        self.batch, self.batches, self.loss, self.anomaly = batch, batches, loss, anomaly


def _any_rank(flag):
    """Whether `flag` holds on any rank (every rank gets the same answer)."""
    if distributed.world_size() == 1:
        return flag
    return distributed.allreduce_sum([float(flag)])[0] > 0


def run_epoch(data, model, config, device, opt=None, desc="", on_first_window=None):
    """One pass of epoch_general_ptb under a tqdm bar (stderr, rank 0 only) showing loss, perplexity and
    tokens/s. Under mpirun each rank passes its own columns and the results are summed over the ranks.
    A training pass (`opt` given) stops at the first window whose loss is NaN or infinite on any rank, or
    that detect_anomaly stops, raising _NonFinite.

    Returns (accuracy, loss, predicted tokens, seconds) of all ranks together."""
    size = distributed.world_size()
    seen = {"tokens": 0, "loss": 0.0, "windows": 0}
    total = (data.shape[0] - 1) * data.shape[1] * size
    windows = -(-(data.shape[0] - 1) // config["seq_len"])
    with tqdm(total=total, desc=desc, unit="tok", unit_scale=True, file=sys.stderr, leave=False,
              dynamic_ncols=True, disable=not distributed.is_main()) as bar:
        def progress(tokens, loss_sum):
            if seen["windows"] == 0 and on_first_window is not None:
                on_first_window()
            seen["windows"] += 1
            if opt is not None and _any_rank(not math.isfinite(loss_sum)):
                raise _NonFinite(seen["windows"], windows, loss=loss_sum / tokens)
            seen["tokens"] += tokens
            seen["loss"] += loss_sum
            loss = seen["loss"] / seen["tokens"]
            bar.set_postfix(loss=f"{loss:.3f}", ppl=format_ppl(perplexity(loss)), refresh=False)
            bar.update(tokens * size)

        start = time.perf_counter()
        try:
            accuracy, loss = epoch_general_ptb(data, model, config["seq_len"], nn.SoftmaxLoss(), opt,
                                               config["clip"] or None, device, progress=progress)
        except AnomalyError as e:
            raise _NonFinite(seen["windows"] + 1, windows, anomaly=e) from None
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


def _save_run(out, model, opt, config, vocab, epoch, metrics, lr, best=False, plot=True):
    """best.safetensors (when this epoch is the best), then checkpoint.safetensors, metrics.json and the plot
    (without `plot`, an earlier run's plot is removed instead).

    best.safetensors goes first: a crash between the two leaves it one epoch ahead of the checkpoint, and
    --resume then trains that epoch again to the same result. metrics.json and the plot never run ahead of
    the checkpoint."""
    data = checkpoint_bytes(Checkpoint.capture(model, opt, config, vocab, epoch, metrics, lr))
    for name in ((BEST, FILENAME) if best else (FILENAME,)):
        atomic_write(os.path.join(out, name), lambda f: f.write(data))
    write_json(os.path.join(out, METRICS), metrics)
    if not plot:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, PLOT))
        return
    corpus = "the built-in corpus" if config["data"] == BUILTIN else os.path.basename(config["data"])
    plot_perplexity(os.path.join(out, PLOT), metrics, title=f"needle-lm: {config['model']} on {corpus}")


def _training_data(config, vocab=None):
    """(vocab, train batches, validation batches, the split validated on, test batches) of a run; a fresh
    run (vocab None) builds its vocabulary from the data. The test batches are those `evaluate` uses."""
    splits = read_splits(config["data"], config["max_lines"])
    check_nonempty(splits["train"], config["data"], "train")
    valid_split = "valid" if splits["valid"] is not None else "test"
    check_nonempty(splits[valid_split], config["data"], valid_split)
    if valid_split == "test":
        note(f"no valid.txt in {config['data']}: validating on the test split")
    vocab = build_vocab(splits) if vocab is None else vocab
    encoder = Encoder(vocab)
    train_ids, valid_ids = encoder.encode(splits["train"]), encoder.encode(splits[valid_split])
    test_ids = encoder.encode(splits["test"]) if any(word != EOS for word in splits["test"]) else None
    encoder.warn_unknown()
    train_data = _batchify(train_ids, config["batch_size"], "train", training=True)
    valid_data = _batchify(valid_ids, config["batch_size"], valid_split)
    test_data = None if test_ids is None else _batchify(test_ids, config["batch_size"], "test")
    return vocab, train_data, valid_data, valid_split, test_data


class _Best:
    """The epoch with the best valid loss so far and how many epochs have come since: what best.safetensors,
    --anneal and --patience go by. As in PyTorch's word_language_model example, the first epoch is the best
    so far whatever its loss; after it only a strictly lower loss is (a NaN never is)."""

    def __init__(self, metrics):
        self.loss, self.epoch, self.since, self.weights = math.inf, 0, 0, None
        for row in metrics:
            self.update(row["epoch"], row["valid_loss"])

    def update(self, epoch, loss):
        """Whether `loss` (None for a NaN or infinite one) makes `epoch` the best so far."""
        loss = math.inf if loss is None or math.isnan(loss) else loss
        if self.epoch == 0 or loss < self.loss:
            self.loss, self.epoch, self.since = loss, epoch, 0
            return True
        self.since += 1
        return False


def _weights(model):
    return {name: p.numpy() for name, p in named_parameters(model)}


def _finite(model):
    for p in model.parameters():
        array = p.realize_cached_data()
        if not bool(array.device.xp.isfinite(array.x).all()):
            return False
    return True


def _diverged(epoch, batch, what, config, lr, out, kept, hint=""):
    clip = config["clip"]
    advice = f"try a lower --lr (this run: {lr:g}) or " + (f"a smaller --clip (this run: {clip:g})" if clip
                                                          else "a --clip such as 0.25")
    return TrainingDiverged(f"training diverged at epoch {epoch}{batch}: {what}; {advice}; "
                            f"{os.path.join(out, FILENAME)} keeps epoch {kept}{hint}")


def _what_went_wrong(e):
    if e.anomaly is None:
        return f"the training loss is {'NaN' if math.isnan(e.loss) else e.loss}"
    a = e.anomaly
    return f"{a.op} produced {a.kind} in its {a.phase} (called at {a.via or a.site})"


def _resume_best(best, checkpoint, out):
    """The best epoch's weights of a resumed run: the checkpoint's, or best.safetensors' when it holds that
    epoch; None (with a warning) when neither does."""
    if best.epoch == checkpoint.epoch:
        return checkpoint.weights
    path = os.path.join(out, BEST)
    if best.epoch and os.path.isfile(path):
        try:
            stored = load_checkpoint(path)
        except CLIError:
            stored = None
        if stored is not None and stored.epoch == best.epoch:
            return stored.weights
    if best.epoch:
        warn(f"{path} is missing or not from epoch {best.epoch}, the best so far: the test will use the best "
             f"epoch from here on, or the last")
    return None


def train(given, out, resume=False, grad_flow=False, detect_anomaly=False):
    """Train a language model (options in `given`, the ones set on the command line) into `out`.

    With `resume`, the checkpoint in `out` supplies the configuration (only `epochs` is read from `given`)
    and the run goes on to `epochs` in total, ending where an uninterrupted run ends. With `grad_flow`, the
    recurrent layers record ||dL/dh_t|| and each epoch's first batch goes to grad_flow.json and .png. With
    `detect_anomaly`, training runs under ndl.detect_anomaly(). After every epoch a better valid loss is
    kept in best.safetensors, a worse one divides the learning rate by --anneal, and --patience such epochs
    in a row end the run; at the end the best weights are evaluated on the test split. A NaN or infinite
    training loss raises TrainingDiverged at once, leaving the files at the last finite epoch.
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
    vocab, train_data, valid_data, valid_split, test_data = _training_data(
        config, checkpoint.vocab if checkpoint else None)
    train_data, valid_data = _shard(train_data), _shard(valid_data[:, :valid_data.shape[1] // world * world])
    if test_data is not None:
        test_data = _shard(test_data[:, :test_data.shape[1] // world * world])
    model = build_model(config, len(vocab), device)
    opt = _optimizer(config, model)
    metrics, done, lr = [], 0, config["lr"]
    if checkpoint:
        load_weights(model, checkpoint.weights, path)
        load_optimizer_state(opt, checkpoint.optimizer_state, path)
        np.random.set_state(checkpoint.rng_state)
        metrics, done = list(checkpoint.metrics), checkpoint.epoch
        lr = config["lr"] if checkpoint.lr is None else checkpoint.lr
        if main_rank:
            print(f"{path} is at epoch {done} of --epochs {config['epochs']}: nothing to train"
                  if done >= config["epochs"] else f"resuming {path} at epoch {done + 1} of {config['epochs']}")
    else:
        if os.path.isfile(path):
            note(f"a fresh run replaces {path} (--resume continues it)")
        size = sum(int(np.prod(p.shape)) for p in model.parameters())
        if main_rank:
            print(f"{config['model']} language model, {size:,} parameters, vocabulary {len(vocab):,}, "
                  f"{train_data.size * world:,} train and {valid_data.size * world:,} {valid_split} tokens")
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out, BEST))  # an earlier run's
            # epoch 0, the last finite one so far (a plot of no epochs only where no epoch follows)
            _save_run(out, model, opt, config, vocab, 0, metrics, lr, plot=config["epochs"] == 0)
    best = _Best(metrics)
    if checkpoint:
        best.weights = _resume_best(best, checkpoint, out)
    optimizer = opt
    optimizer.lr = lr
    if world > 1:
        distributed.broadcast_parameters(model.parameters())
        opt = distributed.DistributedOptimizer(opt)
    flows = _grad_flow_history(out, done) if grad_flow else None
    model.seq.record_grad_flow = grad_flow

    epochs, patience = config["epochs"], config["patience"]
    for epoch in range(done + 1, epochs + 1):
        if patience and best.since >= patience:
            if main_rank:
                print(f"no better {valid_split} loss for {best.since} epochs (--patience {patience}): stopping "
                      f"after epoch {epoch - 1}")
            break

        def capture(epoch=epoch):
            flows.append({"epoch": epoch, "grad_flow": model.seq.grad_flow.copy()})
        try:
            with anomaly_mode() if detect_anomaly else contextlib.nullcontext():
                _, train_loss, tokens, train_seconds = run_epoch(train_data, model, config, device, opt,
                                                                 desc=f"epoch {epoch}/{epochs}",
                                                                 on_first_window=capture if grad_flow else None)
        except _NonFinite as e:
            hint = _save_grad_flow(out, flows, config, epoch, diverged=True) if grad_flow and main_rank else ""
            raise _diverged(epoch, f", batch {e.batch} of {e.batches}", _what_went_wrong(e), config, lr, out,
                            epoch - 1, hint) from None
        if _any_rank(not _finite(model)):
            hint = _save_grad_flow(out, flows, config, epoch, diverged=True) if grad_flow and main_rank else ""
            raise _diverged(epoch, "", f"the weights turned NaN or infinite after its last batch (the training "
                            f"loss stayed finite: {train_loss:.4g})", config, lr, out, epoch - 1, hint)
        _, valid_loss, _, valid_seconds = run_epoch(valid_data, model, config, device, desc=valid_split)
        row = {"epoch": epoch, "train_loss": train_loss, "train_ppl": perplexity(train_loss),
               "valid_loss": valid_loss, "valid_ppl": perplexity(valid_loss), "lr": lr,
               "seconds": train_seconds + valid_seconds, "tokens_per_s": tokens / train_seconds}
        metrics.append(json_safe(row))
        improved = best.update(epoch, valid_loss)
        if improved:
            best.weights = _weights(model)
            verdict = "best so far"
        elif config["anneal"] != 1:
            lr = optimizer.lr = lr / config["anneal"]
            verdict = f"lr -> {lr:.3g}"
        else:
            verdict = f"best: epoch {best.epoch}"
        if not main_rank:
            continue
        print(f"epoch {epoch:3d}/{epochs} | train loss {train_loss:.3f} ppl {format_ppl(row['train_ppl']):>8} | "
              f"{valid_split} loss {valid_loss:.3f} ppl {format_ppl(row['valid_ppl']):>8} | {row['seconds']:6.1f} s | "
              f"{row['tokens_per_s']:,.0f} tok/s | {verdict}", flush=True)
        _save_run(out, model, opt, config, vocab, epoch, metrics, lr, best=improved)
        if grad_flow:
            _save_grad_flow(out, flows, config, epoch)

    if metrics and test_data is not None:
        _test(out, model, config, device, test_data, best, metrics, main_rank)


def _test(out, model, config, device, test_data, best, metrics, main_rank):
    """Evaluate the best weights on the test split, exactly as `needle-lm evaluate OUT --split test` does,
    and record the result as metrics.json's last object."""
    source = f"epoch {best.epoch} ({BEST})"
    if best.weights is not None:
        load_weights(model, best.weights, os.path.join(out, BEST))
    else:
        source = f"epoch {metrics[-1]['epoch']} (the last; {BEST} was missing)"
    _, test_loss, tokens, _ = run_epoch(test_data, model, config, device, desc="test")
    if not main_rank:
        return
    print(f"test loss {test_loss:.3f} ppl {format_ppl(perplexity(test_loss))} | {tokens:,} tokens | the weights "
          f"of {source}", flush=True)
    write_json(os.path.join(out, METRICS),
               metrics + [{"epoch": "test", "test_loss": test_loss, "test_ppl": perplexity(test_loss)}])


def _save_grad_flow(out, flows, config, epoch, diverged=False):
    """Write grad_flow.json and .png, and report the first NaN or infinite ||dL/dh_t|| of `epoch`'s record:
    as a warning, or for an epoch that diverged as a note returned for its error line."""
    bad = first_nonfinite(flows[-1]["grad_flow"]) if flows and flows[-1]["epoch"] == epoch else None
    if flows:
        save_grad_flow(os.path.join(out, GRAD_FLOW_JSON), os.path.join(out, GRAD_FLOW_PNG), flows, config["model"])
    if bad is None:
        return ""
    where = f"the gradient dL/dh_t turned NaN or infinite first at step {bad['step']} of layer {bad['layer']}"
    if diverged:
        return f"; on the epoch's first batch {where} (see {GRAD_FLOW_PNG})"
    warn(f"epoch {epoch}: {where} (see {GRAD_FLOW_PNG})")
    return ""


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
    """(checkpoint, model in eval mode, device) from a checkpoint file or a run's directory (its best.safetensors
    when there is one)."""
    path = model_file(checkpoint_path)
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
        print(json.dumps(json_safe(result), allow_nan=False))
    else:
        print(f"{split}: loss {loss:.4f} | perplexity {format_ppl(result['perplexity'])} | accuracy {accuracy:.4f} | "
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
