"""Damping from the generalisation gap: does how far training went, read as held-out minus training loss, set it?

The issue's first candidate rule, leave-one-out prediction of each training example's own loss change from its
self-influence, in a form that needs no retraining: removing example i raises its loss by about
(1/n)·g_iᵀ(F + λ)⁻¹g_i, so the mean over the training set, Σ_j μ_j/(μ_j + λ) / n (the damped Fisher's effective
degrees of freedom over n), is the influence model's prediction of the gap between held-out and training loss
(Takeuchi's correction, with the eFIM for the Hessian). ``gap`` sets one relative damping r for all Fisher blocks
so that this prediction equals the gap measured at θ₀ (the queries as the held-out set): a briefly trained model
(small gap) gets more damping, a long-trained one less — the direction benchmarks/damping.py found the best
damping moves. Scored here from each method's own features, as damping.py scores its rules, against the sweeps
damping.py wrote (the best fixed r and auto's LDS are read from their JSON, so run those first):

    python benchmarks/damping_gap.py [--json benchmarks/results/damping_gap.json]

The LM's per-example loss is a mean over tokens, for which the eFIM understates the Hessian by about the number of
tokens; the rule is scored with the task's loss as the library defines it, as a library rule would be.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from damping import METHODS, dof_ratio, scores_with, tasks

import dunegrass as dg
from dunegrass.data import iterate_batches

from common import load_json, print_table, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
# (sweep JSON, task words, LM fine-tune epochs, MNIST-1D epochs): the three sweeps damping.py's docstring runs
SWEEPS = (
    ("damping.json", ("",), 8.0, 20.0),
    ("damping_lm_e32.json", ("lm",), 32.0, 20.0),
    ("damping_mnist1d_e5.json", ("mnist1d",), 8.0, 5.0),
)


def mean_loss(model, task, data) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for _, batch in iterate_batches(data, 256):
            losses = task.loss(task.outputs(model, batch), batch).double()
            total, count = total + float(losses.sum()), count + len(losses)
    return total / count


def gap_rule(gap: float):
    """One r for all blocks with Σ μ/(μ + λ) = n·gap (capped to the rank; no damping limit when gap <= 0)."""

    def rule(phis: list[torch.Tensor]) -> list[float]:
        n, rank = len(phis[0]), sum(min(len(p), p.shape[1]) for p in phis)
        return dof_ratio(phis, fraction=min(max(n * gap / rank, 0.0), 1.0))

    return rule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=os.path.join(RESULTS, "damping_gap.json"))
    args = ap.parse_args()
    rows = []
    for sweep_file, words, lm_epochs, m1d_epochs in SWEEPS:
        sweep = load_json(os.path.join(RESULTS, sweep_file))["summary"]
        for name, model, task, train, queries, gt in tasks(lm_epochs, words, m1d_epochs):
            train_loss, held_loss = mean_loss(model, task, train), mean_loss(model, task, queries)
            gap = held_loss - train_loss
            print(f"{name}: training loss {train_loss:.4f}, held-out {held_loss:.4f}, gap {gap:.4f}", flush=True)
            for method, make in METHODS.items():
                ref = next(r for r in sweep if r["task"] == name and r["method"] == method)
                with tempfile.TemporaryDirectory() as cache:
                    attr = make(model, task, 0.1).fit(train, cache_dir=cache)
                    # the scoring below must reproduce the sweep's at damping 0.1 before it judges the rule
                    mine, _ = scores_with(attr, queries, lambda phis: [0.1] * len(phis))
                    if abs(dg.lds(mine, gt).mean - ref["default_lds"]) > 2e-3:
                        raise SystemExit(f"{name} {method}: features do not reproduce {sweep_file}'s LDS at 0.1")
                    scores, chosen = scores_with(attr, queries, gap_rule(gap))
                lds = dg.lds(scores, gt).mean
                rows.append({
                    "task": name, "method": method, "train_loss": train_loss, "held_out_loss": held_loss,
                    "gap": gap, "gap_chose": chosen[0], "gap_lds": lds, "best_damping": ref["best_damping"],
                    "best_lds": ref["best_lds"], "auto_chose": ref["auto_chose"], "auto_lds": ref["auto_lds"],
                    "gap_gap": ref["best_lds"] - lds, "auto_gap": ref["auto_gap"], "sweep": sweep_file,
                })  # fmt: skip
                best = f"best r {ref['best_damping']:g} {ref['best_lds']:.4f}"
                auto = f"auto r {ref['auto_chose']:.3g} {ref['auto_lds']:.4f}"
                print(f"  {method:<32} gap rule r {chosen[0]:.3g}  LDS {lds:.4f}  ({best}, {auto})", flush=True)
    print()
    print_table(rows, ["task", "method", "gap", "best_damping", "best_lds", "auto_chose", "auto_lds", "gap_chose",
                       "gap_lds"])  # fmt: skip
    for rule in ("auto", "gap"):
        within = sum(r[f"{rule}_gap"] <= 0.01 for r in rows)
        worst = max(r[f"{rule}_gap"] for r in rows)
        print(f"{rule}: within 0.01 of the best fixed damping on {within} of {len(rows)} pairs, worst gap {worst:.3f}")
    write_json(args.json, "damping_gap", rows, command=" ".join(["python", *sys.argv]))


if __name__ == "__main__":
    main()
