"""Training loops for language models with truncated backpropagation through time.

The corpus is a batchified id array (nbatch, bs); windows of `seq_len` rows are fed in order and the
recurrent state is carried from one window to the next, detached, so gradients stop at the window.
"""
import contextlib
import math

from . import nn, optim
from .autograd import no_grad
from .data import get_batch

__all__ = ["epoch_general_ptb", "train_ptb", "evaluate_ptb", "detach_state", "perplexity"]


def detach_state(h):
    """The recurrent state without its graph (a Tensor, a tuple of them, or None)."""
    if h is None:
        return None
    return tuple(x.detach() for x in h) if isinstance(h, tuple) else h.detach()


def _count_correct(logits, y):
    """How many rows of logits (N, C) have their first max at the label y (N,): on the backend arrays
    themselves (.numpy() would copy the logits first), row block by row block on the backend's threads."""
    x, labels = logits.realize_cached_data(), y.realize_cached_data().x
    parallel = x.device.kernel("for_rows")

    def count(sl):
        return int((x.x[sl].argmax(axis=1) == labels[sl]).sum())

    return sum(parallel(count, x.shape[0], x.size) if parallel else [count(slice(0, x.shape[0]))])


def epoch_general_ptb(data, model, seq_len=40, loss_fn=nn.SoftmaxLoss(), opt=None, clip=None, device=None,
                      dtype="float32", progress=None):
    """One pass over `data` (nbatch, bs); trains when `opt` is given, else evaluates without a graph.

    `clip` is the max global gradient norm (None: no clipping). `progress`, if given, is called after every
    window with (tokens, loss_sum) for that window. Returns (average accuracy, average loss) over the
    predicted tokens.
    """
    if isinstance(loss_fn, type):
        loss_fn = loss_fn()
    training = opt is not None
    model.train(training)
    total_loss, total_correct, total_tokens = 0.0, 0, 0
    h = None
    with contextlib.nullcontext() if training else no_grad():
        for i in range(0, data.shape[0] - 1, seq_len):
            x, y = get_batch(data, i, seq_len, device=device, dtype=dtype)
            logits, h = model(x, h)
            loss = loss_fn(logits, y)
            if training:
                opt.reset_grad()
                loss.backward()
                if clip:
                    opt.clip_grad_norm(clip)
                opt.step()
            h = detach_state(h)
            tokens = y.shape[0]
            batch_loss = float(loss.numpy()) * tokens
            total_loss += batch_loss
            total_correct += _count_correct(logits, y)
            total_tokens += tokens
            if progress is not None:
                progress(tokens, batch_loss)
    if total_tokens == 0:
        raise ValueError(f"epoch_general_ptb: data of shape {data.shape} holds no (input, target) pair")
    return total_correct / total_tokens, total_loss / total_tokens


def train_ptb(model, data, seq_len=40, n_epochs=1, optimizer=optim.SGD, lr=4.0, weight_decay=0.0,
              loss_fn=nn.SoftmaxLoss, clip=None, device=None, dtype="float32"):
    """Train for `n_epochs`; returns (average accuracy, average loss) of the last epoch."""
    opt = optimizer(model.parameters(), lr=lr, weight_decay=weight_decay)
    result = (0.0, float("nan"))
    for _ in range(n_epochs):
        result = epoch_general_ptb(data, model, seq_len, loss_fn(), opt, clip, device, dtype)
    return result


def evaluate_ptb(model, data, seq_len=40, loss_fn=nn.SoftmaxLoss, device=None, dtype="float32"):
    """Average accuracy and loss of `model` on `data`, without gradients."""
    return epoch_general_ptb(data, model, seq_len, loss_fn(), None, None, device, dtype)


def perplexity(loss):
    """exp(average loss): inf where that overflows a float (a loss above about 709), NaN for a NaN loss."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
