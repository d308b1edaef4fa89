"""Where each method wins: LDS against wall-clock on every built-in task, one plot per task.

Tasks: the digits MLP, the MNIST-1D MLP and the digits BatchNorm CNN at their ``--quick`` sizes (500,
1000 and 500 training examples, 50 test queries), whose subset-retraining ground truths (50 subsets of
half the data) the other benchmarks cache under runs/bench-cache. Each method runs at a few budgets
(members, chains × draws, projection sizes) and the budgets of one method are joined by a line:

- Daunce (``if``, default recipe, vmapped members), K ∈ {8, 32, 128}, and with correlations instead of
  covariances (``normalize=True``), K ∈ {32, 128};
- BayesianInfluence with devinterp's defaults (nβ = 10, γ = 1000, η = 1e-4), chains × draws ∈ {4 × 25,
  10 × 100, 20 × 250};
- GraSS and block eFIM on SparseJL features, k ∈ {256, 1024, 4096} (up to the number of parameters);
  FactGraSS and LoGra (defaults);
  TRAK (k = 2048); TracIn; exact influence (Gauss-Newton, damping 0.1) on the digits MLP.

Seconds are fit + score on this machine's CPU (one process, nothing else running).

    python benchmarks/lds_vs_seconds.py [--tasks digits-mlp,...] [--json benchmarks/results/lds_vs_seconds.json]

Writes the JSON (rows ``{"task", "method", "budget", "lds", "lds_ci", "seconds"}``) and
``benchmarks/results/lds_vs_seconds-<task>.png``.
"""

from __future__ import annotations

import argparse
import os

import torch

import dunegrass as dg
from dunegrass.bench import digits_cnn, digits_mlp, mnist1d_mlp

from common import Timer, ground_truth, print_table, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = {
    "digits-mlp": lambda: digits_mlp(n_train=500, hidden=64),
    "mnist1d-mlp": lambda: mnist1d_mlp(n_train=1000, epochs=20.0),
    "digits-cnn": lambda: digits_cnn(n_train=500),
}


def runs(name: str, bt) -> list[tuple[str, str, object]]:
    """(method, budget, factory) for every point on the task's plot."""
    m, t = bt.model, bt.task
    out = [("Daunce", f"K={K}", lambda K=K: dg.Daunce(m, t, num_models=K)) for K in (8, 32, 128)]
    out += [
        ("Daunce (normalize=True)", f"K={K}", lambda K=K: dg.Daunce(m, t, num_models=K, normalize=True))
        for K in (32, 128)
    ]
    out += [
        ("BIF (devinterp defaults)", f"{c}x{d}", lambda c=c, d=d: dg.BayesianInfluence(m, t, chains=c, draws=d))
        for c, d in ((4, 25), (10, 100), (20, 250))
    ]
    sizes = [k for k in (256, 1024, 4096) if k <= sum(p.numel() for p in m.parameters())]  # the CNN has 3842
    out += [("GraSS", f"k={k}", lambda k=k: dg.GraSS(m, t, k=k)) for k in sizes]
    out += [
        ("eFIM on SparseJL", f"k={k}", lambda k=k: dg.GradientInfluence(m, t, compressor=f"sjlt:{k}")) for k in sizes
    ]
    out += [
        ("FactGraSS", "default", lambda: dg.FactGraSS(m, t)),
        ("LoGra", "default", lambda: dg.LoGra(m, t)),
        ("TRAK", "k=2048", lambda: dg.TRAK(m, t, k=2048)),
        ("TracIn", "identity", lambda: dg.TracIn(m, t)),
    ]
    if name == "digits-mlp":
        out.append(("ExactInfluence", "GN", lambda: dg.ExactInfluence(m, t, hessian="gauss_newton", damping=0.1)))
    return out


def plot(name: str, rows: list[dict], path: str) -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 4.0))
    ax = fig.subplots()
    colors = colormaps["tab10"].colors
    for j, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seconds"])
        xs, ys = [r["seconds"] for r in mine], [r["lds"] for r in mine]
        ax.plot(xs, ys, "o-", color=colors[j % 10], ms=5, label=method)
        for r in mine:
            ax.annotate(r["budget"], (r["seconds"], r["lds"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("seconds (fit + score, 2-core CPU)")
    ax.set_ylabel("LDS (mean Spearman over 50 queries)")
    ax.set_title(name, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--json", default=os.path.join(HERE, "results", "lds_vs_seconds.json"))
    args = ap.parse_args()
    rows = []
    for name in args.tasks.split(","):
        torch.manual_seed(0)
        bt = TASKS[name]()
        queries = (bt.test[0][:50], bt.test[1][:50])
        gt, _ = ground_truth(bt, queries, num_subsets=50, num_seeds=1)
        mine = []
        for method, budget, factory in runs(name, bt):
            with Timer() as t:
                scores = factory().fit(bt.train).score(queries)
            res = dg.lds(scores, gt)
            mine.append({"task": name, "method": method, "budget": budget, "lds": res.mean,
                         "lds_ci": [res.low, res.high], "seconds": t.seconds})  # fmt: skip
            print(f"  {name:<12} {method:<26} {budget:<8} LDS {res}  {t.seconds:.1f} s", flush=True)
        plot(name, mine, os.path.join(os.path.dirname(args.json), f"lds_vs_seconds-{name}.png"))
        rows += mine
    print()
    print_table(rows, ["task", "method", "budget", "lds", "seconds"])
    write_json(args.json, "lds_vs_seconds", rows, command="python benchmarks/lds_vs_seconds.py")


if __name__ == "__main__":
    main()
