"""Per query and method: the top proponents and opponents with their scores (the part both reports share).

Images (digits) are laid out as a grid, one row per method; texts as a list, one table per method, since a
training text needs the page's width.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from ..scores import TopScores
from .page import esc, score_html

View = Callable[[int], str]  # index → HTML of that example (an image, or escaped text)


Ranked = list[tuple[int, float, float | None]]  # (train index, score, stderr or None), in rank order


def _ranked(top: TopScores, q: int, k: int) -> list[tuple[str, Ranked]]:
    """``[("highest scores", ranked), ("lowest scores", ranked)]`` of query ``q``, at most ``k`` of each (the
    lowest can be positive: the list is named by its end of the ranking, each score carries its sign)."""
    out = []
    for kind, (idx, vals), errs in (
        ("highest scores", top.top(), top.top_stderr),
        ("lowest scores", top.bottom(), top.bottom_stderr),
    ):
        err = (lambda r: None) if errs is None else (lambda r, errs=errs: float(errs[q, r]))
        out.append((kind, [(int(idx[q, r]), float(vals[q, r]), err(r)) for r in range(min(k, idx.shape[1]))]))
    return out


def image_grid(
    rankings: Mapping[str, TopScores], queries: Sequence[int], query_view: View, train_view: View, k: int = 5
) -> str:
    """For each query: the query, then one row per method with its ``k`` proponents and ``k`` opponents."""
    blocks = []
    for q in queries:
        rows = []
        for method, top in rankings.items():
            cells = [f"<th>{esc(method)}</th>"]
            for _, ranked in _ranked(top, q, k):
                cells += [f'<td class="cell">{train_view(i)}{score_html(v, e)}</td>' for i, v, e in ranked]
                cells += ["<td></td>"] * (k - len(ranked))
            rows.append(f"<tr>{''.join(cells)}</tr>")
        head = (
            f'<tr><th>method</th><th colspan="{k}">highest scores (+: proponents)</th>'
            f'<th colspan="{k}">lowest scores (−: opponents)</th></tr>'
        )
        blocks.append(f"<h3>Query {q}</h3>{query_view(q)}<table class='grid'>{head}{''.join(rows)}</table>")
    return "".join(blocks)


def text_lists(
    rankings: Mapping[str, TopScores], queries: Sequence[int], query_view: View, train_view: View, k: int = 10
) -> str:
    """For each query: its text, then per method a table of its ``k`` proponents and ``k`` opponents."""
    blocks = []
    for q in queries:
        tables = []
        for method, top in rankings.items():
            rows = []
            for kind, ranked in _ranked(top, q, k):
                rows.append(f'<tr><th colspan="3">{kind}</th></tr>')
                rows += [
                    f'<tr><td class="num">{r + 1}</td><td>{train_view(i)}</td>'
                    f'<td class="num">{score_html(v, e)}</td></tr>'
                    for r, (i, v, e) in enumerate(ranked)
                ]
            tables.append(f"<h4>{esc(method)}</h4><table>{''.join(rows)}</table>")
        blocks.append(f"<h3>Query {q}</h3>{query_view(q)}{''.join(tables)}")
    return "".join(blocks)
