"""Member-by-member training: a plain loop for one model at a time (any nn.Module, incl. HF causal LMs).

The counterpart of the vmapped ensemble trainer for models too large to stack. It uses the same
batch stream (``batch_schedule``: the member's subset, reshuffled each epoch by its seed), the same
learning-rate schedule and the same optimiser arithmetic (``FunctionalOptimizer``), so on a small
model it trains the same member as ``EnsembleTrainer`` does (tested). It trains ``model`` in place;
the caller restores the starting weights. Optionally checkpointed every few steps (a safetensors
file of the parameters and optimiser state), so a long member resumes where it was killed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from ..data import TensorData, as_data, to_device
from ..errors import CorruptCacheError, DunegrassError
from ..gradients.per_sample import check_finite
from ..store.atomic import atomic_write_bytes
from ..task import Task
from .config import TrainConfig
from .ensemble import Member, Objective, batch_schedule
from .optim import FunctionalOptimizer


def gather(data: Any, idx: Tensor) -> Any:
    """The examples at ``idx`` as one batch (sliced for in-memory tensors, collated otherwise)."""
    data = as_data(data)
    if isinstance(data, TensorData):
        return data.slice(idx)
    collate = getattr(data, "collate_fn", None) or default_collate  # a dataset may say how to batch itself
    return collate([data[int(i)] for i in idx])


def finetune(
    model: nn.Module,
    task: Task,
    data: Any,
    member: Member,
    config: TrainConfig,
    objective: Objective | None = None,
    shared: Mapping[str, Tensor] | None = None,
    per_member: Mapping[str, Tensor] | None = None,
    params: Sequence[str] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    progress: bool = False,
) -> nn.Module:
    """Train ``model`` in place on ``member``'s batches with ``config``; returns the model.

    ``objective(outputs, batch, aux) -> scalar`` (default: mean training loss), with ``aux`` holding
    ``shared [n, ...]`` and ``per_member [n, ...]`` (this member's) tensors gathered at the batch
    (on the host or the model's device; only the batch's rows are moved).
    ``params``: names of the parameters to train (default: those with ``requires_grad``; LoRA
    adapters after ``add_lora``). ``checkpoint``: a file for the parameters and optimiser state,
    written atomically every ``checkpoint_every`` steps and removed at the end; training resumes
    from it if it exists.
    """
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if params is None else list(params)
    unknown = [n for n in names if n not in named]
    if unknown or not names:
        raise DunegrassError(
            f"finetune: nothing to train (unknown parameters {unknown[:5]})" if unknown else "no trainable parameters"
        )
    trained = {n: named[n] for n in names}
    frozen = {n: p.requires_grad for n, p in named.items()}
    for n, p in named.items():
        p.requires_grad_(n in trained)
    device = next(iter(trained.values())).device
    steps = config.num_steps(len(member.indices))
    sched = batch_schedule(member, steps, config.batch_size)
    opt = FunctionalOptimizer(trained, config)
    start = _resume(checkpoint, trained, opt)
    try:
        for t in tqdm(range(start, steps), desc="fine-tune", disable=not progress, leave=False):
            idx = sched[t]
            batch = to_device(gather(data, idx), device)
            aux = {k: v[idx].to(device) for k, v in {**(shared or {}), **(per_member or {})}.items()}
            out = task.outputs(model, batch)
            loss = task.loss(out, batch).mean() if objective is None else objective(out, batch, aux)
            check_finite(loss.detach(), f"training objective at step {t}")
            grads = torch.autograd.grad(loss, list(trained.values()))
            opt.step(trained, dict(zip(trained, grads)), config.lr_at(t, steps))
            # Dropped now, not when the next step's forward has finished: an LLM's logits and the loss's
            # temporaries of two steps at once doubled the peak (+1.7 GiB on SmolLM2 at batch 16).
            del out, loss, grads, batch, aux
            if checkpoint is not None and checkpoint_every and (t + 1) % checkpoint_every == 0 and t + 1 < steps:
                _save(checkpoint, trained, opt)
        for n, p in trained.items():
            check_finite(p.detach(), f"trained parameter {n!r}")
    finally:
        for n, p in named.items():
            p.requires_grad_(frozen[n])
    if checkpoint is not None and os.path.exists(checkpoint):
        os.unlink(checkpoint)
    return model


def _save(path, trained: Mapping[str, Tensor], opt: FunctionalOptimizer) -> None:
    tensors = {f"param:{n}": p.detach().cpu().contiguous() for n, p in trained.items()}
    tensors.update({f"opt:{k}": v.detach().cpu().contiguous() for k, v in opt.state_tensors().items()})
    atomic_write_bytes(path, safetensors.torch.save(tensors))


def _resume(path, trained: Mapping[str, Tensor], opt: FunctionalOptimizer) -> int:
    """Load a checkpoint if there is one; returns the step to start from."""
    if path is None or not os.path.exists(path):
        return 0
    try:
        tensors = safetensors.torch.load_file(os.fspath(path))
        with torch.no_grad():
            for n, p in trained.items():
                p.copy_(tensors[f"param:{n}"])
        state = {
            k[4:]: v.to(trained[k[4:].rsplit("/", 1)[0]].device)
            for k, v in tensors.items()
            if k[:4] == "opt:" and "/" in k
        }
        opt.load_state_tensors({"step": tensors["opt:step"], **state})
    except (KeyError, RuntimeError, OSError, safetensors.SafetensorError) as e:
        raise CorruptCacheError(f"the training checkpoint {path} is unreadable ({e}); delete it to restart") from e
    return opt.t
