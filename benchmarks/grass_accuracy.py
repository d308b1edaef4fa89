"""GraSS accuracy on the MNIST-1D MLP (the table of algorithms.md §5): LDS and compression seconds of
Random Mask, Selective Mask, SparseJL, Gaussian and GraSS (mask k′ = 4k → SparseJL k), plus GraSS
with a selective mask, at k ∈ {256, 1024, 4096}.

Every method is the same gradient engine (block-eFIM influence, damping 0.1, one checkpoint θ₀) with
a different compressor, so the rows differ only in how gradients are compressed. LDS is against
subset retraining (50 subsets of half the data, 3 seeds each, cached under runs/bench-cache).
"compress s" is the time to compress the n_train per-example gradients alone (the gradients are
computed once, outside the timer); "mask s" is the time to learn a selective mask.

    python benchmarks/grass_accuracy.py [--quick] [--json benchmarks/results/grass_accuracy.json]
    python benchmarks/grass_accuracy.py --study     # LDS over 3 projection seeds at k = 4096, GraSS k′ = 4k..16k
"""

from __future__ import annotations

import argparse
import time

import torch

import dunegrass as dg
from dunegrass.bench import mnist1d_mlp
from dunegrass.compress import SelectiveMask, SelectiveMaskConfig, describe
from dunegrass.data import subset
from dunegrass.eval.metrics import mean_ci
from dunegrass.gradients import per_sample_gradients
from dunegrass.methods.grass import GraSS
from dunegrass.seeding import derive_seed

from common import Timer, ground_truth, print_table, write_json

METHODS = ("Random Mask", "Selective Mask", "SparseJL", "Gaussian", "GraSS", "GraSS (selective)")
MASK_EXAMPLES = 512  # training examples whose per-example gradients teach a selective mask (as dg.GraSS)


def objective(task):
    return lambda model, batch: task.loss(task.outputs(model, batch), batch)


def learn_mask(bt, k: int, seed: int = 0) -> tuple[SelectiveMask, float]:
    """A selective mask d → k learned as dg.GraSS learns its own: per-example gradients of 512 examples."""
    params = [n for n, _ in bt.model.named_parameters()]
    gen = torch.Generator().manual_seed(derive_seed(seed, 0x6D61736B))
    chosen = subset(bt.train, torch.randperm(len(bt.train[0]), generator=gen)[:MASK_EXAMPLES]).slice(slice(None))
    with Timer() as t:
        grads = per_sample_gradients(bt.model, objective(bt.task), chosen, params)
        d = grads.shape[1]
        mask = SelectiveMask(d, k, seed=seed).fit(grads, config=SelectiveMaskConfig())
    return mask, t.seconds


def attributor(method: str, bt, k: int):
    """(attributor, seconds spent learning a mask)."""
    m, task = bt.model, bt.task
    if method == "Random Mask":
        return dg.GradientInfluence(m, task, compressor=f"mask:{k}"), 0.0
    if method == "Selective Mask":
        mask, seconds = learn_mask(bt, k)
        return dg.GradientInfluence(m, task, compressor=mask), seconds
    if method == "SparseJL":
        return dg.GradientInfluence(m, task, compressor=f"sjlt:{k}"), 0.0
    if method == "Gaussian":
        return dg.GradientInfluence(m, task, compressor=f"gaussian:{k}"), 0.0
    if method == "GraSS":
        return GraSS(m, task, k=k), 0.0
    return GraSS(m, task, k=k, mask="selective", mask_examples=MASK_EXAMPLES), None  # timed inside fit


def study(bt, queries, gt, k: int, seeds: int) -> list[dict]:
    """Why GraSS trails SparseJL: at one k, LDS over projection seeds for SparseJL, Gaussian, the random
    mask alone at k′ = 4k, and GraSS with k′ = 4k, 8k, 16k (capped at d)."""
    m, task = bt.model, bt.task
    d = sum(p.numel() for p in m.parameters())
    variants = {
        "Gaussian": lambda s: dg.GradientInfluence(m, task, compressor=f"gaussian:{k}", seed=s),
        "SparseJL": lambda s: dg.GradientInfluence(m, task, compressor=f"sjlt:{k}", seed=s),
        f"Random Mask k'={4 * k}": lambda s: dg.GradientInfluence(m, task, compressor=f"mask:{4 * k}", seed=s),
    }
    for factor in (4, 8, 16):
        variants[f"GraSS k'={min(factor * k, d)}"] = lambda s, f=factor: GraSS(m, task, k=k, mask_size=f * k, seed=s)
    rows = []
    for name, make in variants.items():
        values = []
        for seed in range(seeds):
            attr = make(seed)
            attr.progress = False
            values.append(dg.lds(attr.fit(bt.train).score(queries), gt).mean)
        t = torch.tensor(values, dtype=torch.float64)
        row = {"variant": name, "k": k, "lds_per_seed": values, "lds_mean": float(t.mean()), "lds_std": float(t.std())}
        rows.append(row)
        print(f"  {name:<22} LDS {row['lds_mean']:.3f} ± {row['lds_std']:.3f} (sd over {seeds} seeds)", flush=True)
    return rows


