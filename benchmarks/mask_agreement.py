"""Does the selective mask do what it is trained for? Rank agreement of masked inner products.

    python benchmarks/mask_agreement.py [--json benchmarks/results/mask_agreement.json]

On the MNIST-1D MLP of grass_accuracy.py: per-example gradients of 1536 training examples; a
selective mask is learned on the first 512 (as dg.GraSS learns it), and every mask is scored on the
others — 200 queries against 824 training examples — by the mean Spearman correlation between the
masked and the full inner products ⟨g_q, g_i⟩ (the objective of algorithms.md §2). Next to it: random
masks (mean of 3 seeds) and the k′ coordinates of largest gradient energy. grass_accuracy.py gives
the LDS these masks reach as influence features; this script gives the agreement they were built for,
and with ``--lds`` the LDS of the random and selective masks at k′ = 256 and 4096 both as influence
(block eFIM) and as plain masked gradient dot products (TracIn, no preconditioner).

    python benchmarks/mask_agreement.py --lds
"""

from __future__ import annotations

import argparse

import torch
from grass_accuracy import learn_mask

import dunegrass as dg
from dunegrass.bench import mnist1d_mlp
from dunegrass.compress import RandomMask, SelectiveMask, SelectiveMaskConfig, mask_rank_agreement
from dunegrass.gradients import per_sample_gradients

from common import Timer, ground_truth, print_table, write_json


def lds_rows(bt) -> list[dict]:
    """LDS of random and selective masks, with and without the eFIM preconditioner."""
    queries = (bt.test[0][:100], bt.test[1][:100])
    gt, _ = ground_truth(bt, queries, num_subsets=50, num_seeds=3)  # the ground truth of grass_accuracy.py
    rows = []
    for k in (256, 4096):
        masks = {"random": f"mask:{k}", "selective": learn_mask(bt, k)[0]}
        for mask, comp in masks.items():
            for scoring, make in (("influence (eFIM)", dg.GradientInfluence), ("dot product (TracIn)", dg.TracIn)):
                attr = make(bt.model, bt.task, compressor=comp)
                attr.progress = False
                res = dg.lds(attr.fit(bt.train).score(queries), gt)
                rows.append(
                    {"k_prime": k, "mask": mask, "scoring": scoring, "lds": res.mean, "lds_ci": [res.low, res.high]}
                )
                print(f"k'={k} {mask:<9} {scoring:<20} LDS {res}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="benchmarks/results/mask_agreement.json")
    ap.add_argument("--lds", action="store_true", help="also the LDS of the masks, with and without preconditioning")
    args = ap.parse_args()
    bt = mnist1d_mlp(n_train=4000, epochs=40.0)
    params = [n for n, _ in bt.model.named_parameters()]
    x, y = bt.train

    def objective(model, batch):
        return bt.task.loss(bt.task.outputs(model, batch), batch)

    g = torch.cat(
        [
            per_sample_gradients(bt.model, objective, (x[i : i + 256], y[i : i + 256]), params)
            for i in range(0, 1536, 256)
        ]
    )
    fit, train, queries = g[:512], g[512:1336], g[1336:]
    d = g.shape[1]
    energy = fit.square().sum(0)
    rows = []
    for k in (256, 1024, 4096, 16384):
        with Timer() as t:
            selective = SelectiveMask(d, k, seed=0).fit(fit, config=SelectiveMaskConfig())
        random = [mask_rank_agreement(RandomMask(d, k, seed=s).indices, train, queries) for s in range(3)]
        top = torch.topk(energy, k).indices.sort().values
        rows.append(
            {
                "k_prime": k,
                "selective": selective.agreement(train, queries),
                "random": sum(random) / len(random),
                "top_energy": mask_rank_agreement(top, train, queries),
                "selective_steps": selective.history[-1]["step"],
                "selective_seconds": t.seconds,
            }
        )
        print(f"k'={k}: selective {rows[-1]['selective']:.3f}  random {rows[-1]['random']:.3f}", flush=True)
    print()
    print_table(rows, ["k_prime", "selective", "random", "top_energy", "selective_steps", "selective_seconds"])
    lds = lds_rows(bt) if args.lds else None
    if lds:
        print_table(lds, ["k_prime", "mask", "scoring", "lds"])
    write_json(args.json, "mask_agreement", rows, task="mnist1d-mlp", d=d, lds=lds)


if __name__ == "__main__":
    main()
