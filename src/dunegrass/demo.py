"""``dunegrass demo``: attribute a digits MLP with every method and score each by LDS.

Trains θ₀, computes subset-retraining ground truth, runs every attributor, prints a table
(method, LDS ± 95 % CI, seconds) and writes ``results.json`` and ``report.html``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .bench.data import digits, digits_images
from .bench.models import mlp
from .bench.tasks import BenchmarkTask, train_model
from .eval import lds, subset_retraining
from .methods import (
    EKFAC,
    TRAK,
    Attributor,
    BayesianInfluence,
    Daunce,
    ExactInfluence,
    GradientInfluence,
    GraSS,
    TracIn,
)
from .store.atomic import atomic_write_json
from .task import ClassificationTask
from .train import EnsembleTrainer, Member, TrainConfig, member_state, reinitialize, stack_states


@dataclass
class DemoSettings:
    n_train: int = 1000
    n_queries: int = 100
    hidden: int = 64
    epochs: float = 30.0
    num_subsets: int = 50
    num_seeds: int = 3
    trak_checkpoints: int = 5
    k: int = 1024
    daunce_models: int = 256


FULL = DemoSettings()
QUICK = DemoSettings(n_train=500, n_queries=50, num_seeds=1, trak_checkpoints=3, k=512, daunce_models=128)


def _digits_task(s: DemoSettings, seed: int) -> BenchmarkTask:
    train, test = digits(s.n_train, 1797 - s.n_train, seed)
    config = TrainConfig(optimizer="adam", lr=3e-3, epochs=s.epochs, batch_size=64, weight_decay=1e-4)
    task = ClassificationTask()
    model = train_model(mlp(64, [s.hidden], 10, seed), task, train, config, seed)
    return BenchmarkTask("digits-mlp", model, task, train, test, config)


def _extra_checkpoints(bt: BenchmarkTask, count: int, seed: int) -> list[dict]:
    """TRAK's ensemble: θ₀ plus independently trained models (one vmapped run)."""
    n = len(bt.train[0])
    seeds = [seed + 1000 + j for j in range(count - 1)]
    members = [Member(torch.arange(n), s) for s in seeds]
    init = stack_states([reinitialize(bt.model, s) for s in seeds])
    trained = EnsembleTrainer(bt.model, bt.task, bt.train_config).train(bt.train, members, init=init)
    theta0 = {k: v.detach().clone() for k, v in bt.model.named_parameters()}
    return [theta0] + [member_state(trained, j) for j in range(count - 1)]


def demo_methods(bt: BenchmarkTask, s: DemoSettings, seed: int) -> list[tuple[str, Callable[[], Attributor], str]]:
    """(name, factory, notes) for every method in the demo; factories build unfitted attributors."""
    m, task = bt.model, bt.task
    return [
        (
            "TRAK",
            lambda: TRAK(m, task, k=s.k, checkpoints=_extra_checkpoints(bt, s.trak_checkpoints, seed)),
            f"{s.trak_checkpoints} checkpoints, Gaussian k={s.k}",
        ),
        ("TracIn", lambda: TracIn(m, task), "gradient dot product at θ₀"),
        (
            "GradientInfluence",
            lambda: GradientInfluence(m, task, compressor=f"gaussian:{s.k}"),
            f"Gaussian k={s.k}, eFIM damping 0.1",
        ),
        (
            "GraSS",
            lambda: GraSS(m, task, k=s.k),
            f"random mask {4 * s.k} > SparseJL k={s.k}, eFIM damping 0.1",
        ),
        ("EKFAC", lambda: EKFAC(m, task), "true Fisher, damping 0.1 × mean eigenvalue"),
        (
            "ExactInfluence",
            lambda: ExactInfluence(m, task, hessian="gauss_newton", damping=0.1),
            "full Gauss-Newton Hessian, damping 0.1",
        ),
        (
            "Daunce",
            lambda: Daunce(m, task, num_models=s.daunce_models, seed=seed),
            f"K={s.daunce_models} perturbed models ('if'), vmapped",
        ),
        (
            "BayesianInfluence",
            lambda: BayesianInfluence(m, task, seed=seed),
            "10 SGLD chains × 100 draws (devinterp's defaults: nβ 10, γ 1000, η 1e-4)",
        ),
    ]


