"""The report's pictures, as base64 PNG text for ``<img src="data:...">``.

Everything is drawn on a bare ``matplotlib.figure.Figure`` (rendered by Agg without pyplot), so the
user's matplotlib backend and global state are left alone.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

_BEST, _BASELINE = "#1f6fb4", "#7f7f7f"


def figure_png(fig) -> str:
    """A matplotlib Figure as base64 PNG text."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def image_png(image: np.ndarray) -> str:
    """A small grayscale image (e.g. an 8×8 digit, dark = high) as base64 PNG text, one pixel per value;
    the page scales it up."""
    from matplotlib.image import imsave  # writes through Pillow, never through pyplot

    buf = io.BytesIO()
    imsave(buf, np.asarray(image, dtype=np.float64), cmap="gray_r", format="png")
    return base64.b64encode(buf.getvalue()).decode()


def lds_versus_seconds(methods: Mapping[str, Mapping], baseline: Mapping | None = None) -> str:
    """One point per method at (seconds, LDS) with its 95 % CI as an error bar; the random-score
    baseline (``{"lds", "lds_ci"}``) as a line and band. ``methods``: results.json's ``methods``."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 3.6))
    ax = fig.subplots()
    best = max(methods, key=lambda m: methods[m]["lds"])
    colors = colormaps["tab10"].colors
    for j, (name, r) in enumerate(methods.items()):
        low, high = r["lds_ci"]
        yerr = [[r["lds"] - low], [high - r["lds"]]]
        label = f"{name}{' (best)' if name == best else ''}: {r['lds']:.3f}"
        size = 8 if name == best else 6
        ax.errorbar(
            [r["seconds"]], [r["lds"]], yerr=yerr, fmt="o", color=colors[j % 10], capsize=3, ms=size, label=label
        )
    if baseline is not None:
        low, high = baseline["lds_ci"]
        ax.axhspan(low, high, color=_BASELINE, alpha=0.12, lw=0)
        ax.axhline(baseline["lds"], color=_BASELINE, lw=1, ls="--", label=f"random scores: {baseline['lds']:.3f}")
    seconds = [r["seconds"] for r in methods.values()]
    if min(seconds) > 0 and max(seconds) / min(seconds) > 8:  # a wide range of run times reads better in log
        ax.set_xscale("log")
    ax.margins(x=0.15, y=0.15)
    ax.set_xlabel("seconds (fit + score)")
    ax.set_ylabel("LDS (mean Spearman, 95 % CI)")
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda j: labels[j].startswith("random"))  # methods first
    ax.legend(
        [handles[j] for j in order],
        [labels[j] for j in order],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        frameon=False,
    )
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return figure_png(fig)


@dataclass
class ScatterPanel:
    """One method's predicted and actual effects of the M retraining subsets on one query."""

    title: str
    predicted: np.ndarray  # [M]: Σ_{i∈S_j} τ(z, i)
    actual: np.ndarray  # [M]: −(query loss after retraining on S_j)


def subset_scatter(panels: Sequence[ScatterPanel]) -> str:
    """Predicted (x) against actual (y) effect of each retraining subset, one panel per method, side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.0 * len(panels), 3.3))
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    for ax, panel in zip(axes, panels):
        x, unit = _scaled(np.asarray(panel.predicted, dtype=np.float64))
        ax.scatter(x, panel.actual, s=16, color=_BEST, alpha=0.75, lw=0)
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel(f"predicted: Σ of the subset's scores{unit}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_ylabel("actual: −query loss after retraining", fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def _scaled(x: np.ndarray) -> tuple[np.ndarray, str]:
    """``x`` in a unit that keeps tick labels short (scores of some methods are ~1e-6, of others ~1e2):
    the values divided by 10^e and the label's " (×10^e)", or ``x`` unchanged."""
    top = float(np.max(np.abs(x))) if x.size else 0.0
    if top == 0 or not np.isfinite(top) or 1e-2 <= top < 1e3:
        return x, ""
    e = int(np.floor(np.log10(top)))
    return x / 10.0**e, f" (×1e{e})"
