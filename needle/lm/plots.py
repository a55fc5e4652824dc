"""perplexity.png: train and valid perplexity per epoch, drawn with matplotlib's Agg canvas.

Figure + FigureCanvasAgg draw without pyplot, so the global backend of a caller is left alone.
"""
import io

from .files import atomic_write

__all__ = ["plot_perplexity"]


def plot_perplexity(path, metrics, title="needle-lm"):
    """Write the plot of `metrics` (rows with epoch, train_ppl, valid_ppl) to `path` atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    epochs = [row["epoch"] for row in metrics]
    ax.plot(epochs, [row["train_ppl"] for row in metrics], "o-", label="train")
    ax.plot(epochs, [row["valid_ppl"] for row in metrics], "s-", label="valid")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    if metrics and min(min(row["train_ppl"], row["valid_ppl"]) for row in metrics) > 0:
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
