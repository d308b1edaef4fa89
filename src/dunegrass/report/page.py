"""The page around the sections: one self-contained HTML file (inline CSS, embedded images, no script)."""

from __future__ import annotations

import html
import math
import os

from ..store.atomic import atomic_write_bytes

_CSS = """
body{font-family:system-ui,sans-serif;color:#222;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 7px;vertical-align:top}
th{background:#f5f5f5;text-align:left}.num{text-align:right;font-variant-numeric:tabular-nums}
.note{background:#f7f9fc;border-left:3px solid #1f6fb4;padding:.5em 1em;font-size:.92em}
.note ul{margin:.3em 0;padding-left:1.2em}.muted{color:#666;font-size:.9em}
.t{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.85em;max-width:720px}
.digit{width:40px;height:40px;image-rendering:pixelated;border:1px solid #ccc;display:block;margin:auto}
.query{display:flex;align-items:center;gap:1em}.digit.big{width:64px;height:64px;margin:0}
.grid .cell{width:72px;text-align:center;font-size:.75em}.cell .err{display:block}
.pos{color:#17803d}.neg{color:#b42318}.sig{color:#b7791f;font-weight:bold}.err{color:#666}
.plot{max-width:100%}.qtext{background:#f4f4f4;padding:.4em .6em;border-radius:4px}
"""


def esc(text: object) -> str:
    """HTML-escaped text (quotes included): nothing from data or configs reaches the page unescaped."""
    return html.escape(str(text), quote=True)


def img(png_base64: str, alt: str, cls: str = "") -> str:
    klass = f' class="{cls}"' if cls else ""
    return f'<img{klass} alt="{esc(alt)}" src="data:image/png;base64,{png_base64}">'


def score_html(value: float, stderr: float | None = None) -> str:
    """A score coloured by its sign, with ``± stderr`` and ★ when it is more than two standard errors from 0."""
    if not math.isfinite(value):
        return f'<span class="err">{esc(value)}</span>'
    text = f'<span class="{"pos" if value >= 0 else "neg"}">{value:+.3g}</span>'
    if stderr is None:
        return text
    if abs(value) > 2 * stderr:
        text += ' <span class="sig" title="more than two standard errors from zero">★</span>'
    return text + f' <span class="err">± {stderr:.2g}</span>'


def write_page(path: str | os.PathLike, title: str, body: str) -> None:
    """Write the HTML page atomically."""
    page = (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
        '<link rel="icon" href="data:,">'  # no favicon request: the page loads nothing from anywhere
        f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
    atomic_write_bytes(path, page.encode("utf-8"))
