"""Typed options of the attributors, with named presets.

Every attributor takes its options as one dataclass (``options=``) or field by field as keywords, which
override the dataclass (or the default preset): ``dg.Daunce(model, task, num_models=64)`` and
``dg.Daunce(model, task, options=dg.DaunceOptions.preset("llm"), num_models=64)`` both work. Each field
is checked once, here, with an error that names it. The command line reads the same dataclasses.

- ``InfluenceOptions``: the gradient engine (GradientInfluence, GraSS, FactGraSS, LoGra, TRAK, TracIn,
  ExactInfluence). Presets: ``default``, ``low_memory`` (small batches, float16 features), ``fast``
  (large batches, for a GPU or a machine with memory to spare).
- ``DaunceOptions``: Daunce. Presets: ``default`` (small models: vmapped members), ``llm`` (the authors'
  LLM recipe: LoRA adapters on the MLP projections, AdamW, one epoch), ``low_memory`` (fewer members
  vmapped at once, smaller evaluation batches).
- ``BayesianInfluenceOptions``: BayesianInfluence (SGLD chains; devinterp's defaults).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, TypeVar

import torch

from .errors import DunegrassError
from .influence.preconditioner import check_damping
from .train.config import TrainConfig
from .train.lora import LoraConfig

T = TypeVar("T")


def positive_int(value: Any, name: str) -> int:
    """``value`` as a positive int, or a DunegrassError (a float, a bool or a string is a mistake, not a size)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DunegrassError(f"{name} must be a positive integer, got {value!r}")
    return value


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _boolean(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise DunegrassError(f"{name} must be True or False, got {value!r}")


def _check_covariance_options(o: Any) -> None:
    """The fields Daunce and BayesianInfluence share: signals, evaluation batch, prefix cache, LoRA (True: the
    default adapters), normalize."""
    for name in ("train_signal", "query_signal"):
        choice(getattr(o, name), ("loss", "measurement", "margin"), name)
    if o.eval_batch_size is not None:
        positive_int(o.eval_batch_size, "eval_batch_size")
    if not (type(o.prefix_cache_mib) is int and o.prefix_cache_mib == 0):  # 0: off
        positive_int(o.prefix_cache_mib, "prefix_cache_mib")
    if o.lora is True:
        o.lora = LoraConfig()
    elif o.lora is False:
        o.lora = None
    _boolean(o.normalize, "normalize")


def choice(value: Any, allowed: tuple, name: str) -> Any:
    if value not in allowed:
        raise DunegrassError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


@dataclass
class InfluenceOptions:
    """Settings of the gradient engine.

    damping: relative damping of the block Fisher (λ = damping · tr(F)/k); ``"auto"`` for one relative damping
        Σ k / Σ min(n, k) over the blocks (one block: the mean of its nonzero eigenvalues,
        ``influence.auto_damping``); None for plain dot products.
    train_signal / query_signal: what is differentiated on each side: ``"loss"`` (the training loss) or
        ``"measurement"`` (the task's measurement in loss-like form).
    batch_size: examples per featurisation pass; chunk_size: per-example gradients materialised at once
        by the materialised methods (memory: chunk_size × number of parameters).
    shard_size: training examples per stored shard (at most; a shard is also capped at 256 MiB).
    store_dtype: the stored features' dtype (``"float32"``, ``"float16"``).
    fisher_dtype: ``"float32"`` or ``"float64"`` for the Fisher's accumulation and solves (each block is
        factorised in float64 either way).
    seed: seeds every projection (checkpoint m and block i get seeds derived from it).
    """

    damping: float | str | None = 0.1
    train_signal: str = "loss"
    query_signal: str = "measurement"
    batch_size: int = 64
    chunk_size: int = 32
    shard_size: int = 1024
    store_dtype: str = "float32"
    fisher_dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        check_damping(self.damping)
        if self.damping not in (None, "auto"):
            self.damping = float(self.damping)  # a NumPy scalar too, kept as a float for the cache's JSON
        for name in ("train_signal", "query_signal"):
            choice(getattr(self, name), ("loss", "measurement"), name)
        for name in ("batch_size", "chunk_size", "shard_size"):
            positive_int(getattr(self, name), name)
        for name in ("store_dtype", "fisher_dtype"):  # a torch dtype is accepted too, and kept as its name
            value = getattr(self, name)
            if isinstance(value, torch.dtype):
                setattr(self, name, str(value).removeprefix("torch."))
        choice(self.store_dtype, ("float32", "float16", "float64"), "store_dtype")
        choice(self.fisher_dtype, ("float32", "float64"), "fisher_dtype")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise DunegrassError(f"seed must be an integer, got {self.seed!r}")

    @classmethod
    def preset(cls, name: str = "default") -> InfluenceOptions:
        presets = {
            "default": cls(),
            "low_memory": cls(batch_size=8, chunk_size=4, shard_size=256, store_dtype="float16"),
            "fast": cls(batch_size=256, chunk_size=128),
        }
        return presets[choice(name, tuple(presets), "preset")]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DaunceOptions:
    """Settings of Daunce (algorithms.md §3).

    num_models: K ≥ 2 members; the Monte-Carlo noise of every score shrinks as 1/√K.
    variant: ``"if"`` (default), ``"efim"`` or ``"blackbox"`` (plain fine-tuning on D_k).
    subsample_ratio: r in (0, 1], |D_k| = round(r · n).
    rho, gamma: the perturbation scale ρ and loss weight γ of the objectives.
    train_signal / query_signal: the per-example signal on each side, loss-like: ``"loss"``,
        ``"measurement"`` (``task.query_loss``) or ``"margin"`` (classification: minus the margin).
    train: the members' fine-tuning recipe (None: Adam lr 1e-3, 50 steps, batch 64, cosine decay; with
        LoRA, AdamW lr 3e-4, one epoch, batch 16, cosine with 3 % warm-up).
    trainer: ``"auto"`` (vmapped ensemble for in-memory data and small models, else member by member),
        ``"ensemble"``, ``"finetune"`` or ``"newton"`` (exact minimisation; convex models, with ``l2``).
    lora: adapters to train instead of the whole model (member by member), or None.
    l2: the L2 coefficient for ``trainer="newton"``.
    max_members: members trained together by the vmapped back ends (memory); part of the cache layout.
    keep_members: write each member's trained tensors to disk to score new queries without retraining.
    checkpoint_every: member by member with a ``cache_dir``, checkpoint a member every so many steps.
    eval_batch_size: examples per forward pass when members are evaluated (None: 512 for the vmapped
        back ends, the training batch size member by member).
    prefix_cache_mib: with LoRA on the last blocks only (``LoraConfig(last_layers=m)``), θ₀'s hidden states
        below them are kept per example, up to this many MiB on the model's device (0: recompute them).
    normalize: score with correlations instead of covariances across the members (the paper's choice
        beside normalised-gradient baselines); a scoring setting only, so one fit serves both.
    seed: seeds the subsets, the perturbations and the batch orders (member k is the same for any K).
    """

    num_models: int = 32
    variant: str = "if"
    subsample_ratio: float = 0.3
    rho: float = 1.0
    gamma: float = 1.0
    train_signal: str = "loss"
    query_signal: str = "loss"
    train: TrainConfig | None = None
    trainer: str = "auto"
    lora: LoraConfig | bool | None = None
    l2: float = 0.0
    max_members: int = 128
    keep_members: bool = True
    checkpoint_every: int = 0
    eval_batch_size: int | None = None
    prefix_cache_mib: int = 1024
    normalize: bool = False
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.num_models, bool) or not isinstance(self.num_models, int) or self.num_models < 2:
            raise DunegrassError(
                f"num_models must be an integer K ≥ 2 (a covariance needs two models), got {self.num_models!r}"
            )
        choice(self.variant, ("if", "efim", "blackbox"), "variant")
        if not _real(self.subsample_ratio) or not 0 < self.subsample_ratio <= 1:
            raise DunegrassError(f"subsample_ratio must be a number in (0, 1], got {self.subsample_ratio!r}")
        choice(self.trainer, ("auto", "ensemble", "finetune", "newton"), "trainer")
        if not all(map(_real, (self.rho, self.gamma, self.l2))) or not (self.rho > 0 and self.gamma > 0) or self.l2 < 0:
            raise DunegrassError("rho and gamma must be positive and l2 non-negative")
        positive_int(self.max_members, "max_members")
        _check_covariance_options(self)
        if self.lora is not None and self.trainer in ("ensemble", "newton"):
            raise DunegrassError(f"LoRA trains member by member; use trainer='finetune' (not {self.trainer!r})")

    @property
    def recipe(self) -> TrainConfig:
        """The members' fine-tuning recipe: ``train``, or the default for full or LoRA fine-tuning."""
        if self.train is not None:
            return self.train
        return LORA_RECIPE if self.lora is not None else DEFAULT_RECIPE

    @classmethod
    def preset(cls, name: str = "default") -> DaunceOptions:
        presets = {
            "default": cls(),
            "llm": cls(lora=LoraConfig(), trainer="finetune"),
            "low_memory": cls(max_members=16, eval_batch_size=64),
        }
        return presets[choice(name, tuple(presets), "preset")]

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["train"] = self.recipe.to_dict()
        out["lora"] = None if self.lora is None else self.lora.to_dict()
        return out


