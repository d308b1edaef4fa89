"""Vmapped ensembles: train M copies of a small model at once, each on its own data and seed.

Parameters are stacked along a leading member dimension and one step is ``vmap(grad(loss))`` over
members. Member j sees its own stream of mini-batches (its subset, reshuffled each epoch by its own
seed), so the result equals training the members one by one with the same streams (tested) — except for a
dropout layer in train mode, whose masks are drawn for the members vmapped together (so they depend on
``max_members``). The optimiser arithmetic is elementwise and needs no vmap.

Running statistics (BatchNorm's ``running_mean``, ``running_var``, ``num_batches_tracked``) are
per-member state too: each member gets its own stacked copy, which a train-mode forward pass updates
(``functional_call`` writes BatchNorm's in-place update into the tensors it is given; the step returns
them), and they come back with the parameters. Evaluation (``ensemble_outputs``) runs in eval mode,
so each member is measured with its own running statistics.
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
from ..gradients.attention import vmap_safe_attention
from ..gradients.per_sample import FunctionalModel, check_finite, frozen_tensors
from ..modes import module_mode, running_stat_names
from ..seeding import derive_seed, seeded_generators
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


def running_stats(model: nn.Module) -> dict[str, Tensor]:
    """Copies of the model's running statistics (see ``running_stat_names``)."""
    buffers = dict(model.named_buffers())
    return {n: buffers[n].detach().clone() for n in running_stat_names(model)}


def trainable_names(model: nn.Module) -> list[str]:
    """The names of the parameters training changes (requires_grad); an error naming the fix when there are none."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise DunegrassError(
            "the model has no trainable parameters (requires_grad) to train; unfreeze the ones to attribute "
            "over with p.requires_grad_(True)"
        )
    return names


def _resetter(module: nn.Module) -> Callable[[], None] | None:
    """The module's own re-initialiser: ``reset_parameters``, or torch's private ``_reset_parameters``
    (nn.MultiheadAttention, nn.Transformer)."""
    return getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)


def reinitialize(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """Fresh parameters (and reset running statistics) under ``seed``, as the modules' own re-initialisers
    draw them, then, for a Hugging Face model, as its ``_init_weights`` does (transformers' ``Conv1D`` has no
    ``reset_parameters``; that method is trusted to reach the rest). In any other model a trainable parameter no
    re-initialiser reaches is refused, never left at its trained value."""
    clone = copy.deepcopy(model)
    hf_init = getattr(clone, "_init_weights", None)
    if not callable(hf_init):
        left = [
            f"{prefix}.{name}" if prefix else name
            for prefix, mod in clone.named_modules()
            if _resetter(mod) is None
            for name, p in mod.named_parameters(recurse=False)
            if p.requires_grad
        ]
        if left:
            raise DunegrassError(
                f"cannot re-initialise {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}: their modules have no "
                "reset_parameters(); give those modules one, or retrain from the model's weights (from_scratch=False)"
            )
    with seeded_generators(derive_seed(seed, 0x696E6974), {p.device for p in clone.parameters()}):
        for mod in clone.modules():
            reset = _resetter(mod)
            if reset is not None:
                reset()
        if callable(hf_init):
            for obj in (*clone.modules(), *clone.parameters()):  # a loaded model's are marked done: init skips them
                if getattr(obj, "_is_hf_initialized", False):
                    obj._is_hf_initialized = False
            clone.apply(hf_init)
    return {**trainable_state(clone), **running_stats(clone)}


def load_member(model: nn.Module, stacked: Mapping[str, Tensor], j: int) -> nn.Module:
    """Copy member ``j`` of ``stacked`` (parameters and any running statistics) into ``model``, in place."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for name, value in stacked.items():
            tensors[name].copy_(value[j])
    return model


