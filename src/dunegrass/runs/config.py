"""What ``dunegrass fit`` and ``dunegrass score`` read: one typed dataclass per command, which is also its
``--help``, read from a YAML or TOML file (``--config``) and overridden field by field with flags
(``--method grass``, ``--influence.batch_size 8``, ``--method_options.k 1024``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import DunegrassError
from ..options import BayesianInfluenceOptions, DaunceOptions, InfluenceOptions

METHODS = ("grass", "factgrass", "logra", "trak", "tracin", "gradient", "exact", "daunce", "daunce-api", "bif")
TASKS = ("auto", "causal_lm", "classification")


@dataclass
class MethodOptions:
    """The attributor's own settings (the ones not in InfluenceOptions or DaunceOptions); each method reads
    those that apply to it and ignores the others.

    Args:
        k: features per example (GraSS, TRAK) or per layer (FactGraSS); None: the method's default.
        mask: ``random`` or ``selective`` (GraSS, FactGraSS).
        mask_size: coordinates kept by the mask (GraSS), or of each factor (FactGraSS); None: the default.
        k_in: LoGra's input-factor size.
        k_out: LoGra's output-factor size.
        modules: layers to use (LoGra, FactGraSS): names or fnmatch patterns; empty: every trainable layer.
        params: parameters to differentiate (the materialised methods); empty: every trainable one.
        compressor: the spec of GradientInfluence and TracIn, e.g. ``sjlt:4096`` or ``identity``.
        hessian: ``gauss_newton`` or ``exact`` (ExactInfluence).
        hessian_damping: ExactInfluence's relative damping of the Hessian.
        l2: the L2 coefficient the model was trained with (ExactInfluence).
    """

    k: int | None = None
    mask: str = "random"
    mask_size: int | None = None
    k_in: int = 64
    k_out: int = 64
    modules: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    compressor: str = "sjlt:4096"
    hessian: str = "gauss_newton"
    hessian_damping: float = 0.1
    l2: float = 0.0


@dataclass
class ApiOptions:
    """Daunce through a fine-tuning service (``method: daunce-api``). ``model`` is then the service's base
    model (e.g. ``gpt-4.1-mini-2025-04-14``) and the data are ``{"prompt", "completion"}`` rows (``"system"``
    optional), uploaded as they are; the members are the service's fine-tunes (``daunce.num_models``,
    ``daunce.subsample_ratio`` and ``daunce.seed`` apply).

    Args:
        protocol: how losses are read: ``chat`` (chat models; short answers, from ``top_logprobs``) or
            ``echo`` (completion models and servers that echo prompt log-probabilities: vLLM, llama.cpp).
        base_url: the API's root, e.g. ``http://127.0.0.1:8080/v1``; None: OpenAI's.
        api_key_env: the environment variable holding the key (the key itself is never written).
        n_epochs: the fine-tuning jobs' epochs; None: the service's default.
        max_answer_tokens: (chat) the longest answer scored, in words (each at least one token; also the
            reply's ``max_tokens``).
        poll_seconds: how often a running fine-tuning job is checked.
    """

    protocol: str | None = None
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    n_epochs: int | None = None
    max_answer_tokens: int = 4
    poll_seconds: float = 10.0


@dataclass
class FitConfig:
    """Attribute a model's behaviour to its training data: featurise the training set (gradient methods) or
    train the ensemble (Daunce), into ``cache_dir/name``; resumable, and reused by ``dunegrass score``.

    Args:
        model: a local Hugging Face directory (``config.json`` and weights; a causal LM or a sequence
            classifier) or ``package.module:factory``, a function returning ``(model, task)`` or
            ``(model, task, tokenizer)``; with ``daunce-api``, the service's base model.
        data: the training set: JSON Lines (``{"prompt", "completion"}`` or ``{"text"}`` rows for a language
            model, ``{"inputs", "label"}`` for a classifier), a Hugging Face dataset saved to disk, or an
            ``.npz`` / ``.safetensors`` file of tensors.
        method: the attributor: grass, factgrass, logra, trak, tracin, gradient, exact, daunce, daunce-api
            (Daunce through a fine-tuning service; see ``api``) or bif (the Bayesian influence function).
        name: the run's name; its files go to ``cache_dir/name``.
        cache_dir: where runs are kept.
        weights: a weights file to load into the model (``.safetensors``, or a ``torch.save`` state dict).
        task: ``auto`` (from the model), ``causal_lm`` or ``classification``.
        device: where the model and the work run, e.g. ``cpu`` or ``cuda``.
        max_length: tokens kept per example (longer ones are cut, from the right).
        influence: settings of the gradient methods.
        daunce: settings of Daunce.
        bif: settings of the Bayesian influence function (SGLD chains).
        method_options: the method's own settings.
        api: the fine-tuning service of ``daunce-api``.
        yes: start what a paid service charges for (fine-tuning jobs, scoring requests) without asking;
            the plan is printed either way, and above a few jobs it is refused without ``--yes``.
    """

    model: str
    data: str
    method: str = "factgrass"
    name: str = "default"
    cache_dir: str = "runs"
    weights: str | None = None
    task: str = "auto"
    device: str = "cpu"
    max_length: int = 512
    influence: InfluenceOptions = field(default_factory=InfluenceOptions)
    daunce: DaunceOptions = field(default_factory=DaunceOptions)
    bif: BayesianInfluenceOptions = field(default_factory=BayesianInfluenceOptions)
    method_options: MethodOptions = field(default_factory=MethodOptions)
    api: ApiOptions = field(default_factory=ApiOptions)
    yes: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise DunegrassError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.task not in TASKS:
            raise DunegrassError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["daunce"] = self.daunce.to_dict()
        out["bif"] = self.bif.to_dict()
        return out


@dataclass
class ScoreConfig(FitConfig):
    """Score queries against a fitted run (``dunegrass fit`` with the same config, or ``--run CACHE_DIR/NAME``
    for the settings that fit recorded there), and write the scores, each query's top proponents and
    opponents (CSV and JSON Lines, with the texts) and ``report.html``.

    Args:
        queries: the queries, in any format ``data`` accepts.
        top_k: proponents and opponents kept per query.
        dense: also write the whole score matrix (``scores.npz``); without it only each query's top_k
            (``top.npz``), whatever the size of the training set.
        out: where to write the results (default: the run's directory, ``cache_dir/name``).
    """

    queries: str = ""
    top_k: int = 10
    dense: bool = False
    out: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if not self.queries:
            raise DunegrassError("dunegrass score needs --queries PATH (the queries to attribute)")
