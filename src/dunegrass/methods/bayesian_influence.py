"""The Bayesian influence function (Kreer et al. 2025; algorithms.md §3.2): covariance over a local posterior.

SGLD chains start at θ₀ and sample p(w) ∝ exp(−nβ·L(w) − (γ/2)‖w − θ₀‖²) (``train.sgld``); every draw
is evaluated on the training set and the queries, one signal row per draw, into the same signal store
as Daunce's members (draw d of chain c is model c·draws + d). Scores are the covariance across all
draws, S = B_cᵀ A_c / (K − 1) with K = chains × draws: **positive = proponent** (the paper's BIF is
−Cov in its loss-change sign; here, as for Daunce, a training example whose loss goes down with the
query's is a proponent). Draws within a chain are correlated, so standard errors are batch means over
the chains (over ten runs of draws with one chain) — an estimate from that many blocks, so a 95 % interval takes
the t quantile with blocks − 1 degrees of freedom (3.18 for 4 chains, 2.26 for 10), not 1.96.

Each draw costs one SGLD step and one evaluation pass, instead of a member's fine-tune. Under a Laplace
approximation the scores are g_zᵀ(nβH + γI)⁻¹g_i: damped influence with λ = γ/nβ, scaled by 1/nβ
(tested on a convex model). Chains replay exactly, so queries unknown at fit time are scored by running
the chains again (evaluating the queries only), and no draw's weights are ever kept. Memory: each draw's
signals go to the store as they are drawn, so beyond the model it is one draw's rows, (n_train + n_query)
numbers per chain sampled at once.
Under ``torchrun`` rank r runs the chains c with c % world_size == r into the shared ``cache_dir``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import distributed
from ..data import TensorData, as_data, iterate_batches, to_device
from ..errors import DunegrassError, NonFiniteError
from ..fingerprint import data_fingerprint, model_fingerprint
from ..options import BayesianInfluenceOptions, build
from ..seeding import derive_seed
from ..store.signals import SignalStore
from ..task import Task
from ..train.config import TrainConfig
from ..train.ensemble import Member, ensemble_outputs
from ..train.sgld import SGLDConfig, sgld_chain, sgld_chains_vmapped
from .base import Attributor, eval_mode
from .covariance_scoring import CovarianceScoring
from .daunce import AUTO_ENSEMBLE_MAX_PARAMS
from .daunce_backends import FinetuneBackend
from .daunce_objectives import check_theta0, signal_fn

# Settings that change no draw: left out of the cache's key (so it grows with chains).
RESULT_NEUTRAL = ("chains", "max_chains", "eval_batch_size", "prefix_cache_mib", "normalize")
CHAIN_STREAM = 0x63686169
SINGLE_CHAIN_BLOCKS = 10  # batch means over this many runs of draws when there is one chain


class BayesianInfluence(CovarianceScoring, Attributor):
    """The Bayesian influence function; settings in ``BayesianInfluenceOptions`` (``options=``, or any of its
    fields as a keyword: ``chains``, ``draws``, ``nbeta``, ``gamma``, ``lr``, ``batch_size``, ``burnin``,
    ``every``, ``train_signal``, ``query_signal``, ``lora``, ``eval_batch_size``, ``seed``)."""

    method_name = "bif"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        *,
        options: BayesianInfluenceOptions | None = None,
        progress: bool | None = None,
        **overrides: Any,
    ):
        super().__init__(model, task, progress)
        self.options = build(BayesianInfluenceOptions, options, overrides, "BayesianInfluence")
        o = self.options
        self.sampler = SGLDConfig(o.nbeta, o.gamma, o.lr, o.batch_size, o.burnin, o.every)
        self.signal_fns = {side: signal_fn(task, getattr(o, f"{side}_signal")) for side in ("train", "query")}
        self.store: SignalStore | None = None

    @property
    def num_models(self) -> int:
        return self.options.chains * self.options.draws

    @property
    def _stderr_blocks(self) -> int:
        """Chains; with one chain, runs of its draws: the most (≤ 10) that split it evenly, else 10 near-equal."""
        o = self.options
        if o.chains > 1:
            return o.chains
        even = [b for b in range(2, SINGLE_CHAIN_BLOCKS + 1) if o.draws % b == 0]
        return max(even) if even else min(SINGLE_CHAIN_BLOCKS, o.draws)

    def describe(self) -> dict:
        return {"method": self.method_name, **self.options.to_dict()}

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def _score_device(self) -> torch.device:
        return self._device if self._device.type != "mps" else torch.device("cpu")  # MPS has no float64

    def _eval_batch(self) -> int:
        return self.options.eval_batch_size or 256

    # ---- fit
    def fit(self, train: Any, *, queries: Any = None, cache_dir: str | os.PathLike | None = None) -> BayesianInfluence:
        """Run the chains (or the missing ones, resuming from ``cache_dir``), storing every draw's signals on
        ``train`` and ``queries``. A cache made with fewer chains grows: only the new chains run."""
        data = as_data(train)
        cache = self._cache_dir(cache_dir)
        distributed.require_shared_cache(cache)
        config = {
            **{k: v for k, v in self.describe().items() if k not in RESULT_NEUTRAL},
            "task": self.task.config(),
            "data": data_fingerprint(data),
            "weights": model_fingerprint(self.model),
            "trainable": sorted(n for n, p in self.model.named_parameters() if p.requires_grad),
            # the chains' noise comes from a generator on the model's device: another device, other draws
            "device": self._device.type,
        }
        self.store = SignalStore(cache, config, self.num_models, len(data), self.options.draws)
        self.train_data, self.n_train = data, len(data)
        query_store = None if queries is None else self._query_store(queries)
        todo = self._chains_missing(self.store.train)
        if todo:
            with eval_mode(self.model):
                check_theta0(self.model, self.task, data, self._eval_batch(), self._device)
            sides = {"train": data} if query_store is None else {"train": data, "query": as_data(queries)}
            self._run(todo, sides, {"query": query_store})
        if query_store is not None:  # chains whose training rows were stored earlier: the queries alone
            late = self._chains_missing(query_store)
            if late:
                self._run(late, {"query": as_data(queries)}, {"query": query_store})
        distributed.barrier()  # every rank's chains are stored before any rank reads them
        return self

    def _chains_missing(self, feature_store) -> list[int]:
        """This rank's chains with a draw missing in ``feature_store``."""
        chains = sorted({k // self.options.draws for k in feature_store.missing()})
        return distributed.my_shards(chains)

    def _query_store(self, queries: Any):
        q = as_data(queries)
        store = self.store.query_store(data_fingerprint(q), len(q))
        if store.missing():
            with eval_mode(self.model):
                check_theta0(
                    self.model, self.task, q, self._eval_batch(), self._device, self.signal_fns["query"], "query"
                )
        return store

    def _vmapped(self, sides: dict[str, Any]) -> bool:
        """Whether chains run together under vmap: no LoRA, in-memory data, a small model, max_chains > 1."""
        o = self.options
        if o.lora is not None or o.max_chains < 2:
            return False
        if not all(isinstance(as_data(d), TensorData) for d in (self.train_data, *sides.values())):
            return False
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad) <= AUTO_ENSEMBLE_MAX_PARAMS

    def _run(self, chains: list[int], sides: dict[str, Any], stores: dict[str, Any]) -> None:
        """Run ``chains`` and write each one's draws' signals on ``sides`` (``"train"`` into the store's training
        rows, ``"query"`` into ``stores["query"]``); the model is left exactly as it was."""
        o = self.options
        if "train" not in sides and model_fingerprint(self.model) != self.store.config["weights"]:
            raise DunegrassError(
                "the model's weights changed since fit, so replaying its SGLD chains for these queries would give "
                "other draws than the stored ones; score with the model as it was fitted, or fit again"
            )
        vmapped = self._vmapped(sides)
        groups = [chains[i : i + o.max_chains] for i in range(0, len(chains), o.max_chains)] if vmapped else [
            [c] for c in chains
        ]  # fmt: skip
        with eval_mode(self.model):
            backend = None
            if not vmapped:
                backend = FinetuneBackend(
                    self.model, self.task, TrainConfig(), None, False, o.lora, None, 0, False, o.prefix_cache_mib << 20
                )
            try:
                for group in tqdm(groups, desc="bif: chains", disable=not self.progress, unit="group"):
                    self._group(backend, group, sides, stores)
            finally:
                if backend is not None:
                    backend.close()

    def _write_draw(self, chains: list[int], draw: int, rows: dict[str, Tensor], stores: dict[str, Any]) -> None:
        """Store draw ``draw`` of each of ``chains`` from ``rows {side: [len(chains), n_side]}`` (on the model's
        device): one transfer per draw and side, then each draw's query row before its training row, which
        marks it done. A non-finite signal means the chain diverged."""
        o = self.options
        host = {side: v.to(torch.float64).cpu() for side, v in rows.items()}
        for v in host.values():
            bad = (~torch.isfinite(v).all(dim=1)).nonzero()
            if len(bad):
                raise NonFiniteError(
                    f"chain {chains[int(bad[0, 0])]} has NaN/inf signals at draw {draw}: the SGLD chain diverged; "
                    f"lower lr (now {o.lr}) or nbeta (now {o.nbeta}), or raise gamma (now {o.gamma})"
                )
        for j, c in enumerate(chains):
            k = c * o.draws + draw
            if "query" in host:
                stores["query"].write(k, {"signal": host["query"][j : j + 1].numpy()})
            if "train" in host:
                self.store.train.write(k, {"signal": host["train"][j : j + 1].numpy()})

    def _group(self, backend: FinetuneBackend | None, chains: list[int], sides: dict[str, Any], stores) -> None:
        """Run ``chains`` — vmapped together (``backend`` None) or one chain in the model itself — storing every
        draw's signals on ``sides`` as it is drawn (memory: one draw's rows, never a chain's)."""
        o = self.options
        device = self._device
        seeds = [derive_seed(o.seed, CHAIN_STREAM, c) for c in chains]
        if backend is None:
            names = [n for n, p in self.model.named_parameters() if p.requires_grad]
            if not names:
                raise DunegrassError("the model has no trainable parameters (requires_grad) to sample")

            def evaluate_all(draw: int, stacked: dict[str, Tensor]) -> None:
                batch = self._eval_batch()
                rows = {
                    side: ensemble_outputs(self.model, self.task, stacked, data, self.signal_fns[side], batch)
                    for side, data in sides.items()
                }
                self._write_draw(chains, draw, rows, stores)

            sgld_chains_vmapped(
                self.model, self.task, self.train_data, names, self.sampler, seeds, o.draws, evaluate_all, self.progress
            )
            return
        backend.reset(Member(torch.arange(0), o.seed))  # every chain starts at the same θ₀ (same adapters)
        net = backend.net
        params = {n: p for n, p in net.named_parameters() if p.requires_grad}
        if not params:
            raise DunegrassError("the model has no trainable parameters (requires_grad) to sample")

        @torch.no_grad()
        def evaluate(draw: int) -> None:
            rows = {}
            for side, data in sides.items():
                fn = self.signal_fns[side]
                parts = [
                    fn(self.task.outputs(net, b), b).detach()
                    for b in (to_device(batch, device) for _, batch in iterate_batches(data, self._eval_batch()))
                ]
                rows[side] = torch.cat(parts)[None]
            self._write_draw(chains, draw, rows, stores)

        train = self.train_data
        sgld_chain(net, self.task, train, params, self.sampler, seeds[0], o.draws, evaluate, self.progress)

    # ---- score (score, self_scores, signals: CovarianceScoring)
    def _query_signals(self, queries: Any) -> Tensor:
        """``B [K, n_query]`` float64: from the store, or by replaying the chains (then stored)."""
        query_store = self._query_store(queries)
        todo = self._chains_missing(query_store)
        if todo:
            self._run(todo, {"query": as_data(queries)}, {"query": query_store})
        distributed.barrier()  # the other ranks' chains
        return torch.from_numpy(query_store.load("signal"))

    def _meta(self) -> dict:
        return self.describe()
