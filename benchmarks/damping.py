"""Damping that chooses itself: ``damping="auto"`` against a sweep of fixed relative dampings, by LDS.

For each built-in task (the digits MLP, the MNIST-1D MLP, the digits BatchNorm CNN, the docstring LM;
``--quick`` sizes, whose subset-retraining ground truths the other benchmarks cache under
runs/bench-cache and runs/lm) and each gradient method with a damping knob (block eFIM on SparseJL
features at k = 256, 1024 and 2048 — one block over the whole model, so k/n varies —, and one block per
parameter tensor at k ≤ 1024 each, FactGraSS with
k = 1024 per layer, LoGra 32 × 32), LDS at λ = r · tr(F_l)/k_l for r on a grid, with ``damping="auto"``
(one r = Σ_l k_l / Σ_l min(n, k_l) for all blocks, ``dunegrass.influence.auto_damping``), and with two rules
set aside, scored here from the method's own features (which the script first checks against the library's
scores at a fixed damping): ``likelihood``, each block's r chosen by the held-out Gaussian log-likelihood of
its features (the even rows under the odd rows' damped Fisher and back), and ``dof``, one r for all blocks
under which the damped Fisher's effective degrees of freedom Σ μ/(μ + λ) are 1/8 of its rank Σ min(n, k_l).
Features are computed once per method and task (the
damping is not part of the feature cache); every row refits the Fisher and scores. Rows: ``{"task",
"method", "damping", "lds", "lds_ci", "seconds", "chosen"}``, ``chosen`` the median relative damping
the rule set over the blocks (and its range).

    python benchmarks/damping.py [--json benchmarks/results/damping.json]
    python benchmarks/damping.py --tasks lm --lm-epochs 32 --json benchmarks/results/damping_lm_e32.json

    python benchmarks/damping.py --tasks mnist1d --mnist1d-epochs 5 --json benchmarks/results/damping_mnist1d_e5.json

The second: the LM task with a fine-tune four times as long (θ₀ and its ground truth), to see whether the
LM's large best damping is its short fine-tune's; the third: the MNIST-1D MLP trained a quarter as long
(from random weights), the same question for a model not fine-tuned.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import numpy as np
import torch

import dunegrass as dg
from dunegrass.bench import digits_cnn, digits_mlp, mnist1d_mlp

from common import Timer, ground_truth, print_table, quick_lm, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
GRID = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0)
METHODS = {
    "eFIM on SparseJL 256": lambda m, t, d: dg.GradientInfluence(m, t, compressor="sjlt:256", damping=d),
    "eFIM on SparseJL 1024": lambda m, t, d: dg.GradientInfluence(m, t, compressor="sjlt:1024", damping=d),
    "eFIM on SparseJL 2048": lambda m, t, d: dg.GradientInfluence(m, t, compressor="sjlt:2048", damping=d),
    "eFIM per tensor, SparseJL 1024": lambda m, t, d: dg.GradientInfluence(
        m, t, compressor="sjlt:1024", per_parameter=True, damping=d
    ),
    "FactGraSS k=1024": lambda m, t, d: dg.FactGraSS(m, t, k=1024, damping=d),
    "LoGra 32x32": lambda m, t, d: dg.LoGra(m, t, k_in=32, k_out=32, damping=d),
}
# the held-out likelihood's candidates: λ / (tr(F)/k) from 1e-4 to 10, five per decade
LIKELIHOOD_RATIOS = torch.logspace(-4, 1, 26, dtype=torch.float64)
# the degrees-of-freedom rule's target: the damped Fisher keeps this fraction of its rank
DOF_FRACTION = 1 / 8


def held_out_log_likelihood(fit: torch.Tensor, held: torch.Tensor, lams: torch.Tensor) -> torch.Tensor:
    """``[len(lams)]``: −½[log det(fit + λI) + tr((fit + λI)⁻¹ held)], in fit's eigenbasis."""
    s, u = torch.linalg.eigh(fit)
    d = ((u.T @ held) * u.T).sum(1)  # u_jᵀ held u_j
    denom = s.clamp_min(0)[None, :] + lams[:, None]
    return -0.5 * (denom.log().sum(1) + (d[None, :] / denom).sum(1))


