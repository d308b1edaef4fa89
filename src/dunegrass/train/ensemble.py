"""Vmapped ensembles: train M copies of a small model at once, each on its own data and seed.

Parameters are stacked along a leading member dimension and one step is ``vmap(grad(loss))`` over
members. Member j sees its own stream of mini-batches (its subset, reshuffled each epoch by its own
seed), so the result equals training the members one by one with the same streams (tested). The
optimiser arithmetic is elementwise and needs no vmap.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from tqdm.auto import tqdm

from ..data import TensorData, as_data, to_device
from ..errors import DunegrassError
from ..gradients.per_sample import FunctionalModel, check_finite
from ..seeding import derive_seed
from ..task import Task
from .config import TrainConfig
from .optim import FunctionalOptimizer

# objective(outputs [B, ...], batch, aux {name: [B, ...]}) -> scalar; None = mean training loss
Objective = Callable[[Tensor, Any, dict[str, Tensor]], Tensor]


@dataclass
class Member:
    """One ensemble member: the training examples it sees and the seed of its batch order."""

    indices: Tensor
    seed: int


def batch_schedule(member: Member, steps: int, batch_size: int) -> Tensor:
    """``[steps, batch_size]`` training-set indices: epochs of seeded shuffles of the member's subset."""
    idx = torch.as_tensor(member.indices, dtype=torch.long)
    if idx.numel() == 0:
        raise DunegrassError("an ensemble member has an empty training subset")
    need = steps * batch_size
    gen = torch.Generator().manual_seed(derive_seed(member.seed, 0x62617463))
    perms = [torch.randperm(idx.numel(), generator=gen) for _ in range(-(-need // idx.numel()))]
    return idx[torch.cat(perms)[:need]].view(steps, batch_size)


def stack_states(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


def member_state(stacked: Mapping[str, Tensor], j: int) -> dict[str, Tensor]:
    return {k: v[j].clone() for k, v in stacked.items()}


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def reinitialize(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """Fresh parameters as the model's own ``reset_parameters`` draws them, under ``seed``."""
    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, 0x696E6974))
        for mod in clone.modules():
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
    return trainable_state(clone)


class EnsembleTrainer:
    """Train members of ``model``'s architecture with ``config``; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        config: TrainConfig,
        objective: Objective | None = None,
        progress: bool = False,
    ):
        self.model, self.task, self.config, self.objective = model, task, config, objective
        self.progress = progress
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.names = names
        self.consts = {n: p.detach() for n, p in model.named_parameters() if n not in set(names)}
        self.consts.update(dict(model.named_buffers()))

    def _member_loss(self, params: dict[str, Tensor], batch: Any, aux: dict[str, Tensor]) -> Tensor:
        out = self.task.outputs(FunctionalModel(self.model, {**self.consts, **params}), batch)
        if self.objective is None:
            return self.task.loss(out, batch).mean()
        return self.objective(out, batch, aux)

    def train(
        self,
        data: Any,
        members: Sequence[Member],
        init: Mapping[str, Tensor] | None = None,
        shared: Mapping[str, Tensor] | None = None,
        per_member: Mapping[str, Tensor] | None = None,
        max_members: int | None = None,
    ) -> dict[str, Tensor]:
        """Stacked trained parameters ``{name: [M, ...]}``.

        ``init``: starting parameters, stacked ``[M, ...]`` or one set for all (default: the model's).
        ``shared``: per-training-example tensors ``[n, ...]`` handed to the objective for each batch;
        ``per_member``: the same, different per member ``[M, n, ...]``. ``max_members`` bounds how many
        members are vmapped at once (memory); the result does not depend on it.
        """
        data = as_data(data)
        if not isinstance(data, TensorData):
            raise DunegrassError("ensemble training needs in-memory tensors: pass the data as a tuple (X, y)")
        if not members:
            raise DunegrassError("an ensemble needs at least one member")
        M = len(members)
        base = trainable_state(self.model) if init is None else dict(init)
        missing = [n for n in self.names if n not in base]
        if missing:
            raise DunegrassError(f"init lacks parameters {missing[:5]}")
        if _is_stacked(base, self.model, M):
            stacked = {n: base[n].clone() for n in self.names}
        else:
            stacked = {n: base[n].unsqueeze(0).expand(M, *base[n].shape).clone() for n in self.names}
        group = max_members or M
        out = {n: torch.empty_like(v) for n, v in stacked.items()}
        for lo in range(0, M, group):
            hi = min(lo + group, M)
            sub = {n: v[lo:hi].clone() for n, v in stacked.items()}
            pm = {k: v[lo:hi] for k, v in (per_member or {}).items()}
            trained = self._train_group(data, members[lo:hi], sub, shared or {}, pm)
            for n in self.names:
                out[n][lo:hi] = trained[n]
        return out

    def _train_group(self, data: TensorData, members, params, shared, per_member) -> dict[str, Tensor]:
        cfg = self.config
        steps = max(cfg.num_steps(len(m.indices)) for m in members)
        sched = torch.stack([batch_schedule(m, steps, cfg.batch_size) for m in members], dim=1)  # [T, M, B]
        opt = FunctionalOptimizer(params, cfg)
        member_grad = vmap(grad(self._member_loss), in_dims=(0, 0, 0))
        rows = torch.arange(len(members))[:, None]
        device = next(iter(params.values())).device  # data and anchors may live on the CPU, the members not
        for t in tqdm(range(steps), desc="train ensemble", disable=not self.progress, leave=False):
            idx = sched[t]  # [M, B]
            batch = to_device(data.slice(idx), device)
            aux = {k: v[idx].to(device) for k, v in shared.items()}
            aux.update({k: v[rows, idx].to(device) for k, v in per_member.items()})
            grads = member_grad(params, batch, aux)
            if t == 0 or t == steps - 1:
                for g in grads.values():
                    check_finite(g, "ensemble training gradient")
            opt.step(params, grads, cfg.lr_at(t, steps))
        for n, p in params.items():
            check_finite(p, f"trained parameter {n!r}")
        return params


def _is_stacked(state: Mapping[str, Tensor], model: nn.Module, M: int) -> bool:
    shapes = {n: p.shape for n, p in model.named_parameters()}
    return all(v.dim() == len(shapes[n]) + 1 and v.shape[0] == M for n, v in state.items() if n in shapes)


def ensemble_outputs(
    model: nn.Module,
    task: Task,
    stacked: Mapping[str, Tensor],
    data: Any,
    fn: Callable[[Tensor, Any], Tensor] | None = None,
    batch_size: int = 1024,
) -> Tensor:
    """``fn(outputs, batch)`` for every member on every example: ``[M, n, ...]`` (default: the outputs)."""
    data = as_data(data)
    if not isinstance(data, TensorData):
        raise DunegrassError("ensemble evaluation needs in-memory tensors: pass the data as a tuple (X, y)")
    consts = {n: p.detach() for n, p in model.named_parameters() if n not in stacked}
    consts.update(dict(model.named_buffers()))

    def one(params, batch):
        out = task.outputs(FunctionalModel(model, {**consts, **params}), batch)
        return out if fn is None else fn(out, batch)

    run = vmap(one, in_dims=(0, None))
    device = next(iter(stacked.values())).device
    parts = []
    with torch.no_grad():
        for lo in range(0, len(data), batch_size):
            parts.append(run(dict(stacked), to_device(data.slice(slice(lo, lo + batch_size)), device)))
    return torch.cat(parts, dim=1)
