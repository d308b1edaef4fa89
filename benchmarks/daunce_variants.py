"""Daunce's two objectives at their best: ``if`` against ``efim``, each with its step size × steps tuned.

A member that trains T steps of size η acts as damping λ ≈ 1/(ηT) (algorithms.md §3.1), so each variant
gets the grid lr ∈ {3e-4, 1e-3, 3e-3, 1e-2} × steps ∈ {25, 50, 100} (Adam, cosine decay, batch 64, K = 64,
ratio 0.3) on every built-in task at its ``--quick`` size (the digits MLP, the MNIST-1D MLP, the digits
BatchNorm CNN; the cached ground truths of benchmarks/lds_vs_seconds.py), and is compared at its best
setting per task and at the default (lr 1e-3, 50 steps). A member that diverges (``efim`` at large steps)
is a row with LDS None.

    python benchmarks/daunce_variants.py [--json benchmarks/results/daunce_variants.json]
"""

from __future__ import annotations

import argparse
import os

import torch

import dunegrass as dg
from dunegrass.errors import NonFiniteError

from common import Timer, ground_truth, print_table, write_json
from lds_vs_seconds import TASKS

HERE = os.path.dirname(os.path.abspath(__file__))
LRS, STEPS, K = (3e-4, 1e-3, 3e-3, 1e-2), (25, 50, 100), 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=os.path.join(HERE, "results", "daunce_variants.json"))
    args = ap.parse_args()
    rows = []
    for name, make in TASKS.items():
        torch.manual_seed(0)
        bt = make()
        queries = (bt.test[0][:50], bt.test[1][:50])
        gt, _ = ground_truth(bt, queries, num_subsets=50, num_seeds=1)
        for variant in ("if", "efim"):
            for lr in LRS:
                for steps in STEPS:
                    row = {"task": name, "variant": variant, "lr": lr, "steps": steps, "K": K}
                    with Timer() as t:
                        try:
                            daunce = dg.Daunce(bt.model, bt.task, num_models=K, variant=variant, lr=lr, steps=steps)
                            res = dg.lds(daunce.fit(bt.train).score(queries), gt)
                            row.update(lds=res.mean, lds_ci=[res.low, res.high])
                        except NonFiniteError:
                            row.update(lds=None, lds_ci=None)
                    row["seconds"] = t.seconds
                    rows.append(row)
                    shown = "diverged" if row["lds"] is None else f"{row['lds']:.3f}"
                    print(f"  {name:<12} {variant:<5} lr {lr:<7} steps {steps:<4} LDS {shown}  {t.seconds:.1f} s")
    best = []
    for name in TASKS:
        for variant in ("if", "efim"):
            mine = [r for r in rows if r["task"] == name and r["variant"] == variant and r["lds"] is not None]
            top = max(mine, key=lambda r: r["lds"])
            default = next((r for r in mine if r["lr"] == 1e-3 and r["steps"] == 50), None)
            best.append({
                "task": name, "variant": variant, "best_lds": top["lds"], "best_lr": top["lr"],
                "best_steps": top["steps"], "default_lds": None if default is None else default["lds"],
            })  # fmt: skip
    print()
    print_table(best, ["task", "variant", "best_lds", "best_lr", "best_steps", "default_lds"])
    write_json(args.json, "daunce_variants", rows, best=best, command="python benchmarks/daunce_variants.py")


if __name__ == "__main__":
    main()