def likelihood_ratio(phi: torch.Tensor) -> float:
    """The relative damping under which each half of a block's features is likeliest given the other's Fisher."""
    even, odd = phi[0::2], phi[1::2]
    fa, fb = even.T @ even / len(even), odd.T @ odd / len(odd)
    mean_eig = float(torch.trace(phi.T @ phi)) / len(phi) / phi.shape[1]
    if not mean_eig > 0:
        return 0.1
    lams = LIKELIHOOD_RATIOS * mean_eig
    score = held_out_log_likelihood(fa, fb, lams) + held_out_log_likelihood(fb, fa, lams)
    return float(LIKELIHOOD_RATIOS[int(score.argmax())])


def per_block(rule):
    """A rule over all blocks' features from one that looks at each block alone."""
    return lambda phis: [rule(phi) for phi in phis]


def dof_ratio(phis: list[torch.Tensor], fraction: float = DOF_FRACTION) -> list[float]:
    """One relative damping r for all blocks such that the damped Fisher's effective degrees of freedom,
    Σ_l Σ_j μ_lj/(μ_lj + r·mean(μ_l)), are ``fraction`` of the rank Σ_l min(n, k_l) (bisection in log r)."""
    n = len(phis[0])
    scaled = torch.cat([mu / mu.mean() for mu in (torch.linalg.eigvalsh(p.T @ p / n).clamp_min(0) for p in phis)])
    target = fraction * sum(min(n, p.shape[1]) for p in phis)
    lo, hi = 1e-8, 1e8
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if float((scaled / (scaled + mid)).sum()) > target else (lo, mid)
    return [(lo * hi) ** 0.5] * len(phis)


def scores_with(attr, queries, rule) -> tuple[torch.Tensor, list[float]]:
    """Scores ``[n_query, n_train]`` from a fitted method's own features, block l damped by the relative damping
    ``rule(blocks' features)[l]``, and the ratios it chose."""
    store, blocks = attr.stores[0], attr.preconditioners[0].blocks
    train = torch.from_numpy(np.concatenate([c for _, c in store.columns(0, blocks[-1][1])])).double()
    query = attr.query_features(queries).double().cpu()
    out, chosen = torch.zeros(len(query), len(train), dtype=torch.float64), []
    ratios = rule([train[:, a:b] for a, b in blocks])
    for (a, b), ratio in zip(blocks, ratios):
        phi = train[:, a:b]
        fisher = phi.T @ phi / len(phi)
        lam = ratio * torch.trace(fisher) / (b - a)
        out += torch.linalg.solve(fisher + lam * torch.eye(b - a, dtype=torch.float64), query[:, a:b].T).T @ phi.T
        chosen.append(ratio)
    return out, chosen


def tasks(lm_epochs: float = 8.0, words: tuple[str, ...] = ("",), mnist1d_epochs: float = 20.0):
    """(name, model, task, train, queries, ground truth): the quick tasks whose ground truth is cached and whose
    name contains one of ``words``; the LM fine-tuned for ``lm_epochs``, the MNIST-1D MLP trained for
    ``mnist1d_epochs``."""
    m1d = "mnist1d-mlp" + ("" if mnist1d_epochs == 20.0 else f"-e{mnist1d_epochs:g}")
    for name, make in (
        ("digits-mlp", lambda: digits_mlp(n_train=500, hidden=64)),
        (m1d, lambda: mnist1d_mlp(n_train=1000, epochs=mnist1d_epochs)),
        ("digits-cnn", lambda: digits_cnn(n_train=500)),
    ):
        if not any(w in name for w in words):
            continue
        bt = make()
        queries = (bt.test[0][:50], bt.test[1][:50])
        gt, _ = ground_truth(bt, queries, num_subsets=50, num_seeds=1)
        yield name, bt.model, bt.task, bt.train, queries, gt
    if not any(w in "lm-docstrings" for w in words):
        return
    bench, gt, suffix = quick_lm(lm_epochs)
    yield "lm-docstrings" + suffix, bench.model, bench.task, bench.train, bench.queries, gt


