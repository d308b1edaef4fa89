"""``report.html`` of ``dunegrass demo``: LDS against time, the subsets behind LDS for one query, what the
scores mean, and each method's proponents and opponents of a few test digits."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from ..errors import DunegrassError
from ..eval import GroundTruth, lds
from ..scores import Scores, TopScores
from .examples import image_grid
from .figures import ScatterPanel, image_png, lds_versus_seconds, subset_scatter
from .notes import scores_note
from .page import esc, img, write_page


def write_report(
    path: str | os.PathLike,
    results: dict,
    scores: Mapping[str, Scores],
    ground_truth: GroundTruth,
    *,
    train_images: np.ndarray,
    query_images: np.ndarray,
    train_labels: np.ndarray,
    query_labels: np.ndarray,
    queries_shown: int = 3,
    k: int = 5,
) -> None:
    """Write ``path``: one self-contained HTML page (images embedded, no script).

    ``results``: the demo's results.json content (``methods``: name → ``lds``, ``lds_ci``, ``seconds``,
    ``notes``; ``baseline``; ``ground_truth``; ...). ``scores``: each method's dense ``Scores``
    ``[n_query, n_train]`` (positive = proponent), keyed as in ``results["methods"]``. ``ground_truth``:
    the subsets (``masks [M, n_train]``) and retrained query losses (``values [M, n_query]``) LDS was
    scored against. Images ``[n, 8, 8]`` and labels ``[n]`` of the training examples and the queries.
    """
    methods = results["methods"]
    if set(methods) != set(scores):
        raise DunegrassError(f"the results list methods {sorted(methods)} but scores were given for {sorted(scores)}")
    shown = range(min(queries_shown, len(query_labels)))
    rankings = {name: TopScores.from_scores(scores[name], k) for name in methods}

    def query_view(q: int) -> str:
        picture = img(image_png(query_images[q]), f"query {q}", "digit big")
        return f"<div class='query'>{picture}label {int(query_labels[q])}</div>"

    def train_view(i: int) -> str:
        picture = img(image_png(train_images[i]), f"training example {i}", "digit")
        return f"{picture}#{i} y={int(train_labels[i])}<br>"

    body = "".join(
        [
            _summary(results),
            _lds_section(results, scores),
            _scatter_section(results, scores, ground_truth),
            scores_note(list(methods), any(s.stderr is not None for s in scores.values())),
            "<h2>Most influential training examples</h2>",
            f"<p>For each of the first {len(shown)} test digits, every method's {k} highest scores (training on "
            f"them helped it most: proponents when positive) and {k} lowest (they hurt it most: opponents when "
            "negative), with their scores.</p>",
            image_grid(rankings, shown, query_view, train_view, k),
        ]
    )
    write_page(path, f"dunegrass demo: {results['task']}", body)


def _summary(results: dict) -> str:
    gt = results["ground_truth"]
    start = "from scratch" if gt.get("from_scratch", True) else "from θ₀"
    return (
        f"<h1>dunegrass demo: {esc(results['task'])}</h1>"
        f"<p>Model accuracy on held-out digits: {results['accuracy']:.3f}. Ground truth: {gt['num_subsets']} random "
        f"subsets of {gt['alpha']:.0%} of the {results['n_train']} training examples, each retrained {start} with "
        f"{gt['num_seeds']} seed(s) ({gt['seconds']:.1f} s); the measurement is the "
        f"{esc(gt.get('measurement', 'query loss'))} of {results['n_queries']} held-out digits.</p>"
    )


def _lds_section(results: dict, scores: Mapping[str, Scores]) -> str:
    methods, baseline = results["methods"], results.get("baseline", {}).get("random scores")
    rows = []
    for name, r in methods.items():
        typical = float(scores[name].values.abs().median())
        rows.append(
            f"<tr><td>{esc(name)}</td><td class='num'>{r['lds']:.3f}</td>"
            f"<td class='num'>[{r['lds_ci'][0]:.3f}, {r['lds_ci'][1]:.3f}]</td><td class='num'>{r['seconds']:.1f}</td>"
            f"<td class='num'>{typical:.2g}</td><td>{esc(r.get('notes', ''))}</td></tr>"
        )
    if baseline is not None:
        low, high = baseline["lds_ci"]
        rows.append(
            f"<tr class='muted'><td>random scores</td><td class='num'>{baseline['lds']:.3f}</td>"
            f"<td class='num'>[{low:.3f}, {high:.3f}]</td><td></td><td></td><td>the noise floor</td></tr>"
        )
    head = "<tr><th>method</th><th>LDS</th><th>95 % CI</th><th>seconds</th><th>median |score|</th><th>notes</th></tr>"
    return (
        "<h2>Which method predicts retraining best</h2>"
        "<p>LDS (linear datamodeling score): for each query, the Spearman correlation across the retraining "
        "subsets between the effect a method predicts (the sum of its scores over the subset) and the measured "
        "one (minus the query's loss after retraining on the subset); the mean over queries, with a 95 % "
        "confidence interval. Higher is better; random scores give about 0.</p>"
        f"{img(lds_versus_seconds(methods, baseline), 'LDS against seconds, one point per method', 'plot')}"
        f"<table>{head}{''.join(rows)}</table>"
    )


def _scatter_section(results: dict, scores: Mapping[str, Scores], gt: GroundTruth) -> str:
    methods = results["methods"]
    best = max(methods, key=lambda m: methods[m]["lds"])
    worst = min(methods, key=lambda m: methods[m]["lds"])
    scored = {name: lds(scores[name], gt) for name in {best, worst}}
    per_query = {name: r.per_query for name, r in scored.items()}
    # A typical query, not a flattering one: the best method's Spearman there is closest to its LDS.
    q = int(np.argmin(np.abs(per_query[best] - scored[best].mean)))
    masks = gt.masks.to(scores[best].values.dtype)
    actual = -gt.values[:, q].double().numpy()
    panels = [
        ScatterPanel(
            f"{name} ({'best' if name == best else 'worst'} LDS): ρ = {per_query[name][q]:.2f}",
            (masks @ scores[name].values[q]).double().numpy(),
            actual,
        )
        for name in dict.fromkeys([best, worst])
    ]
    return (
        f"<h2>The subsets behind LDS, for query {q}</h2>"
        f"<p>Each point is one of the {gt.masks.shape[0]} retraining subsets: the effect on query {q} that the "
        "method predicts (x) against the one measured by retraining (y). ρ is their Spearman correlation; "
        "LDS is its mean over queries. This query is a typical one: the best method's ρ here is closest to its "
        "LDS.</p>"
        f"{img(subset_scatter(panels), f'predicted against actual subset effects on query {q}', 'plot')}"
    )
