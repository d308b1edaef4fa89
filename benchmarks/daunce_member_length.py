"""Daunce's member length against the model's own training length, on the docstring LM (issue 13 §2).

§1 found the best damping of the gradient methods set by how long θ₀ was fine-tuned (four times as long:
the best damping falls 2–7×). Daunce's members are damped by how far they train (λ ≈ 1/(η·steps)), so the
rule to test is "members train with θ₀'s own fine-tune recipe". The quick LM task fine-tuned for 8 and for
32 epochs (θ₀ and its 50-subset ground truth each), Daunce (`if`, full fine-tune, vmapped, K = 64) with
members trained with each of the two recipes (Adam, lr 1e-4, 8 or 32 epochs) and with the recipe of
benchmarks/daunce_lm.py (Adam, lr 1e-3, 30 steps). If matching wins on both tasks, the rule transfers.
Rows: ``{"task", "lm_epochs", "members", "K", "lds", "lds_ci", "seconds"}``; ``paired``: per task, the
matching recipe's LDS minus each other recipe's, query by query (mean and 95 % interval: the queries are
shared, so the difference is measured more tightly than either LDS).

    python benchmarks/daunce_member_length.py [--json benchmarks/results/daunce_member_length.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import dunegrass as dg
from dunegrass.eval.metrics import mean_ci
from dunegrass.train import TrainConfig

from common import Timer, print_table, quick_lm, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
K = 64


def recipes(batch_size: int) -> dict[str, TrainConfig]:
    adam = lambda **kw: TrainConfig(optimizer="adam", batch_size=batch_size, **kw)  # noqa: E731
    return {
        "8 epochs, lr 1e-4": adam(lr=1e-4, epochs=8.0),
        "32 epochs, lr 1e-4": adam(lr=1e-4, epochs=32.0),
        "30 steps, lr 1e-3": TrainConfig(optimizer="adam", lr=1e-3, steps=30, batch_size=32, schedule="cosine"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=os.path.join(HERE, "results", "daunce_member_length.json"))
    args = ap.parse_args()
    rows, paired, per_query = [], [], {}
    for epochs in (8.0, 32.0):
        torch.manual_seed(0)
        bench, gt, suffix = quick_lm(epochs)
        for name, recipe in recipes(bench.finetune.batch_size).items():
            with Timer() as t:
                daunce = dg.Daunce(bench.model, bench.task, num_models=K, train=recipe, trainer="ensemble")
                scores = daunce.fit(bench.train).score(bench.queries)
            res = dg.lds(scores, gt)
            per_query[name] = res.per_query
            rows.append({"task": bench.name + suffix, "lm_epochs": epochs, "members": name, "K": K, "lds": res.mean,
                         "lds_ci": [res.low, res.high], "seconds": t.seconds})  # fmt: skip
            print(f"  θ₀ fine-tuned {epochs:g} epochs  members {name:<20} LDS {res}  {t.seconds:.0f} s", flush=True)
        matching = f"{epochs:g} epochs, lr 1e-4"
        for other in (n for n in per_query if n != matching):
            diff = mean_ci(per_query[matching] - per_query[other])
            paired.append({"task": bench.name + suffix, "matching": matching, "other": other, "difference": diff.mean,
                           "ci": [diff.low, diff.high]})  # fmt: skip
            print(f"    matching minus {other}: {diff}", flush=True)
    print()
    print_table(rows, ["task", "lm_epochs", "members", "K", "lds", "lds_ci", "seconds"])
    write_json(args.json, "daunce_member_length", rows, paired=paired, command=" ".join(["python", *sys.argv]))


if __name__ == "__main__":
    main()