# Short Adam runs with cosine decay (algorithms.md §3); lr 1e-3 and 50 steps won the lr × steps sweep
# on the digits MLP (benchmarks/daunce_lds.py): the estimator wants many cheap members.
DEFAULT_RECIPE = TrainConfig(optimizer="adam", lr=1e-3, steps=50, epochs=None, batch_size=64, schedule="cosine")
# The authors' LLM recipe: LoRA on the MLP projections, AdamW, cosine with 3 % warm-up, one epoch.
LORA_RECIPE = TrainConfig(optimizer="adamw", lr=3e-4, epochs=1.0, batch_size=16, schedule="cosine", warmup=0.03)


@dataclass
class BayesianInfluenceOptions:
    """Settings of the Bayesian influence function (algorithms.md §3.2); the defaults are devinterp's
    (``estimate_bif``: Kreer et al.'s vision settings).

    chains, draws: SGLD chains started at θ₀ and draws kept from each; the scores are covariances over
        chains × draws models, their standard errors batch means over the chains.
    nbeta, gamma, lr: nβ (inverse temperature × n), γ (localisation towards θ₀) and η (step size) of
        w ← w − (η/2)(nβ∇L_B(w) + γ(w − θ₀)) + N(0, η). Under a Laplace approximation the scores are damped
        influence g_zᵀ(nβH + γI)⁻¹g_i: λ = γ/nβ.
    batch_size: examples per SGLD step (L_B's mini-batch); burnin: steps before the first draw; every: steps
        between draws.
    train_signal / query_signal: ``"loss"``, ``"measurement"`` or ``"margin"``, as for Daunce.
    lora: sample LoRA adapters (started as fresh adapters with B = 0, i.e. at θ₀) instead of the whole model.
    max_chains: chains sampled together under vmap, for in-memory data and models of at most 2 M trainable
        parameters without LoRA (memory: that many copies of the parameters; 1: one chain at a time in the
        model itself). The draws are the same either way, to rounding.
    eval_batch_size: examples per forward pass when a draw is evaluated (None: 256).
    prefix_cache_mib: with LoRA on the last blocks only, θ₀'s hidden states below them kept per example
        (as for Daunce).
    normalize: correlations instead of covariances across the draws (as for Daunce).
    seed: seeds every chain's batches and noise (chain c is the same for any number of chains).
    """

    chains: int = 10
    draws: int = 100
    nbeta: float = 10.0
    gamma: float = 1000.0
    lr: float = 1e-4
    batch_size: int = 32
    burnin: int = 0
    every: int = 1
    train_signal: str = "loss"
    query_signal: str = "loss"
    lora: LoraConfig | bool | None = None
    max_chains: int = 16
    eval_batch_size: int | None = None
    prefix_cache_mib: int = 1024
    normalize: bool = False
    seed: int = 0

    def __post_init__(self):
        for name in ("chains", "draws", "batch_size", "every", "max_chains"):
            positive_int(getattr(self, name), name)
        if isinstance(self.burnin, bool) or not isinstance(self.burnin, int) or self.burnin < 0:
            raise DunegrassError(f"burnin must be a non-negative integer, got {self.burnin!r}")
        if self.chains * self.draws < 2:
            raise DunegrassError("a covariance needs at least two draws: raise chains or draws")
        finite = all(map(_real, (self.nbeta, self.gamma, self.lr))) and all(
            map(math.isfinite, (self.nbeta, self.gamma, self.lr))
        )
        if not finite or not (self.nbeta > 0 and self.lr > 0):
            raise DunegrassError(
                f"nbeta and lr must be positive finite numbers and gamma non-negative, got nbeta={self.nbeta!r}, "
                f"lr={self.lr!r}, gamma={self.gamma!r}"
            )
        if self.gamma < 0:
            raise DunegrassError(f"gamma must be non-negative (0: no localisation), got {self.gamma!r}")
        _check_covariance_options(self)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["lora"] = None if self.lora is None else self.lora.to_dict()
        return out


def deprecated(old: str, new: str, owner: str) -> None:
    """Say once per call that an argument of an earlier release still works but will not for long."""
    warnings.warn(
        f"{owner}: {old} is deprecated and will be removed in the next release; use {new}", FutureWarning, stacklevel=4
    )


def build(cls: type[T], options: T | None, overrides: dict[str, Any], owner: str) -> T:
    """``options`` (default: the default preset) with ``overrides`` applied field by field; an unknown
    keyword is an error that lists the fields."""
    if options is None:
        options = cls()
    elif not isinstance(options, cls):
        raise DunegrassError(f"{owner}: options must be a {cls.__name__}, got {type(options).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise DunegrassError(
            f"{owner} got unexpected keyword(s) {', '.join(unknown)}; its options are: {', '.join(sorted(names))}"
        )
    return replace(options, **overrides) if overrides else options


__all__ = ["DaunceOptions", "InfluenceOptions", "build", "choice", "deprecated", "positive_int"]
