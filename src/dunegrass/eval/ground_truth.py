"""Ground truth by retraining: subsets for LDS, leave-one-out for convex models.

Everything needed to recompute it is stored with it: subset indices, seeds, training config and
task, as ``.npz`` (no pickle) with the metadata as JSON text.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data import as_data
from ..errors import DunegrassError
from ..modes import retraining_mode
from ..seeding import derive_seed
from ..store.atomic import atomic_write_bytes
from ..task import Task
from ..train import EnsembleTrainer, Member, TrainConfig, ensemble_outputs, reinitialize, stack_states
from ..train.ensemble import trainable_names
from ..train.newton import newton_fit


@dataclass
class GroundTruth:
    """Retrained measurements: ``masks [M, n_train]`` (bool, subset membership) and
    ``values [M, n_query]``, the query loss (``task.query_loss``, lower is better) averaged over seeds."""

    masks: Tensor
    values: Tensor
    config: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        buf = io.BytesIO()
        np.savez(
            buf,
            masks=self.masks.numpy(),
            values=self.values.numpy(),
            config_json=np.frombuffer(json.dumps(self.config).encode(), dtype=np.uint8),
        )
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> GroundTruth:
        with np.load(path, allow_pickle=False) as z:
            config = json.loads(bytes(z["config_json"]).decode())
            return cls(torch.from_numpy(z["masks"].copy()), torch.from_numpy(z["values"].copy()), config)


def random_subsets(n: int, num_subsets: int, alpha: float, seed: int) -> Tensor:
    """``[num_subsets, n]`` boolean masks, each with round(alpha · n) members chosen uniformly."""
    if not 0 < alpha < 1:
        raise DunegrassError(f"alpha must be in (0, 1), got {alpha}")
    size = max(1, int(round(alpha * n)))
    gen = torch.Generator().manual_seed(derive_seed(seed, 0x737562))
    masks = torch.zeros(num_subsets, n, dtype=torch.bool)
    for j in range(num_subsets):
        masks[j, torch.randperm(n, generator=gen)[:size]] = True
    return masks


def subset_retraining(
    model: nn.Module,
    task: Task,
    train: Any,
    queries: Any,
    config: TrainConfig,
    num_subsets: int = 50,
    alpha: float = 0.5,
    num_seeds: int = 1,
    seed: int = 0,
    from_scratch: bool = True,
    max_members: int | None = None,
    progress: bool = False,
) -> GroundTruth:
    """Retrain on ``num_subsets`` random α-subsets, ``num_seeds`` seeds each, as one vmapped ensemble.

    ``from_scratch=True`` re-initialises each member (seeded); otherwise members start from the
    model's current weights. Records ``task.query_loss`` of every query, averaged over seeds.

    Members train as θ₀ did (``bench.train_model``): a model with BatchNorm trains in train mode (batch
    statistics), each member updating its own running statistics (reset when from scratch, θ₀'s
    otherwise), and every member is measured in eval mode with its own. Other models train in the
    mode they are in.
    """
    if num_subsets < 2 or num_seeds < 1:
        raise DunegrassError("ground truth needs at least 2 subsets and 1 seed")
    train, queries = as_data(train), as_data(queries)
    masks = random_subsets(len(train), num_subsets, alpha, seed)
    members, inits = [], []
    for j in range(num_subsets):
        for r in range(num_seeds):
            member_seed = derive_seed(seed, j, r)
            members.append(Member(masks[j].nonzero()[:, 0], member_seed))
            if from_scratch:
                inits.append(reinitialize(model, member_seed))
    init = stack_states(inits) if from_scratch else None
    trainer = EnsembleTrainer(model, task, config, progress=progress, train_mode=retraining_mode(model))
    trained = trainer.train(train, members, init=init, max_members=max_members)
    values = ensemble_outputs(model, task, trained, queries, fn=task.query_loss)  # [M·R, n_query]
    values = values.view(num_subsets, num_seeds, -1).mean(1)
    meta = {
        "kind": "subsets",
        "num_subsets": num_subsets,
        "alpha": alpha,
        "num_seeds": num_seeds,
        "seed": seed,
        "from_scratch": from_scratch,
        "max_members": max_members,  # a train-mode dropout's masks depend on which members train together
        "train_config": config.to_dict(),
        "task": task.config(),
        "member_seeds": [m.seed for m in members],
        "n_train": len(train),
        "n_query": len(queries),
    }
    return GroundTruth(masks, values, meta)


def leave_one_out(
    model: nn.Module,
    task: Task,
    train: Any,
    queries: Any,
    l2: float,
    indices: Tensor | None = None,
    chunk: int = 64,
) -> Tensor:
    """Exact leave-one-out effects on a convex model trained with L2 coefficient ``l2``.

    Returns ``[n_query, len(indices)]``: query_loss(θ without z_i) − query_loss(θ), each model
    minimised exactly by Newton's method (float64) from the full-data optimum. Positive = z_i was a
    proponent (the query got worse without it), matching the score convention.
    """
    train, queries = as_data(train), as_data(queries)
    n = len(train)
    indices = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    full = newton_fit(model, task, train, torch.ones(1, n), l2)[0]
    base = _query_loss_flat(model, task, queries, full.unsqueeze(0))[0]
    effects = []
    for lo in range(0, indices.numel(), chunk):
        idx = indices[lo : lo + chunk]
        w = torch.ones(idx.numel(), n)
        w[torch.arange(idx.numel()), idx] = 0.0
        init = {name: p for name, p in _unflatten(model, full).items()}
        thetas = newton_fit(model, task, train, w, l2, init=init)
        effects.append(_query_loss_flat(model, task, queries, thetas) - base)
    return torch.cat(effects).T.contiguous().to(torch.float64)


def _unflatten(model: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    """The trainable parameters (``newton_fit``'s order) of a flat vector, by name."""
    from ..influence.exact import flat_parameters

    _, unflatten = flat_parameters(model, trainable_names(model))
    return unflatten(flat)


def _query_loss_flat(model: nn.Module, task: Task, queries, thetas: Tensor) -> Tensor:
    import copy

    model64 = copy.deepcopy(model).to(torch.float64)
    stacked = {k: torch.stack([_unflatten(model64, t)[k] for t in thetas]) for k in trainable_names(model64)}
    q = tuple(t.to(torch.float64) if t.is_floating_point() else t for t in queries.slice(slice(None)))
    return ensemble_outputs(model64, task, stacked, q, fn=task.query_loss)
