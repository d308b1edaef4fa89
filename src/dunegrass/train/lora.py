"""LoRA adapters through peft (an optional extra: ``pip install dunegrass[hf]``), imported lazily.

Each ensemble member gets fresh adapters drawn from its own seed; B starts at zero (peft's
default), so every member starts exactly at the base model θ₀. Only adapter tensors are trained,
saved and swapped between members.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..errors import DunegrassError
from ..seeding import derive_seed, seeded_generators
from .frozen_prefix import block_index, block_list

MLP_CONTAINERS = ("mlp", "feed_forward", "ffn")


@dataclass
class LoraConfig:
    """Rank-``rank`` adapters with scale ``alpha / rank`` on ``target_modules`` (default: the MLP
    projections, i.e. the linear layers inside modules named mlp / feed_forward / ffn).

    ``last_layers=m`` keeps only the targets in the model's last m transformer blocks: Daunce's members
    then share θ₀'s computation below them, which is computed once per example (``FrozenPrefix``), so a
    member costs about m / (number of blocks) of a full forward and backward pass plus the output layer.
    """

    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Sequence[str] | None = None
    last_layers: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        m = self.last_layers
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise DunegrassError(f"last_layers must be a positive integer (blocks from the top) or None, got {m!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = None if self.target_modules is None else list(self.target_modules)
        return d


def _peft():
    try:
        import peft
    except ImportError as e:
        raise DunegrassError("LoRA needs the optional dependency peft: pip install 'dunegrass[hf]'") from e
    return peft


def mlp_projections(model: nn.Module) -> list[str]:
    """Full names of the linear layers (nn.Linear or HF Conv1D) inside the model's MLP blocks."""
    names = []
    for name, mod in model.named_modules():
        parts = name.split(".")
        linear = isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"
        if linear and any(p in MLP_CONTAINERS for p in parts[:-1]):
            names.append(name)
    if not names:
        raise DunegrassError(
            "found no MLP projections (linear layers inside modules named mlp/feed_forward/ffn); "
            "pass LoraConfig(target_modules=[...]) with the names of the layers to adapt"
        )
    return names


def in_last_blocks(model: nn.Module, targets: list[str], m: int) -> list[str]:
    """The ``targets`` that lie in the model's last ``m`` transformer blocks."""
    found = block_list(model)
    if found is None:
        raise DunegrassError(
            "LoraConfig(last_layers=...) needs a stack of transformer blocks (an nn.ModuleList of ≥ 2 blocks); "
            "this model has none: leave last_layers unset"
        )
    prefix, blocks = found
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= len(blocks):
        raise DunegrassError(f"last_layers must be an integer in [1, {len(blocks)}] (the model's blocks), got {m!r}")
    names = [n for n, _ in _targeted(model, targets)]
    kept = [n for n in names if (i := block_index(n, prefix)) is not None and i >= len(blocks) - m]
    if not kept:
        raise DunegrassError(f"none of the LoRA target modules lies in the last {m} block(s) of {prefix}")
    return kept


def _targeted(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """The modules the targets name: by full name or by last components (as peft matches them)."""
    return [(n, m) for n, m in model.named_modules() if n and any(n == t or n.endswith("." + t) for t in targets)]


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    """Each target names a module by its full name or its last components (as peft matches them); a name
    that matches none is refused here, naming the layers there are (peft's own error is a traceback)."""
    missing = [t for t in targets if not _targeted(model, [t])]
    if missing:
        linear = (m for m in model.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
        ids = {id(m) for m in linear}
        short = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if id(m) in ids})
        raise DunegrassError(
            f"LoRA target_modules {missing} match no module of {type(model).__name__}; its linear layers are "
            f"named {', '.join(short[:12]) or '(none)'}{', ...' if len(short) > 12 else ''} (a target is a full "
            "module name or its last part)"
        )


def add_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """A copy-free peft wrapper of ``model`` with one adapter; undo with ``remove_lora``. A model that already
    carries adapters is refused before anything is changed: unloading ours would strip the user's too."""
    if getattr(model, "peft_config", None) or any(hasattr(m, "lora_A") for m in model.modules()):
        raise DunegrassError(
            "the model already carries LoRA adapters (a peft model); lora= would add its own and unload them "
            "afterwards, which strips yours. Attribute over your adapters without lora= (they are the trainable "
            "parameters), or merge them into the weights first (model.merge_and_unload())"
        )
    peft = _peft()
    targets = list(config.target_modules) if config.target_modules is not None else mlp_projections(model)
    _check_targets(model, targets)
    if config.last_layers is not None:
        targets = in_last_blocks(model, targets, config.last_layers)
    # HF Conv1D (GPT-2) stores its weight transposed; peft must be told.
    fan_in_fan_out = any(type(m).__name__ == "Conv1D" for _, m in _targeted(model, targets))
    cfg = peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        **config.extra,
    )
    with warnings.catch_warnings():  # peft reads transformers' deprecated flag name; not the user's to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return peft.get_peft_model(model, cfg)


def remove_lora(peft_model: nn.Module, requires_grad: Mapping[str, bool]) -> nn.Module:
    """The base model without adapters, with each parameter's ``requires_grad`` as it was."""
    base = peft_model.unload()
    for n, p in base.named_parameters():
        p.requires_grad_(requires_grad.get(n, p.requires_grad))
    return base


def lora_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if "lora_" in n]


def reset_lora(model: nn.Module, seed: int) -> None:
    """Fresh adapters for one member: A from peft's initialiser under ``seed``, B = 0 (θ = θ₀)."""
    # Seeded through the global generators (peft's initialiser draws from them) on a forked state, so the
    # caller's random streams — the CPU's and those of the model's accelerators — are left as they were.
    with seeded_generators(derive_seed(seed, 0x6C6F7261), {p.device for p in model.parameters()}):
        for mod in model.modules():
            if hasattr(mod, "reset_lora_parameters") and hasattr(mod, "lora_A"):
                for adapter in list(mod.lora_A.keys()):
                    mod.reset_lora_parameters(adapter, True)


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def load_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy ``state`` into the matching parameters of ``model`` (in place)."""
    named = dict(model.named_parameters())
    missing = [n for n in state if n not in named]
    if missing:
        raise DunegrassError(f"the saved member does not match the model: unknown parameters {missing[:5]}")
    with torch.no_grad():
        for n, v in state.items():
            named[n].copy_(v)


def clone_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: copy.deepcopy(v.detach()) for k, v in state.items()}
