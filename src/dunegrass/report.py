"""The demo's HTML report: the LDS table and, for a few queries, their top proponents and opponents."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence

import numpy as np

from .store.atomic import atomic_write_bytes


def _png(images: Sequence[np.ndarray], titles: Sequence[str]) -> str:
    # A bare Figure renders with Agg without pyplot, so the user's matplotlib backend is left alone.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.3 * len(images), 1.6))
    axes = fig.subplots(1, len(images))
    for ax, img, title in zip(np.atleast_1d(axes), images, titles):
        ax.imshow(img, cmap="gray_r", interpolation="nearest")
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def write_report(
    path: str | os.PathLike,
    results: dict,
    examples: list[dict],
    train_images: np.ndarray,
    query_images: np.ndarray,
) -> None:
    """Write ``path`` (HTML, self-contained: images are embedded).

    ``results``: the demo's results.json content. ``examples``: one dict per shown query with keys
    ``query`` (index), ``label``, ``method``, ``proponents``/``opponents`` (lists of (train index,
    label, score)) and optionally ``significant`` (how many top proponents have z > 2).
    """
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{r['lds']:.3f}</td><td>[{r['lds_ci'][0]:.3f}, {r['lds_ci'][1]:.3f}]"
        f"</td><td>{r['seconds']:.1f}</td><td>{html.escape(r.get('notes', ''))}</td></tr>"
        for name, r in results["methods"].items()
    )
    gt = results["ground_truth"]
    blocks = []
    for ex in examples:
        imgs = [query_images[ex["query"]]]
        titles = [f"query (y={ex['label']})"]
        for kind in ("proponents", "opponents"):
            for i, label, score in ex[kind]:
                imgs.append(train_images[i])
                titles.append(f"{'+' if kind == 'proponents' else '−'} #{i} y={label}\n{score:.2g}")
        note = ""
        if ex.get("significant") is not None:
            note = (
                f"<p>{ex['significant']} of the top {len(ex['proponents'])} proponents are significantly "
                "positive (score > 2 standard errors).</p>"
            )
        blocks.append(
            f"<h3>Query {ex['query']} — {html.escape(ex['method'])}</h3>{note}"
            f"<img src='data:image/png;base64,{_png(imgs, titles)}'/>"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>dunegrass demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head>
<body><h1>dunegrass demo: {html.escape(results["task"])}</h1>
<p>Model accuracy on held-out digits: {results["accuracy"]:.3f}. Ground truth: {gt["num_subsets"]} random subsets
of {gt["alpha"]:.0%} of the {results["n_train"]} training examples, each retrained from scratch with
{gt["num_seeds"]} seed(s) ({gt["seconds"]:.1f} s). LDS = mean Spearman correlation over {results["n_queries"]}
queries between the predicted and the actual effect of each subset, with a 95 % confidence interval.</p>
<table><tr><th>method</th><th>LDS</th><th>95 % CI</th><th>seconds</th><th>notes</th></tr>{rows}</table>
<h2>Most influential training examples</h2>
<p>For each query: the query, then its top proponents (+, training on them helped) and opponents (−).</p>
{"".join(blocks)}
</body></html>"""
    atomic_write_bytes(path, page.encode())


SIGN_NOTE = (
    "A positive score means training on that example helps the query (lowers its loss or raises its "
    "measurement): a proponent; a negative one, an opponent. Scores of different methods are on different "
    "scales (an inverse Fisher, a covariance across fine-tunes, a dot product of gradients): compare ranks "
    "across methods, values within one."
)


def write_run_report(path: str | os.PathLike, config: dict, top, train_texts, query_texts) -> None:
    """``report.html`` of ``dunegrass score``: the run's settings, then each query with its top proponents
    and opponents (their texts, scores and, for Daunce, standard errors; significant ones marked)."""
    blocks = []
    for q in range(len(top)):
        query = html.escape(query_texts[q]) if query_texts else f"query {q}"
        tables = []
        for kind, (idx, vals), errs in (
            ("proponents", top.top(), top.top_stderr),
            ("opponents", top.bottom(), top.bottom_stderr),
        ):
            rows = []
            for r in range(idx.shape[1]):
                i, v = int(idx[q, r]), float(vals[q, r])
                text = html.escape(train_texts[i]) if train_texts else f"#{i}"
                err = "" if errs is None else f" ± {float(errs[q, r]):.2g}"
                mark = " ★" if errs is not None and abs(v) > 2 * float(errs[q, r]) else ""
                rows.append(f"<tr><td>{r + 1}</td><td>#{i}</td><td class=t>{text}</td><td>{v:.4g}{err}{mark}</td></tr>")
            tables.append(f"<h4>{kind}</h4><table>{''.join(rows)}</table>")
        blocks.append(f"<h3>Query {q}</h3><p class=t>{query}</p>{''.join(tables)}")
    star = "<p>★: more than two standard errors from zero.</p>" if top.top_stderr is not None else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>dunegrass: {html.escape(config["name"])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}}.t{{white-space:pre-wrap;font-family:monospace}}</style>
</head><body><h1>dunegrass: {html.escape(config["method"])} on {html.escape(config["data"])}</h1>
<p>Model {html.escape(config["model"])}; {len(top)} queries from {html.escape(config.get("queries", ""))}, each with
its {top.top_values.shape[1]} top proponents and opponents among {top.n_train} training examples.</p>
<p>{SIGN_NOTE}</p>{star}{"".join(blocks)}</body></html>"""
    atomic_write_bytes(path, page.encode())
