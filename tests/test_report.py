"""The HTML reports, built from small synthetic inputs: their plots decode, every method has its rows, texts are
escaped, significance is marked where the standard errors say so, and a real browser loads every image."""

import base64
import io
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch

from dunegrass.errors import DunegrassError
from dunegrass.eval import GroundTruth, lds
from dunegrass.report import SIGN_NOTE, write_report, write_run_report
from dunegrass.scores import Scores, TopScores

METHODS = ("TRAK", "TracIn", "GradientInfluence", "GraSS", "ExactInfluence", "Daunce")
N_TRAIN, N_QUERY, M = 40, 6, 24
PNG = re.compile(r'<img(?P<attrs>[^>]*) src="data:image/png;base64,(?P<data>[^"]+)"')


def _demo_inputs(seed: int = 0):
    """Scores of six methods (the true effects plus more or less noise; Daunce with standard errors), the
    ground truth those effects produce, and results.json as the demo writes it."""
    gen = torch.Generator().manual_seed(seed)
    effect = torch.randn(N_QUERY, N_TRAIN, generator=gen)
    masks = torch.rand(M, N_TRAIN, generator=gen) < 0.5
    losses = -(masks.float() @ effect.T) + 0.5 * torch.randn(M, N_QUERY, generator=gen)  # lower = better
    gt = GroundTruth(masks, losses, {"num_subsets": M, "alpha": 0.5, "num_seeds": 1})
    scores = {}
    for j, name in enumerate(METHODS):
        scale = 10.0 ** (2 * j - 5)  # scales 10⁵ apart, as the methods' are
        values = scale * (effect + (0.3 + j) * torch.randn(N_QUERY, N_TRAIN, generator=gen))
        stderr = 8 * scale * torch.rand(N_QUERY, N_TRAIN, generator=gen) if name == "Daunce" else None
        scores[name] = Scores(values, stderr)
    methods = {}
    for j, (name, s) in enumerate(scores.items()):
        r = lds(s, gt)
        notes = "<script>alert('notes')</script>" if name == "TracIn" else f"setting {j}"
        methods[name] = {"lds": r.mean, "lds_ci": [r.low, r.high], "seconds": 0.2 * 3**j, "notes": notes}
    noise = lds(torch.randn(N_QUERY, N_TRAIN, generator=gen), gt)
    results = {
        "task": "digits-mlp",
        "accuracy": 0.93,
        "n_train": N_TRAIN,
        "n_queries": N_QUERY,
        "methods": methods,
        "baseline": {"random scores": {"lds": noise.mean, "lds_ci": [noise.low, noise.high]}},
        "ground_truth": {"num_subsets": M, "alpha": 0.5, "num_seeds": 1, "seconds": 1.5, "measurement": "query loss"},
    }
    rng = np.random.default_rng(seed)
    images = {
        "train_images": rng.uniform(0, 16, (N_TRAIN, 8, 8)),
        "query_images": rng.uniform(0, 16, (N_QUERY, 8, 8)),
        "train_labels": rng.integers(0, 10, N_TRAIN),
        "query_labels": rng.integers(0, 10, N_QUERY),
    }
    return results, scores, gt, images


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    results, scores, gt, images = _demo_inputs()
    path = tmp_path_factory.mktemp("demo") / "report.html"
    write_report(path, results, scores, gt, **images)
    return path, path.read_text(encoding="utf-8"), results, scores, gt


def _pngs(page: str) -> list[tuple[str, bytes]]:
    """(the <img> attributes, the decoded PNG) of every embedded image."""
    return [(m["attrs"], base64.b64decode(m["data"], validate=True)) for m in PNG.finditer(page)]


def _size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    return struct.unpack(">II", png[16:24])


