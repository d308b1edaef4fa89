"""How Daunce trains its members and evaluates their signals: three interchangeable back ends.

- ``ensemble``: small models, all members of a group at once (vmapped ``EnsembleTrainer``), SGD/Adam;
- ``finetune``: one member at a time with the plain loop of ``train.finetune`` (any nn.Module,
  optionally LoRA adapters through peft); each member is checkpointed and resumable;
- ``newton``: exact minimisation of each perturbed objective (convex models whose outputs are
  linear in the parameters, e.g. logistic regression); the estimator without optimisation noise.

Each back end maps members (subset, seed) and their ε to trained states (dicts of tensors, on the
model's device), and states to signals ``[M, n]`` (float64, moved to the host once per member).
Members start from θ₀ and the caller's model is left as it was. θ₀'s anchors are recomputed for
each training batch from θ₀'s outputs (``anchored_objective``): the vmapped ensemble and full
fine-tuning run θ₀'s own tensors through the model, LoRA runs the model with its adapter disabled,
so memory for them is one batch's outputs and output gradients (B × T × V for a language model),
never n of them.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..data import TensorData, as_data, iterate_batches, to_device
from ..errors import DunegrassError
from ..gradients.per_sample import FunctionalModel, frozen_tensors
from ..influence.exact import flat_parameters
from ..task import Task
from ..train import EnsembleTrainer, Member, TrainConfig, ensemble_outputs, member_state, stack_states
from ..train.ensemble import trainable_names
from ..train.finetune import finetune
from ..train.frozen_prefix import FrozenPrefix
from ..train.lora import LoraConfig, add_lora, load_state, lora_state, remove_lora, reset_lora
from ..train.newton import newton_minimize
from .daunce_objectives import Terms, anchored_objective, theta0_anchors

Signal = Callable[[Tensor, Any], Tensor]
BACKENDS = ("ensemble", "finetune", "newton")


class EnsembleBackend:
    """All members of a group trained at once by the vmapped ensemble trainer."""

    name = "ensemble"

    def __init__(
        self, model: nn.Module, task: Task, config: TrainConfig, terms: Terms | None, anchored: bool, progress: bool
    ):
        self.model, self.task = model, task
        objective = None
        if terms is not None:
            # θ₀'s tensors run through the same module functionally; members start from copies of them.
            theta0 = frozen_tensors(model, ())
            outputs0 = (lambda batch: task.outputs(FunctionalModel(model, theta0), batch)) if anchored else None
            objective = anchored_objective(task, terms, outputs0)
        self.trainer = EnsembleTrainer(model, task, config, objective=objective, progress=progress)

    def check_data(self, data: Any) -> None:
        if not isinstance(as_data(data), TensorData):
            raise DunegrassError(
                "the vmapped ensemble back end needs in-memory tensors: pass the data as a tuple (X, y) or a "
                "dict of tensors, or use trainer='finetune'"
            )

    def train(self, data, members: Sequence[Member], eps: Tensor | None) -> list[dict]:
        per_member = None if eps is None else {"eps": eps.to(torch.float32)}
        stacked = self.trainer.train(data, members, per_member=per_member)
        return [member_state(stacked, j) for j in range(len(members))]

    def evaluate(self, states: Sequence[Mapping[str, Tensor]], data: Any, fn: Signal, batch_size: int) -> Tensor:
        device = next(self.model.parameters()).device
        stacked = {k: v.to(device) for k, v in stack_states(states).items()}
        return ensemble_outputs(self.model, self.task, stacked, data, fn, batch_size).to(torch.float64).cpu()

    def close(self) -> None:
        pass


class NewtonBackend:
    """Each perturbed objective minimised exactly (float64), with L2 coefficient ``l2``.

    The ``if``/``efim`` objectives get (l2/2)‖θ − θ₀‖² — the Bregman divergence of the training
    regulariser about θ₀, i.e. the regulariser's part of L(θ) − L(θ₀) − ∇L(θ₀)ᵀ(θ − θ₀) — so that
    their curvature is the regularised Hessian H; ``blackbox`` (plain training on D_k) keeps the
    ordinary (l2/2)‖θ‖² of the original objective. The whole training set is one batch here (small
    convex models; the output Jacobians [n, o, p] dominate), so θ₀'s anchors are taken once for it,
    in float64.
    """

    name = "newton"

    def __init__(self, model: nn.Module, task: Task, terms: Terms, l2: float, anchored: bool):
        self.model, self.task, self.terms, self.l2 = model, task, terms, l2
        self.names = trainable_names(model)
        self.flat, self.unflatten = flat_parameters(model, self.names)
        self.center = self.flat.detach().to(torch.float64) if anchored else None
        self.model64 = copy.deepcopy(model).to(torch.float64)
        self._anchors: dict[str, Tensor] | None = None

    check_data = EnsembleBackend.check_data

    def _full(self, data: Any) -> tuple:
        device = next(self.model64.parameters()).device
        full = as_data(data).slice(slice(None))
        return tuple((t.to(torch.float64) if t.is_floating_point() else t).to(device) for t in full)

    def train(self, data, members: Sequence[Member], eps: Tensor | None) -> list[dict]:
        sizes = {len(m.indices) for m in members}
        if len(sizes) != 1:
            raise DunegrassError("the newton back end needs members with subsets of one size")
        subsets = torch.stack([torch.as_tensor(m.indices) for m in members])
        per_member = None if eps is None else {"eps": eps}
        if self.center is not None and self._anchors is None:
            full = self._full(data)
            with torch.no_grad():
                anchors = theta0_anchors(self.task, self.task.outputs(self.model64, full), full)
            self._anchors = {k: v.cpu() for k, v in anchors.items()}  # [n, o]: gathered per member subset
        theta = newton_minimize(
            self.model, self.task, data, self.terms, subsets, per_member, self._anchors, self.l2, self.center
        )
        return [self.unflatten(t) for t in theta]

    def evaluate(self, states: Sequence[Mapping[str, Tensor]], data: Any, fn: Signal, batch_size: int) -> Tensor:
        full = self._full(data)
        device = next(self.model64.parameters()).device
        stacked = {k: v.to(device, torch.float64) for k, v in stack_states(states).items()}
        return ensemble_outputs(self.model64, self.task, stacked, full, fn, batch_size).cpu()

    def close(self) -> None:
        pass


class FinetuneBackend:
    """Members trained one after another in ``model`` itself (full fine-tuning or LoRA adapters).

    Full fine-tuning restores θ₀ before each member and at ``close``; with LoRA the adapters are
    injected once, re-drawn per member (B = 0, so each member starts at θ₀) and removed at ``close``.
    θ₀'s outputs for the anchors: a functional call with θ₀'s saved trainable tensors (full
    fine-tuning), or the model with its adapter disabled (LoRA).
    """

    name = "finetune"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        config: TrainConfig,
        terms: Terms | None,
        anchored: bool,
        lora: LoraConfig | None,
        checkpoint_dir: str | None,
        checkpoint_every: int,
        progress: bool,
        prefix_bytes: int = 0,
    ):
        self.task, self.config, self.lora = task, config, lora
        self.checkpoint_dir, self.checkpoint_every, self.progress = checkpoint_dir, checkpoint_every, progress
        self.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self._theta0: dict[str, Tensor] | None = None
        self.prefix: FrozenPrefix | None = None
        if lora is not None:
            # peft's new dropout modules start in training mode: eval keeps members deterministic, as the
            # model itself is (a member's perturbation and batch order are its only randomness).
            self.net = add_lora(model, lora).eval()
            # Adapters on the last blocks only: θ₀'s states below them are computed once per example.
            self.prefix = FrozenPrefix.install(self.net, prefix_bytes)
        else:
            self.net = model
            self.names = trainable_names(model)
        self.objective = None
        if terms is not None:
            self.objective = anchored_objective(task, terms, self._theta0_outputs if anchored else None)

    @property
    def theta0(self) -> dict[str, Tensor]:
        """θ₀'s trainable tensors, copied the first time a member trains (scoring alone needs no copy)."""
        if self._theta0 is None:
            named = dict(self.net.named_parameters())
            self._theta0 = {n: named[n].detach().clone() for n in self.names}
        return self._theta0

    def _theta0_outputs(self, batch: Any) -> Tensor:
        if self.lora is not None:
            with self.net.disable_adapter():
                return self.task.outputs(self.net, batch)
        return self.task.outputs(FunctionalModel(self.net, self.theta0), batch)

    def check_data(self, data: Any) -> None:
        as_data(data)

    def reset(self, member: Member) -> None:
        """Put the model at θ₀ for ``member``: θ₀'s weights back, or fresh adapters drawn with its seed."""
        if self.lora is not None:
            reset_lora(self.net, member.seed)
        else:
            load_state(self.net, self.theta0)

    def _state(self) -> dict[str, Tensor]:
        if self.lora is not None:
            return lora_state(self.net)
        named = dict(self.net.named_parameters())
        return {n: named[n].detach().clone() for n in self.names}

    def train(self, data, members: Sequence[Member], eps: Tensor | None) -> list[dict]:
        states = []
        for j, member in enumerate(members):
            self.reset(member)
            ckpt = None
            if self.checkpoint_dir is not None and self.checkpoint_every:
                os.makedirs(self.checkpoint_dir, exist_ok=True)
                ckpt = os.path.join(self.checkpoint_dir, f"member-seed-{member.seed}.safetensors")
            per_member = None if eps is None else {"eps": eps[j]}
            finetune(
                self.net,
                self.task,
                data,
                member,
                self.config,
                objective=self.objective,
                per_member=per_member,
                checkpoint=ckpt,
                checkpoint_every=self.checkpoint_every,
                progress=self.progress,
            )
            states.append(self._state())
        return states

    @torch.no_grad()
    def evaluate(self, states: Sequence[Mapping[str, Tensor]], data: Any, fn: Signal, batch_size: int) -> Tensor:
        device = next(self.net.parameters()).device
        rows = []
        for state in states:
            if self.lora is not None:
                load_state(self.net, state)  # the adapters, removed at close
                net = self.net
            else:  # a functional call: the model itself never holds a member's weights here
                net = FunctionalModel(self.net, dict(state))
            parts = [
                fn(self.task.outputs(net, b), b).detach().to(torch.float64)
                for b in (to_device(batch, device) for _, batch in iterate_batches(data, batch_size))
            ]
            rows.append(torch.cat(parts).cpu())  # one transfer per member
        return torch.stack(rows)

    def close(self) -> nn.Module:
        """Leave the model as it was (θ₀, no adapters); returns it."""
        if self.lora is not None:
            if self.prefix is not None:
                self.prefix.close()
            return remove_lora(self.net, self.requires_grad)
        if self._theta0 is not None:  # members were trained in place
            load_state(self.net, self._theta0)
        return self.net
