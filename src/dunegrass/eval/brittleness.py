"""Brittleness: remove a query's top-k proponents, retrain, and see whether its prediction flips.

A method whose top proponents really support the query makes the query fail after removing few of
them; removing k random training examples is the control. All retrainings (queries × k × seeds,
for the method and for the control, plus the full-data models) run as one vmapped ensemble.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data import as_data
from ..errors import DunegrassError
from ..modes import retraining_mode
from ..scores import Scores
from ..seeding import derive_seed
from ..task import ClassificationTask
from ..train import EnsembleTrainer, Member, TrainConfig, ensemble_outputs, reinitialize, stack_states


def brittleness(
    model: nn.Module,
    task: ClassificationTask,
    train: Any,
    queries: Any,
    scores: Scores,
    config: TrainConfig,
    ks: Sequence[int] = (10, 20, 40),
    num_seeds: int = 2,
    seed: int = 0,
) -> dict:
    """Fraction of queries misclassified after removing their top-k proponents, for each k.

    Returns ``{"k": [...], "flip_rate": [...], "random_flip_rate": [...], "loss_increase": [...],
    "random_loss_increase": [...], "n_queries": ...}``; loss increases are query losses relative to
    full-data retraining with the same seeds, averaged over seeds and queries. Pass only queries
    the model classifies correctly, as is customary.
    """
    if not isinstance(task, ClassificationTask):
        raise DunegrassError("brittleness counts flipped predictions: it needs a ClassificationTask")
    train, queries = as_data(train), as_data(queries)
    n, nq = len(train), len(queries)
    if scores.values.shape != (nq, n):
        raise DunegrassError(f"scores {tuple(scores.values.shape)} do not match {nq} queries × {n} training examples")
    if not torch.isfinite(scores.values).all():
        raise DunegrassError(
            "scores hold NaN or inf (a diverged method?); brittleness removes each query's top proponents, which "
            "such scores do not rank"
        )
    if max(ks) >= n:
        raise DunegrassError(f"k = {max(ks)} must be smaller than the training set ({n})")
    gen = torch.Generator().manual_seed(derive_seed(seed, 0x627274))
    removals = []  # (kind, query, k) -> removed indices
    for q in range(nq):
        ranked = torch.argsort(scores.values[q], descending=True)
        for k in ks:
            removals.append(("method", q, k, ranked[:k]))
            removals.append(("random", q, k, torch.randperm(n, generator=gen)[:k]))
    keep_sets = [torch.arange(n)] + [_complement(n, r[3]) for r in removals]
    members, inits = [], []
    for keep in keep_sets:
        for r in range(num_seeds):
            s = derive_seed(seed, 0x6D656D, r)  # same seed per r for every removal: a paired comparison
            members.append(Member(keep, s))
            inits.append(reinitialize(model, s))
    trainer = EnsembleTrainer(model, task, config, train_mode=retraining_mode(model))
    trained = trainer.train(train, members, init=stack_states(inits))
    losses = ensemble_outputs(model, task, trained, queries, fn=task.loss).view(len(keep_sets), num_seeds, nq)
    correct = ensemble_outputs(model, task, trained, queries, fn=_correct).view(len(keep_sets), num_seeds, nq)
    base = losses[0]  # [R, nq]
    out = {
        "k": list(ks),
        "flip_rate": [],
        "random_flip_rate": [],
        "loss_increase": [],
        "random_loss_increase": [],
        "n_queries": nq,
        "num_seeds": num_seeds,
    }
    for kind, key in (("method", ""), ("random", "random_")):
        for k in ks:
            rows = [i + 1 for i, r in enumerate(removals) if r[0] == kind and r[2] == k]
            qs = [removals[i - 1][1] for i in rows]
            # a query counts as flipped when most seeds misclassify it
            flipped = torch.stack([(correct[i, :, q].mean() < 0.5).float() for i, q in zip(rows, qs)])
            out[f"{key}flip_rate"].append(float(flipped.mean()))
            inc = torch.stack([losses[i, :, q] - base[:, q] for i, q in zip(rows, qs)])
            out[f"{key}loss_increase"].append(float(inc.mean()))
    return out


def _complement(n: int, removed: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    return keep.nonzero()[:, 0]


def _correct(outputs: torch.Tensor, batch) -> torch.Tensor:
    return (outputs.argmax(1) == batch[1]).float()
