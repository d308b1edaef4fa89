"""Daunce LDS against K and wall-clock, next to the gradient methods, on the digits and MNIST-1D MLPs.

Tables: (1) LDS vs K ∈ {8, 16, 32, 64, 128} — and on to 1024 (digits) / 512 (MNIST-1D), to compare
at equal wall-clock — for Daunce (`if`, default recipe) with its fit+score seconds, beside TRAK,
GradientInfluence (Gaussian JL 4096) and exact influence (Gauss-Newton; last layer on MNIST-1D, whose
full Hessian is too large); (2) the three variants side by side at K = 128, and r = 0.5 (the ground
truth's α); (3) a sensitivity table over lr and steps (K = 64) on both. Ground truth:
50 subset retrainings (α = 0.5, 3 seeds each), the same cache as benchmarks/foundation.py.

    python benchmarks/daunce_lds.py [--quick] [--json benchmarks/results/daunce_lds.json]

JSON rows: {"task", "method", "K", "variant", "lds", "lds_ci", "seconds"} (+ "lr", "steps" where set).
"""

from __future__ import annotations

import argparse

import torch

import dunegrass as dg
from dunegrass.bench import digits_mlp, mnist1d_mlp
from dunegrass.methods.daunce import Daunce

from common import Timer, ground_truth, print_table, write_json

COLUMNS = [
    "task",
    "method",
    "K",
    "variant",
    "lr",
    "steps",
    "subsample_ratio",
    "lds",
    "lds_ci",
    "seconds",
    "significant_top5",
]


def _row(task, method, scores, gt, seconds, K=None, variant=None, **extra) -> dict:
    res = dg.lds(scores, gt)
    row = {
        "task": task,
        "method": method,
        "K": K,
        "variant": variant,
        "lds": res.mean,
        "lds_ci": [res.low, res.high],
        "seconds": seconds,
        **extra,
    }
    if scores.stderr is not None:
        # How many of each query's top-5 proponents are significantly positive (z > 1.96), on average.
        idx, _ = scores.top(5)
        row["significant_top5"] = float((scores.z_scores().gather(1, idx) > 1.96).float().sum(1).mean())
    print(f"  {method:<28} K={K!s:<4} {variant or '':<8} {extra or ''} LDS {res}  {seconds:.1f} s", flush=True)
    return row


def gradient_rows(name, bt, queries, gt, exact_params) -> list[dict]:
    m, task = bt.model, bt.task
    runs = [
        ("TRAK (k=2048)", lambda: dg.TRAK(m, task, k=2048)),
        ("GradientInfluence (gaussian:4096)", lambda: dg.GradientInfluence(m, task, compressor="gaussian:4096")),
        (
            "ExactInfluence" + (" (last layer)" if exact_params else ""),
            lambda: dg.ExactInfluence(m, task, params=exact_params, hessian="gauss_newton", damping=0.1),
        ),
    ]
    rows = []
    for method, factory in runs:
        with Timer() as t:
            scores = factory().fit(bt.train).score(queries)
        rows.append(_row(name, method, scores, gt, t.seconds))
    return rows


def daunce_row(name, bt, queries, gt, K, variant="if", **kwargs) -> dict:
    with Timer() as t:
        scores = Daunce(bt.model, bt.task, num_models=K, variant=variant, **kwargs).fit(bt.train).score(queries)
    extra = {k: kwargs[k] for k in ("lr", "steps", "subsample_ratio") if k in kwargs}
    return _row(name, "Daunce", scores, gt, t.seconds, K=K, variant=variant, **extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small data, K ≤ 32, one seed of ground truth")
    p.add_argument("--json", default="benchmarks/results/daunce_lds.json")
    p.add_argument("--tasks", default="digits-mlp,mnist1d-mlp")
    args = p.parse_args()
    torch.manual_seed(0)
    variant_k = 32 if args.quick else 128
    tasks = {
        "digits-mlp": (lambda: digits_mlp(n_train=500 if args.quick else 1000, hidden=64), None),
        "mnist1d-mlp": (
            lambda: mnist1d_mlp(n_train=1000 if args.quick else 4000, epochs=20.0 if args.quick else 40.0),
            ["4.weight", "4.bias"],
        ),
    }
    rows: list[dict] = []
    for name in args.tasks.split(","):
        make, exact_params = tasks[name]
        bt = make()
        nq = 50 if args.quick else 100
        queries = (bt.test[0][:nq], bt.test[1][:nq])
        gt, gt_seconds = ground_truth(bt, queries, num_subsets=50, num_seeds=1 if args.quick else 3)
        print(f"{name}: accuracy {bt.accuracy():.3f}, ground truth {gt_seconds:.1f} s", flush=True)
        rows += gradient_rows(name, bt, queries, gt, exact_params)
        top = 32 if args.quick else (1024 if name == "digits-mlp" else 512)
        for K in (k for k in (8, 16, 32, 64, 128, 256, 512, 1024) if k <= top):
            rows.append(daunce_row(name, bt, queries, gt, K))
        for variant in ("efim", "blackbox"):
            rows.append(daunce_row(name, bt, queries, gt, variant_k, variant=variant))
        rows.append(daunce_row(name, bt, queries, gt, variant_k, subsample_ratio=0.5))
        if not args.quick:  # the best step size differs by task: the table shows how much
            for lr in (3e-4, 1e-3, 3e-3, 1e-2):
                for steps in (25, 50, 100, 200):
                    rows.append(daunce_row(name, bt, queries, gt, 64, lr=lr, steps=steps))
    print()
    print_table(rows, COLUMNS)
    write_json(args.json, "daunce_lds", rows, quick=args.quick)


if __name__ == "__main__":
    main()
