"""Mislabel detection (AUC of self-influence) and brittleness (top-k proponent removal) on digits.

    python benchmarks/evaluation.py [--quick] [--json benchmarks/results/evaluation.json]

Mislabel: 10 % of the training labels are flipped, the MLP is trained on the noisy data, and each
method ranks training examples by self-influence; AUC against the flipped set. Brittleness: for
queries the model gets right, remove each query's top-k proponents (by each method) or k random
examples, retrain (2 seeds, vmapped) and count how often the prediction flips.
"""

from __future__ import annotations

import argparse

import torch

import dunegrass as dg
from dunegrass.bench.data import digits, flip_labels
from dunegrass.bench.models import mlp
from dunegrass.bench.tasks import train_model
from dunegrass.eval import brittleness

from common import Timer, print_table, write_json


def method_factories(model, task, k):
    out = {
        "TRAK": lambda: dg.TRAK(model, task, k=k),
        "TracIn": lambda: dg.TracIn(model, task),
        "GradientInfluence": lambda: dg.GradientInfluence(model, task, compressor=f"gaussian:{k}"),
        "ExactInfluence": lambda: dg.ExactInfluence(model, task, hessian="gauss_newton", damping=0.1),
    }
    if hasattr(dg, "GraSS"):
        out["GraSS"] = lambda: dg.GraSS(model, task, k=k)
    if hasattr(dg, "Daunce"):
        out["Daunce"] = lambda: dg.Daunce(model, task, num_models=256)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default="benchmarks/results/evaluation.json")
    args = ap.parse_args()
    n_train = 500 if args.quick else 1000
    (x, y), (xt, yt) = digits(n_train, 300)
    noisy, flipped = flip_labels(y, 0.1, 10, seed=0)
    task = dg.ClassificationTask()
    config = dg.TrainConfig(optimizer="adam", lr=3e-3, epochs=30.0, batch_size=64, weight_decay=1e-4)

    rows = []
    noisy_model = train_model(mlp(64, [64], 10), task, (x, noisy), config)
    for name, factory in method_factories(noisy_model, task, 1024).items():
        with Timer() as t:
            self_scores = factory().fit((x, noisy)).self_scores()
        auc = dg.mislabel_auc(self_scores, flipped)
        rows.append({"evaluation": "mislabel", "method": name, "auc": auc, "seconds": t.seconds})
        print(f"mislabel  {name:<18} AUC {auc:.3f}  ({t.seconds:.1f} s)")

    clean_model = train_model(mlp(64, [64], 10), task, (x, y), config)
    with torch.no_grad():
        right = (clean_model(xt).argmax(1) == yt).nonzero()[:, 0][: 8 if args.quick else 20]
    queries = (xt[right], yt[right])
    ks = (10, 40) if args.quick else (10, 20, 40, 80)
    for name, factory in method_factories(clean_model, task, 1024).items():
        scores = factory().fit((x, y)).score(queries)
        with Timer() as t:
            res = brittleness(clean_model, task, (x, y), queries, scores, config, ks=ks, num_seeds=2)
        for i, k in enumerate(ks):
            rows.append(
                {
                    "evaluation": "brittleness",
                    "method": name,
                    "k": k,
                    "flip_rate": res["flip_rate"][i],
                    "random_flip_rate": res["random_flip_rate"][i],
                    "loss_increase": res["loss_increase"][i],
                    "seconds": t.seconds,
                }
            )
        print(f"brittle   {name:<18} flips {res['flip_rate']} random {res['random_flip_rate']}")
    print()
    print_table([r for r in rows if r["evaluation"] == "mislabel"], ["method", "auc", "seconds"])
    print()
    print_table(
        [r for r in rows if r["evaluation"] == "brittleness"],
        ["method", "k", "flip_rate", "random_flip_rate", "loss_increase"],
    )
    write_json(args.json, "evaluation", rows, quick=args.quick, n_train=n_train, flipped_fraction=0.1)


if __name__ == "__main__":
    main()