def test_the_demo_report_has_both_plots_as_real_pictures(demo_report):
    from matplotlib.image import imread

    _, page, *_ = demo_report
    plots = [png for attrs, png in _pngs(page) if 'class="plot"' in attrs]
    assert len(plots) == 2  # LDS against seconds; the subset scatter
    for png in plots:
        width, height = _size(png)
        assert 400 <= width <= 1600 and 200 <= height <= 800 and 5_000 < len(png) < 300_000
        pixels = imread(io.BytesIO(png))
        assert pixels.shape[:2] == (height, width) and pixels[..., :3].std() > 0.05  # drawn on, not blank


def test_every_method_has_rows_for_each_shown_query_and_the_scale_of_its_scores(demo_report):
    _, page, results, scores, _ = demo_report
    grid = page[page.index("Most influential training examples") :]
    for name in METHODS:
        assert grid.count(f"<th>{name}</th>") == 3  # one row per shown query, GraSS included
        median = float(scores[name].values.abs().median())
        assert f"<td class='num'>{median:.2g}</td>" in page  # the table says how large each method's scores are
    digits = [png for attrs, png in _pngs(grid) if 'class="digit"' in attrs]
    assert len(digits) == 3 * len(METHODS) * 10 and {_size(png) for png in digits} == {(8, 8)}
    assert "Query 0" in grid and "Query 2" in grid and "Query 3" not in grid


def test_the_scatter_shows_a_typical_query_for_the_best_method(demo_report):
    _, page, results, scores, gt = demo_report
    best = max(results["methods"], key=lambda m: results["methods"][m]["lds"])
    r = lds(scores[best], gt)
    typical = int(np.argmin(np.abs(r.per_query - r.mean)))
    assert f"The subsets behind LDS, for query {typical}<" in page


def test_the_notes_say_what_scores_mean_and_nothing_reaches_the_page_unescaped(demo_report):
    _, page, *_ = demo_report
    assert SIGN_NOTE.split(":")[0] in page and "positive score means" in page
    assert "orders of magnitude" in page and "covariance" in page and "dot product" in page
    assert "<script" not in page and "&lt;script&gt;alert(&#x27;notes&#x27;)&lt;/script&gt;" in page


def test_daunce_scores_carry_their_standard_errors_and_exactly_the_significant_ones_are_starred(demo_report):
    _, page, _, scores, _ = demo_report
    daunce = scores["Daunce"]
    expected = 0
    for q in range(3):
        for idx in (daunce.top(5).indices[q], daunce.bottom(5).indices[q]):
            expected += int((daunce.values[q, idx].abs() > 2 * daunce.stderr[q, idx]).sum())
    rows = re.findall(r"<tr><th>Daunce</th>(.*?)</tr>", page)
    assert len(rows) == 3 and all(row.count("±") == 10 for row in rows)
    assert sum(row.count("★") for row in rows) == expected and 0 < expected < 30
    others = re.findall(r"<tr><th>(?:TRAK|GraSS)</th>(.*?)</tr>", page)
    assert others and not any("±" in row or "★" in row for row in others)


def test_scores_for_methods_the_results_do_not_list_are_refused(tmp_path):
    results, scores, gt, images = _demo_inputs()
    del scores["GraSS"]
    with pytest.raises(DunegrassError, match="GraSS"):
        write_report(tmp_path / "report.html", results, scores, gt, **images)


TRAIN_TEXTS = [f"example {i}: the sun rose" for i in range(N_TRAIN)]
TRAIN_TEXTS[3] = "<script>alert('train')</script> & more"
QUERY_TEXTS = ["what rose? <b>bold</b>", "a second query", "a third"]
CONFIG = {"name": "run<1>", "method": "daunce", "data": "train.jsonl", "model": "tiny", "queries": "q.jsonl"}