class EnsembleTrainer:
    """Train members of ``model``'s architecture with ``config``; see the module docstring.

    ``train_mode``: the mode of the training forward passes. None (default) keeps the modes the model
    and its submodules are in when ``train`` is called — a freshly built model is in train mode; Daunce
    puts the model in eval mode first and so trains its members in eval mode. True: train mode, so
    BatchNorm normalises with batch statistics and updates each member's running statistics. False:
    eval mode, BatchNorm uses the running statistics and leaves them as they are. Either way the
    caller's model keeps its own modes and buffers, and models with running statistics get theirs
    back per member beside the parameters. A dropout layer in train mode draws a different mask per member,
    from a generator seeded by the members' seeds (the global generator is left as it was).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        config: TrainConfig,
        objective: Objective | None = None,
        progress: bool = False,
        train_mode: bool | None = None,
    ):
        self.model, self.task, self.config, self.objective = model, task, config, objective
        self.progress, self.train_mode = progress, train_mode
        names = trainable_names(model)
        self.names = names
        self.stats = running_stat_names(model)  # per-member state beside the parameters
        self.consts = frozen_tensors(model, [*names, *self.stats])

    def _member_loss(
        self, params: dict[str, Tensor], stats: dict[str, Tensor], batch: Any, aux: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        stats = {n: v.clone() for n, v in stats.items()}  # a train-mode BatchNorm updates these in place
        out = self.task.outputs(FunctionalModel(self.model, {**self.consts, **stats, **params}), batch)
        loss = self.task.loss(out, batch).mean() if self.objective is None else self.objective(out, batch, aux)
        return loss, stats

    def train(
        self,
        data: Any,
        members: Sequence[Member],
        init: Mapping[str, Tensor] | None = None,
        shared: Mapping[str, Tensor] | None = None,
        per_member: Mapping[str, Tensor] | None = None,
        max_members: int | None = None,
    ) -> dict[str, Tensor]:
        """Stacked trained parameters ``{name: [M, ...]}``, and the running statistics when the model has any.

        ``init``: starting parameters (and running statistics), stacked ``[M, ...]`` or one set for all
        (default, and for the running statistics it lacks: the model's).
        ``shared``: per-training-example tensors ``[n, ...]`` handed to the objective for each batch;
        ``per_member``: the same, different per member ``[M, n, ...]``. ``max_members`` bounds how many
        members are vmapped at once (memory); the result does not depend on it, but for a train-mode dropout's masks.
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
        own = running_stats(self.model)
        base.update({n: own[n] for n in self.stats if n not in base})
        keys = self.names + self.stats
        shapes = {n: t.shape for n, t in (*self.model.named_parameters(), *self.model.named_buffers())}
        stacked = {n: _stack(base[n], shapes[n], M, n) for n in keys}
        group = max_members or M
        out = {n: torch.empty_like(v) for n, v in stacked.items()}
        for lo in range(0, M, group):
            hi = min(lo + group, M)
            sub = {n: v[lo:hi].clone() for n, v in stacked.items()}
            pm = {k: v[lo:hi] for k, v in (per_member or {}).items()}
            trained = self._train_group(data, members[lo:hi], sub, shared or {}, pm)
            for n in keys:
                out[n][lo:hi] = trained[n]
        return out

    def _check_modes(self) -> None:
        """Refuse what vmap cannot do per member in the modes the model is now in."""
        for name, module in self.model.named_modules():
            if module.training and f"{name}.running_mean" in self.stats and getattr(module, "momentum", 0.1) is None:
                raise DunegrassError(
                    f"{type(module).__name__} {name!r} has momentum=None (a cumulative average over "
                    "num_batches_tracked), which vmapped train-mode training cannot compute per member; give it "
                    "a float momentum, train with train_mode=False, or train members one by one (train.finetune)"
                )

    def _train_group(self, data: TensorData, members, state, shared, per_member) -> dict[str, Tensor]:
        cfg = self.config
        params = {n: state[n] for n in self.names}
        stats = {n: state[n] for n in self.stats}
        steps = max(cfg.num_steps(len(m.indices)) for m in members)
        sched = torch.stack([batch_schedule(m, steps, cfg.batch_size) for m in members], dim=1)  # [T, M, B]
        opt = FunctionalOptimizer(params, cfg)
        # "different": a train-mode dropout draws its own mask per member, from a generator seeded by the
        # members' seeds (so the draws depend on which members train together, max_members).
        member_grad = vmap(grad(self._member_loss, has_aux=True), in_dims=(0, 0, 0, 0), randomness="different")
        rows = torch.arange(len(members))[:, None]
        device = next(iter(params.values())).device  # data and anchors may live on the CPU, the members not
        seed = derive_seed(0x64726F70, *(m.seed for m in members))
        with (
            module_mode(self.model, self.train_mode),
            vmap_safe_attention(self.model),
            seeded_generators(seed, [device]),
        ):
            self._check_modes()
            for t in tqdm(range(steps), desc="train ensemble", disable=not self.progress, leave=False):
                idx = sched[t]  # [M, B]
                batch = to_device(data.slice(idx), device)
                aux = {k: v[idx].to(device) for k, v in shared.items()}
                aux.update({k: v[rows, idx].to(device) for k, v in per_member.items()})
                grads, stats = member_grad(params, stats, batch, aux)
                if t == 0 or t == steps - 1:
                    for g in grads.values():
                        check_finite(g, "ensemble training gradient")
                opt.step(params, grads, cfg.lr_at(t, steps))
        for n, p in params.items():
            check_finite(p, f"trained parameter {n!r}")
        return {**params, **stats}


def _stack(value: Tensor, shape: torch.Size, M: int, name: str) -> Tensor:
    """``[M, *shape]``: ``value`` itself when already stacked, else one copy per member."""
    if value.dim() == len(shape) + 1 and value.shape[0] == M and value.shape[1:] == shape:
        return value.clone()
    if value.shape != shape:
        raise DunegrassError(
            f"init[{name!r}] has shape {tuple(value.shape)}; expected {tuple(shape)} (one set for all members) "
            f"or {(M, *shape)} (one per member)"
        )
    return value.unsqueeze(0).expand(M, *shape).clone()


def ensemble_outputs(
    model: nn.Module,
    task: Task,
    stacked: Mapping[str, Tensor],
    data: Any,
    fn: Callable[[Tensor, Any], Tensor] | None = None,
    batch_size: int = 1024,
) -> Tensor:
    """``fn(outputs, batch)`` for every member on every example: ``[M, n, ...]`` (default: the outputs).

    ``stacked`` holds ``[M, ...]`` parameters and, optionally, running statistics (as ``train`` returns
    them); the rest comes from ``model``. Runs in eval mode (the model's own modes are restored), so
    BatchNorm uses each member's running statistics.
    """
    data = as_data(data)
    if not isinstance(data, TensorData):
        raise DunegrassError("ensemble evaluation needs in-memory tensors: pass the data as a tuple (X, y)")
    consts = frozen_tensors(model, stacked)

    def one(params, batch):
        out = task.outputs(FunctionalModel(model, {**consts, **params}), batch)
        return out if fn is None else fn(out, batch)

    run = vmap(one, in_dims=(0, None))
    device = next(iter(stacked.values())).device
    parts = []
    with torch.no_grad(), module_mode(model, False), vmap_safe_attention(model):
        for lo in range(0, len(data), batch_size):
            parts.append(run(dict(stacked), to_device(data.slice(slice(lo, lo + batch_size)), device)))
    return torch.cat(parts, dim=1)
