"""Damping that chooses itself: ``damping="auto"`` against a sweep of fixed relative dampings, by LDS.

For each built-in task (the digits MLP, the MNIST-1D MLP, the digits BatchNorm CNN, the docstring LM;
``--quick`` sizes, whose subset-retraining ground truths the other benchmarks cache under
runs/bench-cache and runs/lm) and each gradient method with a damping knob (block eFIM on SparseJL
features, FactGraSS with k = 1024 per layer, LoGra 32 × 32: blocks of at most 1024, whose eigendecompositions
"auto" needs take a second each), LDS at λ = r · tr(F_l)/k_l for r on a grid, then with ``damping="auto"``
(held-out log-likelihood per block, ``dunegrass.influence.auto_damping``). Features are computed once
per method and task (the damping is not part of the feature cache); every row refits the Fisher and
scores. Rows: ``{"task", "method", "damping", "lds", "lds_ci", "seconds", "chosen"}`` with ``chosen`` the
median relative damping "auto" picked over the blocks (and its range).

    python benchmarks/damping.py [--json benchmarks/results/damping.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import dunegrass as dg
from dunegrass.bench import digits_cnn, digits_mlp, mnist1d_mlp
from dunegrass.bench.lm import lm_ground_truth, lm_task

from common import Timer, ground_truth, print_table, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
GRID = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
METHODS = {
    "eFIM on SparseJL 1024": lambda m, t, d: dg.GradientInfluence(m, t, compressor="sjlt:1024", damping=d),
    "FactGraSS k=1024": lambda m, t, d: dg.FactGraSS(m, t, k=1024, damping=d),
    "LoGra 32x32": lambda m, t, d: dg.LoGra(m, t, k_in=32, k_out=32, damping=d),
}


def tasks():
    """(name, model, task, train, queries, ground truth): the quick tasks whose ground truth is cached."""
    for name, make in (
        ("digits-mlp", lambda: digits_mlp(n_train=500, hidden=64)),
        ("mnist1d-mlp", lambda: mnist1d_mlp(n_train=1000, epochs=20.0)),
        ("digits-cnn", lambda: digits_cnn(n_train=500)),
    ):
        bt = make()
        queries = (bt.test[0][:50], bt.test[1][:50])
        gt, _ = ground_truth(bt, queries, num_subsets=50, num_seeds=1)
        yield name, bt.model, bt.task, bt.train, queries, gt
    cache = os.path.join(HERE, "..", "runs", "lm")
    bench = lm_task(quick=True, cache_dir=cache)
    gt = lm_ground_truth(bench, num_subsets=50, cache_path=os.path.join(cache, "gt-quick-50.npz"))
    yield "lm-docstrings", bench.model, bench.task, bench.train, bench.queries, gt


def sweep(name, model, task, train, queries, gt, method, make) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for damping in (*GRID, "auto"):
            with Timer() as t:
                attr = make(model, task, damping).fit(train, cache_dir=cache)
                scores = attr.score(queries)
            res = dg.lds(scores, gt)
            chosen = sorted(attr.preconditioners[0].chosen.values()) if damping == "auto" else []
            row = {"task": name, "method": method, "damping": damping, "lds": res.mean, "lds_ci": [res.low, res.high]}
            row["seconds"] = t.seconds
            if chosen:
                row["chosen"] = {"median": statistics.median(chosen), "min": chosen[0], "max": chosen[-1]}
            rows.append(row)
            print(f"  {name:<14} {method:<22} damping {damping!s:<7} LDS {res}  {t.seconds:.1f} s"
                  + (f"  (auto chose {row['chosen']})" if chosen else ""))  # fmt: skip
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per task and method: the best fixed damping, the default's (0.1) LDS and auto's, and the gaps."""
    out = []
    for key in sorted({(r["task"], r["method"]) for r in rows}):
        mine = [r for r in rows if (r["task"], r["method"]) == key]
        fixed = [r for r in mine if r["damping"] != "auto"]
        best = max(fixed, key=lambda r: r["lds"])
        default = next(r for r in fixed if r["damping"] == 0.1)
        auto = next(r for r in mine if r["damping"] == "auto")
        out.append({
            "task": key[0], "method": key[1], "best_damping": best["damping"], "best_lds": best["lds"],
            "default_lds": default["lds"], "auto_lds": auto["lds"], "auto_chose": auto.get("chosen", {}).get("median"),
            "auto_gap": best["lds"] - auto["lds"], "default_gap": best["lds"] - default["lds"],
        })  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=os.path.join(HERE, "results", "damping.json"))
    args = ap.parse_args()
    rows = []
    for name, model, task, train, queries, gt in tasks():
        for method, make in METHODS.items():
            rows += sweep(name, model, task, train, queries, gt, method, make)
    table = summary(rows)
    print()
    print_table(table, ["task", "method", "best_damping", "best_lds", "default_lds", "auto_lds", "auto_chose"])
    write_json(args.json, "damping", rows, summary=table, grid=list(GRID), command="python benchmarks/damping.py")


if __name__ == "__main__":
    main()