def sweep(name, model, task, train, queries, gt, method, make) -> list[dict]:
    rows = []

    def record(damping, res, seconds, chosen):
        row = {"task": name, "method": method, "damping": damping, "lds": res.mean, "lds_ci": [res.low, res.high]}
        row["seconds"] = seconds
        if chosen:
            chosen = sorted(chosen)
            row["chosen"] = {"median": statistics.median(chosen), "min": chosen[0], "max": chosen[-1]}
        rows.append(row)
        print(f"  {name:<14} {method:<22} damping {damping!s:<10} LDS {res}  {seconds:.1f} s"
              + (f"  (r: {row['chosen']})" if chosen else ""))  # fmt: skip

    with tempfile.TemporaryDirectory() as cache:
        for damping in (*GRID, "auto"):
            with Timer() as t:
                attr = make(model, task, damping).fit(train, cache_dir=cache)
                scores = attr.score(queries)
            chosen = list(attr.preconditioners[0].chosen.values()) if damping == "auto" else []
            record(damping, dg.lds(scores, gt), t.seconds, chosen)
        # the scoring below reproduces the library's at a fixed damping before it judges the likelihood rule
        mine, _ = scores_with(attr, queries, per_block(lambda phi: 0.1))
        fixed = next(r for r in rows if r["damping"] == 0.1)
        if abs(dg.lds(mine, gt).mean - fixed["lds"]) > 2e-3:
            raise SystemExit(f"{name} {method}: the script's scores do not reproduce the library's at damping 0.1")
        for label, rule in (("likelihood", per_block(likelihood_ratio)), ("dof", dof_ratio)):
            with Timer() as t:
                scores, chosen = scores_with(attr, queries, rule)
            record(label, dg.lds(scores, gt), t.seconds, chosen)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per task and method: the best fixed damping, the default's (0.1) LDS, auto's and the likelihood rule's,
    and their gaps to the best."""
    out = []
    for key in sorted({(r["task"], r["method"]) for r in rows}):
        mine = [r for r in rows if (r["task"], r["method"]) == key]
        fixed = [r for r in mine if isinstance(r["damping"], float)]
        best = max(fixed, key=lambda r: r["lds"])
        default = next(r for r in fixed if r["damping"] == 0.1)
        auto = next(r for r in mine if r["damping"] == "auto")
        held = next(r for r in mine if r["damping"] == "likelihood")
        dof = next(r for r in mine if r["damping"] == "dof")
        out.append({
            "task": key[0], "method": key[1], "best_damping": best["damping"], "best_lds": best["lds"],
            "default_lds": default["lds"], "auto_lds": auto["lds"], "auto_chose": auto["chosen"]["median"],
            "likelihood_lds": held["lds"], "likelihood_chose": held["chosen"]["median"],
            "auto_gap": best["lds"] - auto["lds"], "default_gap": best["lds"] - default["lds"],
            "likelihood_gap": best["lds"] - held["lds"], "dof_lds": dof["lds"], "dof_chose": dof["chosen"]["median"],
            "dof_gap": best["lds"] - dof["lds"],
        })  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=os.path.join(HERE, "results", "damping.json"))
    ap.add_argument("--tasks", help="comma-separated words; run only the tasks whose name contains one (e.g. lm)")
    ap.add_argument("--lm-epochs", type=float, default=8.0, help="the LM task's fine-tune length (default 8)")
    ap.add_argument("--mnist1d-epochs", type=float, default=20.0, help="the MNIST-1D MLP's training (default 20)")
    args = ap.parse_args()
    rows = []
    words = tuple(args.tasks.split(",")) if args.tasks else ("",)
    for name, model, task, train, queries, gt in tasks(args.lm_epochs, words, args.mnist1d_epochs):
        for method, make in METHODS.items():
            rows += sweep(name, model, task, train, queries, gt, method, make)
    table = summary(rows)
    print()
    print_table(table, ["task", "method", "best_damping", "best_lds", "default_lds", "auto_lds", "auto_chose",
                        "likelihood_lds", "likelihood_chose", "dof_lds", "dof_chose"])  # fmt: skip
    for rule in ("auto", "likelihood", "dof"):
        within = sum(r[f"{rule}_gap"] <= 0.01 for r in table)
        worst = max(r[f"{rule}_gap"] for r in table)
        print(f"{rule}: within 0.01 of the best fixed damping on {within} of {len(table)} pairs, worst gap {worst:.3f}")
    write_json(args.json, "damping", rows, summary=table, grid=list(GRID), command=" ".join(["python", *sys.argv]))


if __name__ == "__main__":
    main()
