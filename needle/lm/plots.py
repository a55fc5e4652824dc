"""perplexity.png: train and valid perplexity per epoch, drawn with matplotlib's Agg canvas.

Figure + FigureCanvasAgg draw without pyplot, so the global backend of a caller is left alone.
"""
import io
import math

from .files import atomic_write

__all__ = ["plot_perplexity"]


def plot_perplexity(path, metrics, title="needle-lm"):
    """Write the plot of `metrics` (rows with epoch, train_ppl, valid_ppl; others are skipped) to `path`
    atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    rows = [row for row in metrics if isinstance(row["epoch"], int)]  # not the "test" row
    epochs = [row["epoch"] for row in rows]
    train, valid = ([_plottable(row[key]) for row in rows] for key in ("train_ppl", "valid_ppl"))
    ax.plot(epochs, train, "o-", label="train")
    ax.plot(epochs, valid, "s-", label="valid")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    shown = [v for v in train + valid if math.isfinite(v)]
    if shown and min(shown) > 0:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # 20, 30, 100 rather than 2 x 10^1
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def _plottable(value):
    """A perplexity for the plot: None (a non-finite number in metrics.json) and inf are left out, as NaN."""
    return math.nan if value is None or not math.isfinite(value) else value
