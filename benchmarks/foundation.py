"""Foundation benchmarks: (a) vmapped ensemble vs a sequential loop training the same 64 models;
(b) LDS and seconds of TRAK, TracIn, GradientInfluence (Gaussian k=1024, 4096) and exact influence
on the digits MLP and the MNIST-1D MLP.

    python benchmarks/foundation.py [--quick] [--json benchmarks/results/foundation.json]
"""

from __future__ import annotations

import argparse
import copy

import torch

import dunegrass as dg
from dunegrass.bench import digits_mlp, mnist1d_mlp
from dunegrass.train import EnsembleTrainer, Member, TrainConfig, batch_schedule

from common import Timer, ground_truth, print_table, write_json


def ensemble_vs_sequential(num_models: int, quick: bool) -> dict:
    """Train the same ``num_models`` digits MLPs (own subsets and seeds) vmapped and one by one."""
    bt = digits_mlp(n_train=1000, hidden=64, epochs=5.0 if quick else 20.0)
    config = TrainConfig(optimizer="adam", lr=3e-3, epochs=5.0 if quick else 20.0, batch_size=64)
    gen = torch.Generator().manual_seed(0)
    members = [Member(torch.randperm(1000, generator=gen)[:500], seed=j) for j in range(num_models)]
    with Timer() as tv:
        stacked = EnsembleTrainer(bt.model, bt.task, config).train(bt.train, members)
    x, y = bt.train
    worst = 0.0
    with Timer() as ts:
        for j, member in enumerate(members):
            model = copy.deepcopy(bt.model)
            opt = torch.optim.Adam(model.parameters(), lr=config.lr)
            steps = config.num_steps(len(member.indices))
            for idx in batch_schedule(member, steps, config.batch_size):
                loss = bt.task.loss(model(x[idx]), (x[idx], y[idx])).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            for name, p in model.named_parameters():
                worst = max(worst, (p.detach() - stacked[name][j]).abs().max().item())
    return {
        "task": "digits-mlp",
        "method": "ensemble-vs-sequential",
        "models": num_models,
        "steps": steps,
        "vmapped_seconds": tv.seconds,
        "sequential_seconds": ts.seconds,
        "ratio": ts.seconds / tv.seconds,
        "max_param_difference": worst,
    }


def methods(bt, ks, exact_params):
    m, task = bt.model, bt.task
    yield "TRAK", 2048, lambda: dg.TRAK(m, task, k=2048)
    yield "TracIn", None, lambda: dg.TracIn(m, task)
    for k in ks:
        yield "GradientInfluence", k, lambda k=k: dg.GradientInfluence(m, task, compressor=f"gaussian:{k}")
    label = "ExactInfluence" if exact_params is None else "ExactInfluence (last layer)"
    yield label, None, lambda: dg.ExactInfluence(m, task, params=exact_params, hessian="gauss_newton", damping=0.1)


def lds_rows(quick: bool) -> list[dict]:
    rows = []
    tasks = [
        ("digits-mlp", lambda: digits_mlp(n_train=500 if quick else 1000, hidden=64), None),
        (
            "mnist1d-mlp",
            lambda: mnist1d_mlp(n_train=1000 if quick else 4000, epochs=20.0 if quick else 40.0),
            ["4.weight", "4.bias"],
        ),
    ]
    for name, make, exact_params in tasks:
        bt = make()
        nq = 50 if quick else 100
        queries = (bt.test[0][:nq], bt.test[1][:nq])
        gt, gt_seconds = ground_truth(bt, queries, num_subsets=50, num_seeds=1 if quick else 3)
        print(f"{name}: accuracy {bt.accuracy():.3f}, ground truth {gt_seconds:.1f} s")
        ks = [1024] if quick else [1024, 4096]
        for method, k, factory in methods(bt, ks, exact_params):
            with Timer() as t:
                scores = factory().fit(bt.train).score(queries)
            res = dg.lds(scores, gt)
            rows.append(
                {
                    "task": name,
                    "method": method,
                    "k": k,
                    "lds": res.mean,
                    "lds_ci": [res.low, res.high],
                    "seconds": t.seconds,
                }
            )
            print(f"  {method:<30} k={k!s:<5} LDS {res}  {t.seconds:.1f} s")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default="benchmarks/results/foundation.json")
    args = ap.parse_args()
    ens = ensemble_vs_sequential(64, args.quick)
    print_table([ens], ["models", "steps", "vmapped_seconds", "sequential_seconds", "ratio", "max_param_difference"])
    rows = lds_rows(args.quick)
    print()
    print_table(rows, ["task", "method", "k", "lds", "lds_ci", "seconds"])
    write_json(args.json, "foundation", rows, ensemble=ens, quick=args.quick)


if __name__ == "__main__":
    main()
