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

_BEST, _OTHER, _BASELINE = "#1f6fb4", "#555555", "#c0392b"


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
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.4))
    ax = fig.subplots()
    best = max(methods, key=lambda m: methods[m]["lds"])
    for name, r in methods.items():
        low, high = r["lds_ci"]
        color = _BEST if name == best else _OTHER
        yerr = [[r["lds"] - low], [high - r["lds"]]]
        ax.errorbar([r["seconds"]], [r["lds"]], yerr=yerr, fmt="o", color=color, capsize=3, markersize=5)
        ax.annotate(name, (r["seconds"], r["lds"]), xytext=(6, 4), textcoords="offset points", fontsize=8, color=color)
    if baseline is not None:
        low, high = baseline["lds_ci"]
        ax.axhspan(low, high, color=_BASELINE, alpha=0.12, lw=0)
        ax.axhline(baseline["lds"], color=_BASELINE, lw=1, ls="--", label="random scores (95 % CI)")
        ax.legend(loc="lower right", fontsize=8, frameon=False)
    seconds = [r["seconds"] for r in methods.values()]
    if min(seconds) > 0 and max(seconds) / min(seconds) > 8:  # a wide range of run times reads better in log
        ax.set_xscale("log")
    ax.margins(x=0.25, y=0.15)
    ax.set_xlabel("seconds (fit + score)")
    ax.set_ylabel("LDS (mean Spearman)")
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

    fig = Figure(figsize=(3.3 * len(panels), 3.1))
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    for ax, panel in zip(axes, panels):
        ax.scatter(panel.predicted, panel.actual, s=14, color=_BEST, alpha=0.75, lw=0)
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel("predicted: Σ of the subset's scores", fontsize=8)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_ylabel("actual: −query loss after retraining", fontsize=8)
    return figure_png(fig)
