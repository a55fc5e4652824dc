"""--grad-flow: ||dL/dh_t|| per layer and time step on each epoch's first batch, as grad_flow.json and a heat
map (grad_flow.png, log colour scale), and the first step and layer where the gradient was NaN or infinite."""
import io

import numpy as np

from .files import atomic_write, write_json

__all__ = ["GRAD_FLOW_JSON", "GRAD_FLOW_PNG", "first_nonfinite", "save_grad_flow"]

GRAD_FLOW_JSON, GRAD_FLOW_PNG = "grad_flow.json", "grad_flow.png"
_MAX_PANELS = 6


def first_nonfinite(flow):
    """{'step': t, 'layer': l} of the earliest time step (lowest layer first) whose norm is NaN or infinite."""
    bad = ~np.isfinite(flow)
    if not bad.any():
        return None
    step = int(np.nonzero(bad.any(axis=0))[0][0])
    return {"step": step, "layer": int(np.nonzero(bad[:, step])[0][0])}


def save_grad_flow(out_json, out_png, records, model_name):
    """records: [{'epoch': e, 'grad_flow': (layers, steps) array}] -> grad_flow.json and grad_flow.png."""
    rows = [{"epoch": r["epoch"], "first_nonfinite": first_nonfinite(r["grad_flow"]),
             "grad_flow": [[float(v) if np.isfinite(v) else str(v) for v in row] for row in r["grad_flow"]]}
            for r in records]
    write_json(out_json, rows)
    _plot(out_png, records, model_name)


def _plot(path, records, model_name):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    picks = np.unique(np.linspace(0, len(records) - 1, min(len(records), _MAX_PANELS)).round().astype(int))
    shown = [records[i] for i in picks]
    finite = np.concatenate([r["grad_flow"][np.isfinite(r["grad_flow"]) & (r["grad_flow"] > 0)] for r in shown])
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size and finite.max() > finite.min() else None
    figure = Figure(figsize=(8, 1.2 + 1.1 * len(shown) * max(1, shown[0]["grad_flow"].shape[0] / 2)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(shown), 1, squeeze=False)[:, 0]
    for ax, record in zip(axes, shown):
        flow = np.where(np.isfinite(record["grad_flow"]) & (record["grad_flow"] > 0), record["grad_flow"], np.nan)
        image = ax.imshow(flow, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm)
        ax.set_ylabel(f"epoch {record['epoch']}\nlayer")
        ax.set_yticks(range(flow.shape[0]))
        figure.colorbar(image, ax=ax, label="||dL/dh_t||")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("time step t of the first batch")
    axes[0].set_title(f"needle-lm: gradient flow through time ({model_name}); blank = 0, NaN or inf")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
