"""SGLD chains on a localised posterior: the sampler of the Bayesian influence function (algorithms.md §3.2).

The posterior p(w) ∝ exp(−nβ·L(w) − (γ/2)‖w − w*‖²) around the trained weights w* (= θ₀), sampled as
devinterp's SGLD does: one step is

    w ← w − (η/2)·(nβ·∇L_B(w) + γ·(w − w*)) + N(0, η),

with L_B the mean loss of one mini-batch. A chain starts at w*, runs ``burnin`` steps, then yields a
draw every ``every`` steps. Its batches (the whole training set, reshuffled each epoch) and its noise
come from generators seeded by the chain's own seed, so a chain replays exactly on the same device,
which lets queries unknown at fit time be scored without keeping any draw's weights.

``sgld_chain`` runs one chain in the model itself (any model, LoRA adapters); ``sgld_chains_vmapped`` runs
several chains of a small model in lockstep, ``vmap(grad)`` for the steps, with the same batches and noise
per chain (so the same draws, to rounding), and hands the caller all chains' parameters at each draw, to
be evaluated in one vmapped pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data import as_data, to_device
from ..errors import NonFiniteError
from ..gradients.attention import vmap_safe_attention
from ..gradients.per_sample import FunctionalModel, frozen_tensors
from ..seeding import derive_seed
from ..task import Task
from .ensemble import Member, batch_schedule
from .finetune import gather

NOISE_STREAM = 0x73676C64


@dataclass(frozen=True)
class SGLDConfig:
    """One chain's sampler: ``nbeta`` (nβ, the inverse temperature times n), ``gamma`` (γ, the pull towards
    w*), ``lr`` (η), ``batch_size``, ``burnin`` steps before the first draw, a draw every ``every`` steps."""

    nbeta: float
    gamma: float
    lr: float
    batch_size: int
    burnin: int = 0
    every: int = 1

    def num_steps(self, draws: int) -> int:
        return self.burnin + draws * self.every


def sgld_chain(
    model: nn.Module,
    task: Task,
    data: Any,
    params: Mapping[str, nn.Parameter],
    config: SGLDConfig,
    seed: int,
    draws: int,
    on_draw: Callable[[int], None],
    progress: bool = False,
) -> None:
    """Run one chain on ``params`` of ``model`` in place, calling ``on_draw(d)`` with the model at draw d.

    ``params`` (parameters of ``model``) are sampled, everything else is held fixed; they start where they
    are (w*) and are put back there at the end, also when a step fails.
    """
    data = as_data(data)
    anchor = {n: p.detach().clone() for n, p in params.items()}
    named = dict(model.named_parameters())
    was = {n: p.requires_grad for n, p in named.items()}
    sampled = set(params)
    device = next(iter(params.values())).device
    steps = config.num_steps(draws)
    sched = batch_schedule(Member(torch.arange(len(data)), seed), steps, min(config.batch_size, len(data)))
    noise = torch.Generator(device=device).manual_seed(derive_seed(seed, NOISE_STREAM))
    scale = math.sqrt(config.lr)
    try:
        for n, p in named.items():
            p.requires_grad_(n in sampled)
        for t in tqdm(range(steps), desc="SGLD chain", disable=not progress, leave=False):
            batch = to_device(gather(data, sched[t]), device)
            loss = task.loss(task.outputs(model, batch), batch).mean()
            if t == 0 and not torch.isfinite(loss):  # later divergence shows in the draws' signals (no sync per step)
                raise NonFiniteError(f"the loss at w* is {loss.item()} on the chain's first batch")
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():
                for (n, p), g in zip(params.items(), grads):
                    p.add_(_drift(g, p, anchor[n], config), alpha=-config.lr / 2)
                    p.add_(torch.randn(p.shape, generator=noise, device=device, dtype=p.dtype), alpha=scale)
            del loss, grads, batch
            done = t + 1 - config.burnin
            if done > 0 and done % config.every == 0:
                on_draw(done // config.every - 1)
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(anchor[n])
        for n, p in named.items():
            p.requires_grad_(was[n])


def _drift(grad: Tensor, w: Tensor, anchor: Tensor, config: SGLDConfig) -> Tensor:
    """nβ·∇L_B(w) + γ·(w − w*)."""
    return grad.mul(config.nbeta).add_(w - anchor, alpha=config.gamma)


def sgld_chains_vmapped(
    model: nn.Module,
    task: Task,
    data: Any,
    names: list[str],
    config: SGLDConfig,
    seeds: list[int],
    draws: int,
    on_draw: Callable[[int, dict[str, Tensor]], None],
    progress: bool = False,
) -> None:
    """Run one chain per seed on the parameters ``names`` of ``model`` (in-memory data), all at once; calls
    ``on_draw(d, stacked)`` with every chain's parameters ``{name: [chains, ...]}`` at draw d. The model itself
    is not changed. Chain j's batches and noise are those ``sgld_chain`` draws with ``seeds[j]``."""
    data = as_data(data)
    named = dict(model.named_parameters())
    anchor = {n: named[n].detach() for n in names}
    consts = frozen_tensors(model, names)
    device = next(iter(anchor.values())).device
    C, steps = len(seeds), config.num_steps(draws)
    batch_size = min(config.batch_size, len(data))
    sched = torch.stack(
        [batch_schedule(Member(torch.arange(len(data)), s), steps, batch_size) for s in seeds], dim=1
    )  # [T, C, B]
    noise = [torch.Generator(device=device).manual_seed(derive_seed(s, NOISE_STREAM)) for s in seeds]
    stacked = {n: a.unsqueeze(0).repeat(C, *([1] * a.dim())) for n, a in anchor.items()}

    def chain_loss(params: dict[str, Tensor], batch: Any) -> Tensor:
        out = task.outputs(FunctionalModel(model, {**consts, **params}), batch)
        return task.loss(out, batch).mean()

    chain_grad = torch.func.vmap(torch.func.grad(chain_loss))
    scale = math.sqrt(config.lr)
    with vmap_safe_attention(model):
        for t in tqdm(range(steps), desc="SGLD chains", disable=not progress, leave=False):
            batch = to_device(data.slice(sched[t]), device)
            grads = chain_grad(stacked, batch)
            with torch.no_grad():
                for n, w in stacked.items():
                    w.add_(_drift(grads[n], w, anchor[n], config), alpha=-config.lr / 2)
                    # chain by chain, so that each chain's noise is the stream sgld_chain draws for it
                    shape = w.shape[1:]
                    draw = torch.stack([torch.randn(shape, generator=g, device=device, dtype=w.dtype) for g in noise])
                    w.add_(draw, alpha=scale)
            done = t + 1 - config.burnin
            if done > 0 and done % config.every == 0:
                on_draw(done // config.every - 1, stacked)