def run_demo(
    quick: bool = False,
    out: str = "dunegrass-demo",
    seed: int = 0,
    settings: DemoSettings | None = None,
    progress: bool = True,
) -> dict:
    s = settings or (QUICK if quick else FULL)
    say = print
    t0 = time.time()
    say(f"dunegrass demo{' (quick)' if quick else ''}: digits, MLP 64-{s.hidden}-10, {s.n_train} training examples")
    bt = _digits_task(s, seed)
    queries = (bt.test[0][: s.n_queries], bt.test[1][: s.n_queries])
    say(f"  trained θ₀ in {time.time() - t0:.1f} s, held-out accuracy {bt.accuracy():.3f}")
    t = time.time()
    gt = subset_retraining(
        bt.model,
        bt.task,
        bt.train,
        queries,
        bt.train_config,
        num_subsets=s.num_subsets,
        num_seeds=s.num_seeds,
        seed=seed,
        progress=progress,
    )
    gt_seconds = time.time() - t
    say(f"  ground truth: {s.num_subsets} subsets × {s.num_seeds} seed(s) retrained in {gt_seconds:.1f} s")

    results = {"methods": {}}
    all_scores = {}
    say(f"\n  {'method':<20} {'LDS':>16} {'seconds':>9}")
    for name, factory, notes in demo_methods(bt, s, seed):
        t = time.time()
        attr = factory()
        attr.progress = progress
        scores = attr.fit(bt.train).score(queries)
        seconds = time.time() - t
        res = lds(scores, gt)
        results["methods"][name] = {"lds": res.mean, "lds_ci": [res.low, res.high], "seconds": seconds, "notes": notes}
        all_scores[name] = scores
        say(f"  {name:<20} {str(res):>16} {seconds:>9.1f}")

    # The noise floor: scores that carry no information, scored against the same ground truth.
    noise = torch.randn(len(queries[1]), s.n_train, generator=torch.Generator().manual_seed(seed))
    res = lds(noise, gt)
    results["baseline"] = {"random scores": {"lds": res.mean, "lds_ci": [res.low, res.high]}}
    say(f"  {'random scores':<20} {str(res):>16} {'':>9}  (the noise floor)")

    os.makedirs(out, exist_ok=True)
    results.update(
        {
            "task": bt.name,
            "accuracy": bt.accuracy(),
            "n_train": s.n_train,
            "n_queries": s.n_queries,
            "seed": seed,
            "settings": asdict(s),
            "ground_truth": {
                **{k: gt.config[k] for k in ("num_subsets", "alpha", "num_seeds", "from_scratch")},
                "train_config": gt.config["train_config"],
                "measurement": "query loss (cross-entropy)",
                "seconds": gt_seconds,
            },
            "total_seconds": time.time() - t0,
        }
    )
    atomic_write_json(os.path.join(out, "results.json"), results)
    _write_report(out, results, all_scores, gt, bt, queries, s, seed)
    say(
        f"\n  wrote {os.path.join(out, 'results.json')} and {os.path.join(out, 'report.html')} "
        f"({time.time() - t0:.0f} s in all)"
    )
    return results


def _write_report(
    out: str, results: dict, all_scores: dict, gt, bt: BenchmarkTask, queries, s: DemoSettings, seed: int
) -> None:
    """The report needs the dense scores and the ground truth (for the subset scatter) and the raw images."""
    from .report import write_report

    train_images, query_images = digits_images(s.n_train, 1797 - s.n_train, seed)
    write_report(
        os.path.join(out, "report.html"),
        results,
        all_scores,
        gt,
        train_images=train_images,
        query_images=query_images,
        train_labels=bt.train[1].numpy(),
        query_labels=queries[1].numpy(),
    )


def load_results(out: str) -> dict:
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)