def compression_seconds(compressors: dict, bt, chunk: int = 256) -> dict:
    """Seconds each compressor takes on the per-example training gradients (computed once, untimed)."""
    params = [n for n, _ in bt.model.named_parameters()]
    x, y = bt.train
    seconds = dict.fromkeys(compressors, 0.0)
    for lo in range(0, len(x), chunk):
        grads = per_sample_gradients(bt.model, objective(bt.task), (x[lo : lo + chunk], y[lo : lo + chunk]), params)
        for key, comp in compressors.items():
            start = time.perf_counter()
            comp(grads)
            seconds[key] += time.perf_counter() - start
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1000 examples, 20 epochs, one seed per subset, k = 256, 1024")
    ap.add_argument("--json", default="benchmarks/results/grass_accuracy.json")
    ap.add_argument("--ks", type=int, nargs="+", default=None)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--study", action="store_true", help="only the seed/k′ study at the largest k (see study())")
    ap.add_argument("--seeds", type=int, default=3, help="projection seeds per variant in --study")
    args = ap.parse_args()
    ks = args.ks or ([256, 1024] if args.quick else [256, 1024, 4096])
    bt = mnist1d_mlp(n_train=1000, epochs=20.0) if args.quick else mnist1d_mlp()
    nq = 50 if args.quick else 100
    queries = (bt.test[0][:nq], bt.test[1][:nq])
    gt, gt_seconds = ground_truth(bt, queries, num_subsets=50, num_seeds=1 if args.quick else 3)
    d = sum(p.numel() for p in bt.model.parameters())
    n = len(bt.train[0])
    print(f"{bt.name}: n_train {n}, d = {d}, accuracy {bt.accuracy():.3f}, ground truth {gt_seconds:.0f} s")
    if args.study:
        rows = study(bt, queries, gt, max(ks), args.seeds)
        path = args.json.replace(".json", "_study.json")
        write_json(path, "grass_accuracy_study", rows, task=bt.name, n_train=n, n_query=nq, d=d, seeds=args.seeds)
        return

    rows, compressors, per_query = [], {}, {}
    for k in ks:
        for method in args.methods:
            attr, mask_seconds = attributor(method, bt, k)
            attr.progress = False
            with Timer() as t:
                scores = attr.fit(bt.train).score(queries)
            comp = attr.featurizers[0].compressors[0]
            if mask_seconds is None:  # GraSS (selective) learned its mask inside fit
                mask_seconds = attr.seconds["masks"]
            res = dg.lds(scores, gt)
            row = {
                "method": method,
                "k": k,
                "spec": describe(comp),
                "lds": res.mean,
                "lds_ci": [res.low, res.high],
                "fit_score_seconds": t.seconds,
                "mask_seconds": mask_seconds,
            }
            rows.append(row)
            per_query[(method, k)] = res.per_query
            compressors[(method, k)] = comp
            print(f"  k={k:<5} {method:<18} {row['spec']:<24} LDS {res}  fit+score {t.seconds:.1f} s", flush=True)
    for (method, k), seconds in compression_seconds(compressors, bt).items():
        next(r for r in rows if r["method"] == method and r["k"] == k)["compress_seconds"] = seconds
    for row in rows:  # paired over queries: far tighter than comparing two separate intervals
        base, own = per_query.get(("Gaussian", row["k"])), per_query[(row["method"], row["k"])]
        if base is not None and len(base) == len(own):
            diff = mean_ci(own - base)
            row["lds_minus_gaussian"], row["lds_minus_gaussian_ci"] = diff.mean, [diff.low, diff.high]

    print()
    columns = ["method", "k", "spec", "lds", "lds_ci", "lds_minus_gaussian", "lds_minus_gaussian_ci"]
    print_table(rows, [*columns, "compress_seconds", "mask_seconds", "fit_score_seconds"])
    print("\nLDS (compression seconds), as in algorithms.md §5:")
    print_table(
        [
            {
                "k": k,
                **{
                    m: f"{r['lds']:.3f} ({r['compress_seconds']:.2f})"
                    for m in args.methods
                    for r in rows
                    if r["method"] == m and r["k"] == k
                },
            }
            for k in ks
        ],
        ["k", *args.methods],
    )
    write_json(
        args.json,
        "grass_accuracy",
        rows,
        task=bt.name,
        n_train=len(bt.train[0]),
        n_query=nq,
        d=d,
        ground_truth={"num_subsets": 50, "num_seeds": gt.config.get("num_seeds"), "seconds": gt_seconds},
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
