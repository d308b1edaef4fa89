"""``report.html`` of ``dunegrass score``: the demo's report without the LDS part (a run has no retraining
ground truth): the run's settings, what the scores mean, and each query's proponents and opponents as text."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..scores import TopScores
from .examples import text_lists
from .notes import scores_note
from .page import esc, write_page

MAX_CHARS = 1200  # of one text on the page; the full texts are in top.csv and top.jsonl


def write_run_report(
    path: str | os.PathLike,
    config: dict,
    top: TopScores,
    train_texts: Sequence[str] | None,
    query_texts: Sequence[str] | None,
    *,
    queries_shown: int = 20,
    k: int = 10,
) -> None:
    """Write ``path``: one self-contained HTML page (no script).

    ``config``: the run's settings (``ScoreConfig.to_dict()``: ``method``, ``data``, ``model``, ``name``,
    ``queries``). ``top``: each query's top proponents and opponents (``[n_query, K]``, positive =
    proponent; standard errors for Daunce, and those more than two from zero are marked). Texts (escaped,
    monospace) or None, then examples are shown by index. The first ``queries_shown`` queries, ``k`` of
    each kind per query.
    """
    method = str(config.get("method", top.method or "scores"))
    shown = range(min(queries_shown, len(top)))
    kept = top.top_values.shape[1]

    def query_view(q: int) -> str:
        return f'<div class="t qtext">{esc(_clip(query_texts[q]))}</div>' if query_texts else ""

    def train_view(i: int) -> str:
        label = f'<span class="muted">#{i}</span>'
        return f'{label}<div class="t">{esc(_clip(train_texts[i]))}</div>' if train_texts else label

    more = (
        f" (the first {len(shown)} of {len(top)}; all of them in top.csv and top.jsonl)"
        if len(shown) < len(top)
        else ""
    )
    body = "".join(
        [
            f"<h1>dunegrass: {esc(method)} on {esc(config.get('data', ''))}</h1>",
            f"<p>Model {esc(config.get('model', ''))}; {len(top)} queries from {esc(config.get('queries', ''))}, "
            f"each with its {kept} highest- and lowest-scoring of {top.n_train} training examples. No LDS "
            "here: that needs retraining ground truth (<code>dunegrass demo</code> has it).</p>",
            scores_note([method], top.top_stderr is not None),
            f"<h2>Most influential training examples</h2><p>Per query{more}: its {min(k, kept)} highest and "
            "lowest scores (proponents when positive, opponents when negative).</p>",
            text_lists({method: top}, shown, query_view, train_view, k),
        ]
    )
    write_page(path, f"dunegrass: {config.get('name', method)}", body)


def _clip(text: str) -> str:
    text = str(text)
    return text if len(text) <= MAX_CHARS else f"{text[:MAX_CHARS]}… ({len(text) - MAX_CHARS} more characters)"
