"""Daunce's member length against the model's own training length (issue 13 §2), on the docstring LM and on the
MNIST-1D MLP.

§1 found the best damping of the gradient methods set by how long θ₀ was trained (the LM fine-tuned four times
as long: the best damping falls 2–7×; the MNIST-1D MLP trained a quarter as long: it rises 2.5–10×). Daunce's
members are damped by how far they train (λ ≈ 1/(η·steps)), so the rule to test is "members train with θ₀'s own
recipe". The quick LM task fine-tuned for 8 and for 32 epochs (θ₀ and its 50-subset ground truth each), members
trained with each of the two recipes (Adam, lr 1e-4, 8 or 32 epochs) and with the recipe of
benchmarks/daunce_lm.py (Adam, lr 1e-3, 30 steps); the MNIST-1D MLP (1000 examples, from random weights)
trained 20 and 5 epochs, members trained with each of those recipes and with Daunce's default. Daunce `if`,
full fine-tune, vmapped, K = 64. If matching wins on every task, the rule transfers.
Rows: ``{"task", "theta0_epochs", "members", "K", "lds", "lds_ci", "seconds"}``; ``paired``: per task, the
matching recipe's LDS minus each other recipe's, query by query (mean and 95 % interval: the queries are
shared, so the difference is measured more tightly than either LDS).

    python benchmarks/daunce_member_length.py [--tasks lm,mnist1d] [--json benchmarks/results/daunce_member_length.json]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import torch

import dunegrass as dg
from dunegrass.bench import mnist1d_mlp
from dunegrass.eval.metrics import mean_ci
from dunegrass.options import DEFAULT_RECIPE
from dunegrass.train import TrainConfig

from common import Timer, ground_truth, print_table, quick_lm, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
K = 64


def lm_setups():
    """The quick LM fine-tuned 8 and 32 epochs, with the member recipes to compare (the first two are θ₀'s)."""
    for epochs in (8.0, 32.0):
        bench, gt, suffix = quick_lm(epochs)
        members = {f"{e:g} epochs, lr 1e-4": replace(bench.finetune, epochs=e) for e in (8.0, 32.0)}
        members |= {
            "30 steps, lr 1e-3": TrainConfig(optimizer="adam", lr=1e-3, steps=30, batch_size=32, schedule="cosine")
        }
        yield bench.name + suffix, epochs, bench.model, bench.task, bench.train, bench.queries, gt, members


def mnist1d_setups():
    """The MNIST-1D MLP (1000 examples) trained 20 and 5 epochs from random weights; members trained with each
    of the two recipes (Adam lr 1e-3, batch 128, weight decay 1e-4: 160 and 40 steps) and with Daunce's default
    (Adam lr 1e-3, 50 steps, batch 64, cosine)."""
    for epochs in (20.0, 5.0):
        bt = mnist1d_mlp(n_train=1000, epochs=epochs)
        queries = (bt.test[0][:50], bt.test[1][:50])
        gt, _ = ground_truth(bt, queries, num_subsets=50, num_seeds=1)
        members = {f"{e:g} epochs, lr 1e-3": replace(bt.train_config, epochs=e) for e in (20.0, 5.0)}
        members["Daunce default"] = DEFAULT_RECIPE
        name = "mnist1d-mlp" + ("" if epochs == 20.0 else f"-e{epochs:g}")
        yield name, epochs, bt.model, bt.task, bt.train, queries, gt, members


SETUPS = {"lm": lm_setups, "mnist1d": mnist1d_setups}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=os.path.join(HERE, "results", "daunce_member_length.json"))
    ap.add_argument("--tasks", default="lm,mnist1d", help="comma-separated: lm, mnist1d")
    args = ap.parse_args()
    rows, paired = [], []
    for family in args.tasks.split(","):
        for name, epochs, model, task, train, queries, gt, members in SETUPS[family]():
            per_query = {}
            torch.manual_seed(0)
            for label, recipe in members.items():
                with Timer() as t:
                    daunce = dg.Daunce(model, task, num_models=K, train=recipe, trainer="ensemble")
                    scores = daunce.fit(train).score(queries)
                res = dg.lds(scores, gt)
                per_query[label] = res.per_query
                rows.append({"task": name, "theta0_epochs": epochs, "members": label, "K": K, "lds": res.mean,
                             "lds_ci": [res.low, res.high], "seconds": t.seconds})  # fmt: skip
                print(f"  {name}  members {label:<20} LDS {res}  {t.seconds:.0f} s", flush=True)
            matching = next(label for label in members if label.startswith(f"{epochs:g} epochs"))
            for other in (n for n in per_query if n != matching):
                diff = mean_ci(per_query[matching] - per_query[other])
                paired.append({"task": name, "matching": matching, "other": other, "difference": diff.mean,
                               "ci": [diff.low, diff.high]})  # fmt: skip
                print(f"    matching minus {other}: {diff}", flush=True)
    print()
    print_table(rows, ["task", "theta0_epochs", "members", "K", "lds", "lds_ci", "seconds"])
    write_json(args.json, "daunce_member_length", rows, paired=paired, command=" ".join(["python", *sys.argv]))


if __name__ == "__main__":
    main()
