"""K-FAC and EK-FAC: dunegrass against kronfluence on the same models, data and ground truth.

    # kronfluence is a peer, never a dependency: its own venv, its declared deps would pull a CUDA torch
    python -m venv ../peers-venv && ../peers-venv/bin/pip install torch==2.13.0 numpy scipy einops \
        opt_einsum safetensors tqdm pyyaml psutil packaging huggingface_hub scikit-learn -c constraints.txt \
        && ../peers-venv/bin/pip install --no-deps accelerate kronfluence
    python benchmarks/ekfac.py [--quick] [--peers-python ../peers-venv/bin/python] [--json PATH]

Tasks: the built-in digits MLP, MNIST-1D MLP, BatchNorm CNN on digits (their trained θ₀, 100 held-out
queries, 50 random half subsets × 3 seeds retrained for the ground truth) and the causal-LM task (a tiny
GPT-2 fine-tuned on standard-library docstrings; its ground truth from ``benchmarks/lm_lds.py``'s cache or
made here). Both libraries: the true Fisher (targets drawn from the model), damping 0.1 × the mean
eigenvalue of each layer's block, every nn.Linear / nn.Conv2d (BatchNorm parameters are left out by
both). kronfluence runs in its own virtual environment through ``benchmarks/peers/kronfluence_run.py``;
without it its rows are skipped with a message. GPT-2's layers are transformers' Conv1D, which kronfluence
does not support: on the LM task only dunegrass runs. Rows ``{"task", "method", "library", "lds",
"lds_ci", "seconds"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

import torch
from safetensors.torch import load_file, save_file

import dunegrass as dg
from dunegrass.bench import digits_cnn, digits_mlp, mnist1d_mlp
from dunegrass.bench.lm import lm_ground_truth, lm_task

from common import Timer, ground_truth, print_table, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
ARCHS = {  # how the peers' worker rebuilds each built-in model (dunegrass.bench.models)
    "digits-mlp": ("mlp", {"in_dim": 64, "hidden": [64], "out_dim": 10}),
    "mnist1d-mlp": ("mlp", {"in_dim": 40, "hidden": [256, 256], "out_dim": 10}),
    "digits-cnn": ("cnn", {}),
}


def tasks(quick: bool):
    yield "digits-mlp", lambda: digits_mlp(n_train=500 if quick else 1000, hidden=64)
    yield "mnist1d-mlp", lambda: mnist1d_mlp(n_train=1000 if quick else 4000, epochs=20.0 if quick else 40.0)
    yield "digits-cnn", lambda: digits_cnn(n_train=500 if quick else 1000)


def ours(name: str, method, model, task, train, queries, gt) -> dict:
    with Timer() as t:
        scores = method(model, task, batch_size=64).fit(train).score(queries)
    res = dg.lds(scores, gt)
    print(f"  {name:<14} {method.method_name:<6} dunegrass    LDS {res}  {t.seconds:.1f} s")
    return {
        "task": name,
        "method": method.method_name,
        "library": "dunegrass",
        "lds": res.mean,
        "lds_ci": [res.low, res.high],
        "seconds": t.seconds,
    }


def run_kronfluence(name: str, strategy: str, bt, queries, python: str, fisher: str) -> tuple | None:
    """kronfluence in its own venv on the same θ₀, data and queries: (scores, seconds, process seconds)."""
    arch, arch_args = ARCHS[name]
    with tempfile.TemporaryDirectory() as job:
        state = {k: v.contiguous() for k, v in bt.model.state_dict().items()}
        save_file(state, os.path.join(job, "model.safetensors"))
        for part, (x, y) in (("train", bt.train), ("queries", queries)):
            save_file({"x": x.contiguous(), "y": y.contiguous()}, os.path.join(job, f"{part}.safetensors"))
        spec = {"arch": arch, "arch_args": arch_args, "strategy": strategy, "fisher": fisher, "batch_size": 64}
        with open(os.path.join(job, "spec.json"), "w") as f:
            json.dump({**spec, "threads": torch.get_num_threads()}, f)
        worker = os.path.join(HERE, "peers", "kronfluence_run.py")
        with Timer() as t:
            done = subprocess.run([python, worker, job], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"  kronfluence {strategy} failed on {name}:\n{done.stderr[-3000:]}")
            return None
        scores = load_file(os.path.join(job, "scores.safetensors"))["scores"]
        with open(os.path.join(job, "result.json")) as f:
            timing = json.load(f)
    return scores, timing["fit_seconds"] + timing["score_seconds"], t.seconds  # seconds without start-up


def theirs(name: str, strategy: str, bt, queries, gt, python: str) -> dict | None:
    ran = run_kronfluence(name, strategy, bt, queries, python, "true")
    if ran is None:
        return None
    scores, seconds, process = ran
    res = dg.lds(dg.Scores(scores), gt)
    print(f"  {name:<14} {strategy:<6} kronfluence  LDS {res}  {seconds:.1f} s (process {process:.1f} s)")
    return {
        "task": name,
        "method": strategy,
        "library": "kronfluence",
        "lds": res.mean,
        "lds_ci": [res.low, res.high],
        "seconds": seconds,
        "process_seconds": process,
    }


def agreement(name: str, method, bt, queries, python: str) -> dict | None:
    """Both libraries with the empirical Fisher (no random draws): how far apart the scores are."""
    ran = run_kronfluence(name, method.method_name, bt, queries, python, "empirical")
    if ran is None:
        return None
    mine = method(bt.model, bt.task, fisher="empirical", batch_size=64).fit(bt.train).score(queries).values
    theirs_ = ran[0]
    rel = float((mine - theirs_).abs().max() / theirs_.abs().max())
    pearson = float(torch.corrcoef(torch.stack([mine.flatten(), theirs_.flatten()]))[0, 1])
    print(f"  {name:<14} {method.method_name:<6} empirical Fisher: max |Δ|/max|s| {rel:.1e}, Pearson {pearson:.6f}")
    return {"task": name, "method": method.method_name, "max_rel_diff": rel, "pearson": pearson}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--peers-python", default=os.path.join(HERE, "..", "..", "peers-venv", "bin", "python"))
    p.add_argument("--lm-subsets", type=int, default=50, help="ground-truth fine-tunes of the LM task")
    p.add_argument("--json", default=os.path.join(HERE, "results", "ekfac.json"))
    args = p.parse_args()
    python = args.peers_python
    peers = (
        os.path.exists(python)
        and subprocess.run([python, "-c", "import kronfluence"], capture_output=True).returncode == 0
    )
    if not peers:
        print(f"kronfluence is not installed at {python}: its rows are skipped (see this script's docstring)")
    rows, agree = [], []
    for name, make in tasks(args.quick):
        bt = make()
        nq = 50 if args.quick else 100
        queries = (bt.test[0][:nq], bt.test[1][:nq])
        gt, gt_seconds = ground_truth(bt, queries, num_subsets=50, num_seeds=1 if args.quick else 3)
        print(f"{name}: accuracy {bt.accuracy():.3f}, ground truth {gt_seconds:.1f} s")
        for method in (dg.KFAC, dg.EKFAC):
            rows.append(ours(name, method, bt.model, bt.task, bt.train, queries, gt))
            if peers:
                row = theirs(name, method.method_name, bt, queries, gt, python)
                same = agreement(name, method, bt, queries, python)
                rows += [row] if row is not None else []
                agree += [same] if same is not None else []
    bench = lm_task(quick=args.quick, cache_dir=os.path.join(HERE, "..", "runs", "lm"))
    tag = "quick" if args.quick else "full"
    gt = lm_ground_truth(
        bench,
        num_subsets=args.lm_subsets,
        cache_path=os.path.join(HERE, "..", "runs", "lm", f"gt-{tag}-{args.lm_subsets}.npz"),
    )
    print(f"lm-docstrings: {bench.info['n_train']} training windows, {bench.info['n_query']} queries")
    for method in (dg.KFAC, dg.EKFAC):
        rows.append(ours("lm-docstrings", method, bench.model, bench.task, bench.train, bench.queries, gt))
    print()
    print_table(rows, ["task", "method", "library", "lds", "lds_ci", "seconds"])
    if agree:
        print("\nthe same method with the empirical Fisher (no draws) in both libraries:")
        print_table(agree, ["task", "method", "max_rel_diff", "pearson"])
    command = "python benchmarks/ekfac.py" + (" --quick" if args.quick else "")
    write_json(args.json, "ekfac", rows, command=command, kronfluence=peers, empirical_fisher_agreement=agree)


if __name__ == "__main__":
    main()