def _top(with_stderr: bool, k: int = 4) -> TopScores:
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(len(QUERY_TEXTS), N_TRAIN, generator=gen)
    values[:, 3] = 10.0  # the <script> text is every query's top proponent
    stderr = torch.rand(len(QUERY_TEXTS), N_TRAIN, generator=gen) if with_stderr else None
    s = Scores(values, stderr)
    top, bottom = s.top(k), s.bottom(k)
    pick = (lambda idx: None) if stderr is None else (lambda idx: stderr.gather(1, idx))
    return TopScores(*top, *bottom, N_TRAIN, pick(top.indices), pick(bottom.indices), "daunce")


def test_the_run_report_shows_texts_as_escaped_text_and_marks_significant_scores(tmp_path):
    top = _top(with_stderr=True)
    path = tmp_path / "report.html"
    write_run_report(path, CONFIG, top, TRAIN_TEXTS, QUERY_TEXTS)
    page = path.read_text(encoding="utf-8")
    assert "<script" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(&#x27;train&#x27;)&lt;/script&gt; &amp; more" in page
    assert "what rose? &lt;b&gt;bold&lt;/b&gt;" in page and "run&lt;1&gt;" in page
    assert "positive score means" in page and "covariance" in page and "LDS" in page
    assert 'class="plot"' not in page and "data:image/png" not in page  # no ground truth: no LDS plots
    significant = 0
    for (_, vals), errs in ((top.top(), top.top_stderr), (top.bottom(), top.bottom_stderr)):
        significant += int((vals.abs() > 2 * errs).sum())
    lists = page[page.index("Most influential training examples") :]
    assert lists.count("±") == 2 * 4 * len(QUERY_TEXTS) and lists.count("★") == significant > 0


def test_the_run_report_without_standard_errors_or_texts(tmp_path):
    path = tmp_path / "report.html"
    write_run_report(path, {**CONFIG, "method": "grass"}, _top(with_stderr=False), None, None)
    page = path.read_text(encoding="utf-8")
    assert "±" not in page and "★" not in page and "#3" in page and "sparse projection" in page


def test_writing_a_report_leaves_the_users_matplotlib_backend_alone(tmp_path):
    import matplotlib

    results, scores, gt, images = _demo_inputs()
    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        write_report(tmp_path / "report.html", results, scores, gt, **images)
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)


# Injected into a copy of the page (the report itself has no script): records load errors and, once the
# page has loaded, how many images did not decode, in a marker that --dump-dom prints.
CHECK = """<script>
var failures = [];
addEventListener("error", function (e) { failures.push(e.message || "failed to load a " + e.target.tagName); }, true);
addEventListener("load", function () {
  var broken = Array.from(document.images).filter(function (i) { return !i.complete || i.naturalWidth === 0; });
  var mark = document.createElement("pre");
  mark.id = "browser-check";
  mark.textContent = "images=" + document.images.length + " broken=" + broken.length + " errors=" + failures.join("|");
  document.body.appendChild(mark);
});
</script>"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed: the browser check is skipped")
@pytest.mark.parametrize("kind", ["demo", "run"])
def test_a_real_browser_loads_every_image_without_console_errors(demo_report, tmp_path, kind):
    if kind == "demo":
        page = demo_report[1]
    else:
        write_run_report(tmp_path / "report.html", CONFIG, _top(with_stderr=True), TRAIN_TEXTS, QUERY_TEXTS)
        page = (tmp_path / "report.html").read_text(encoding="utf-8")
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</title>", "</title>" + CHECK, 1), encoding="utf-8")
    run = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=1",
            "--virtual-time-budget=5000",
            "--dump-dom",
            checked.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line]
    assert not console, "console messages:\n" + "\n".join(console)
    mark = re.search(r'<pre id="browser-check">images=(\d+) broken=(\d+) errors=(.*?)</pre>', run.stdout)
    assert mark, f"the page did not finish loading (rc {run.returncode}):\n{run.stderr[-3000:]}"
    images, broken, errors = int(mark[1]), int(mark[2]), mark[3]
    assert images == len(PNG.findall(page)) and broken == 0 and errors == ""
