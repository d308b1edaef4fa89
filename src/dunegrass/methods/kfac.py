"""K-FAC and EK-FAC influence (algorithms.md §1.4) on the factorised capture of LoGra and FactGraSS.

``fit`` makes one pass over the training set for the per-layer covariance factors A and S (with
targets drawn from the model for the true Fisher, ``fisher="true"``, or the training labels,
``fisher="empirical"``), eigendecomposes them, and for EK-FAC makes a second pass that fits the
eigenvalues on the per-example gradients rotated into that eigenbasis. Nothing per example is kept:
memory is the layers' factors. ``score`` preconditions the queries' per-layer gradients (kept for a
chunk of queries, optionally as rank-r factors, kronfluence's ``query_gradient_rank``) and streams the
training set through the capture once per chunk, scoring each layer as its factors arrive.

Under ``torchrun`` the passes over the training set are split across ranks and their sums reduced, the
queries are split across ranks, and every rank gets the single-process result. With a ``cache_dir`` the
factors (and the correction) are stored, checksummed, under a key of the model's weights and structure,
the data, the task and the settings, and reused by later fits.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import distributed
from ..data import as_data, iterate_batches, to_device
from ..errors import DunegrassError
from ..fingerprint import data_fingerprint, model_fingerprint
from ..gradients.factorized import ModuleSelection, capture_factors, factor_layers
from ..influence.kronecker import KroneckerBlock, batch_scores, low_rank, with_ones
from ..options import choice, positive_int
from ..scores import Scores, TopScores, concat_scores, make_sink
from ..seeding import derive_seed
from ..store.feature_store import config_hash
from ..store.signals import TensorFiles
from ..task import Task
from .base import Attributor, eval_mode

QUERY_BYTES = 256 * 2**20  # preconditioned query gradients held at once (per chunk of queries)


class KFAC(Attributor):
    """K-FAC influence: g_zᵀ (S ⊗ A + λI)⁻¹ g_i per layer, summed over layers; positive = proponent.

    Args:
        modules: layers (nn.Linear, transformers' Conv1D, nn.Conv2d); the trainable ones by default.
        damping: λ = damping · mean eigenvalue of each layer's block (kronfluence's default heuristic, 0.1).
        fisher: ``"true"`` (targets drawn from the model's predictive distribution, one draw per example,
            seeded per example) or ``"empirical"`` (the training labels).
        query_rank: keep each query's preconditioned layer gradient as rank-r factors (None: whole).
        batch_size, seed, progress: as the other methods.
    """

    method_name = "kfac"
    corrected = False

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        *,
        modules: ModuleSelection = None,
        damping: float = 0.1,
        fisher: str = "true",
        query_rank: int | None = None,
        batch_size: int = 32,
        seed: int = 0,
        progress: bool | None = None,
    ):
        super().__init__(model, task, progress=progress)
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 < damping < math.inf:
            raise DunegrassError(
                f"damping must be a positive finite number, got {damping!r} (damping='auto' is for the block-eFIM "
                "methods: GradientInfluence, GraSS, FactGraSS, LoGra, TRAK)"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise DunegrassError(f"seed must be an integer, got {seed!r}")
        self.layers = factor_layers(model, modules)
        self.damping, self.fisher = float(damping), choice(fisher, ("true", "empirical"), "fisher")
        self.query_rank = None if query_rank is None else positive_int(query_rank, "query_rank")
        self.batch_size, self.seed = positive_int(batch_size, "batch_size"), int(seed)
        self.blocks: list[KroneckerBlock] = []

    def describe(self) -> dict:
        return {
            "method": self.method_name,
            "damping": self.damping,
            "fisher": self.fisher,
            "query_rank": self.query_rank,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "layers": [layer.name for layer in self.layers],
        }

    # ---- fit
    def fit(self, train: Any, *, queries: Any = None, cache_dir: str | os.PathLike | None = None) -> KFAC:
        """Fit (or load) the factors on ``train``; ``queries`` are not needed before ``score``."""
        data = as_data(train)
        if len(data) == 0:
            raise DunegrassError("the training set is empty")
        cache_dir = self._cache_dir(cache_dir)  # optional under torchrun too: the sums are all-reduced
        self.train_data, self.n_train = data, len(data)
        self._output_shape = self._preflight(data)
        files = TensorFiles(None if cache_dir is None else os.path.join(cache_dir, f"kfac-{self._key(data)}"))
        device = self._device()
        self.blocks = [KroneckerBlock(layer.in_dim, layer.out_dim, device) for layer in self.layers]
        with eval_mode(self.model):
            if self._found(cache_dir, files, "factors"):
                self._load(files, "factors", device)
            else:
                if self._found(cache_dir, files, "covariances"):  # a fit killed during EK-FAC's second pass
                    self._load(files, "covariances", device)
                else:
                    self._pass(data, "covariances")
                    for block in self.blocks:
                        block.decompose()
                    if cache_dir is not None and self.corrected and distributed.rank() == 0:
                        files.save("covariances", self._tensors())
                if self.corrected:
                    self._pass(data, "correction")
                if cache_dir is not None and distributed.rank() == 0:
                    files.save("factors", self._tensors())
                distributed.barrier()
            if self.corrected:
                for block in self.blocks:
                    block.use_correction()
        return self

    def _preflight(self, data: Any) -> torch.Size:
        """One plain forward pass on two examples: shape, dtype and label errors surface with the real shapes."""
        _, batch = next(iterate_batches(data, 2))
        with torch.no_grad(), eval_mode(self.model):
            outputs = self.task.outputs(self.model, to_device(batch, self._device()))
        self.task.check_batch(batch, outputs.shape[1:])
        return outputs.shape[1:]

    def _batches(self, data: Any, start: int = 0, stop: int | None = None):
        """``(offset, batch on the model's device)``, each batch checked by the task (labels in range, ...)."""
        for offset, batch in iterate_batches(data, self.batch_size, start, stop):
            self.task.check_batch(batch, self._output_shape)
            yield offset, to_device(batch, self._device())

    def _key(self, data: Any) -> str:
        """What the factors depend on (not damping or query_rank, which apply when scoring)."""
        key = {
            "method": "kronecker-factors-v2",
            "corrected": self.corrected,
            "fisher": self.fisher,
            "seed": self.seed,
            "task": self.task.config(),
            "layers": [[layer.name, layer.in_dim, layer.out_dim] for layer in self.layers],
            "weights": model_fingerprint(self.model),
            "data": data_fingerprint(data),
        }
        return config_hash(key)[:16]

    def _found(self, cache_dir: Any, files: TensorFiles, name: str) -> bool:
        """Whether every rank finds ``name`` (ranks that decided differently would wait on each other forever)."""
        found = cache_dir is not None and files.has(name)
        if distributed.active():
            flag = torch.tensor(int(found), device=self._device())
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            found = bool(flag)
        return found

    def _load(self, files: TensorFiles, name: str, device: torch.device) -> None:
        stored = files.load(name, device, fix="delete the kfac-* directory to fit again")
        for i, block in enumerate(self.blocks):
            block.load({k.split("/", 1)[1]: v for k, v in stored.items() if k.startswith(f"{i}/")})

    def _tensors(self) -> dict[str, Tensor]:
        return {f"{i}/{k}": v for i, b in enumerate(self.blocks) for k, v in b.tensors().items()}

    def _objective(self, signal: str, start: int):
        task = self.task
        if signal == "sampled":
            return lambda model, batch: task.sampled_loss(
                task.outputs(model, batch),
                batch,
                [derive_seed(self.seed, start + b) for b in range(task.batch_size(batch))],
            )
        if signal == "loss":
            return lambda model, batch: task.loss(task.outputs(model, batch), batch)
        return lambda model, batch: task.query_loss(task.outputs(model, batch), batch)

    def _pass(self, data: Any, what: str) -> None:
        """One pass of this rank's rows: covariances (pass 1) or the EK-FAC correction (pass 2); sums reduced."""
        signal = "sampled" if self.fisher == "true" else "loss"
        lo, hi = distributed.my_rows(len(data))
        if what == "correction":
            for block in self.blocks:
                block.correction = torch.zeros_like(block.eigenvalues)
        batches = self._batches(data, lo, hi)
        for start, batch in tqdm(batches, desc=f"{self.method_name}: {what}", disable=not self.progress, leave=False):
            objective = self._objective(signal, start)
            if what == "covariances":
                calls = [0] * len(self.layers)
                take = functools.partial(self._add_covariances, calls)
                values = capture_factors(self.model, self.layers, objective, batch, take)
                for block, n in zip(self.blocks, calls):
                    block.count_examples(values.shape[0])
                    block.calls.clamp_(min=n)
            else:
                self._gradients(batch, objective, lambda i, g: self.blocks[i].add_correction(g))
        if distributed.active():  # every rank ends with the sums over all rows
            for block in self.blocks:
                if what == "covariances":
                    for t in (block.A, block.S, block.positions, block.examples):
                        dist.all_reduce(t)
                    dist.all_reduce(block.calls, op=dist.ReduceOp.MAX)
                else:
                    dist.all_reduce(block.correction)

    def _gradients(self, batch: Any, objective, on_gradient) -> None:
        """``on_gradient(i, G [B, d_out, in_dim])`` for each layer the loss reaches, as soon as its per-example
        gradient is complete: during the backward pass for a layer called once per batch (one layer's G at
        a time), after it for a layer called more than once (its calls' gradients add up first)."""
        pending: dict[int, Tensor] = {}
        delivered: set[int] = set()

        def take(i: int, x: Tensor, delta: Tensor) -> None:
            g = delta.float().transpose(1, 2) @ with_ones(x, self.layers[i].has_bias).float()
            if float(self.blocks[i].calls) > 1:
                pending[i] = g if i not in pending else pending[i] + g
                return
            if i in delivered:  # its first call's gradient was used already: a sum cannot be formed now
                raise DunegrassError(
                    f"layer {self.layers[i].name!r} ran more than once in this batch but at most once per batch "
                    "during fit; fit on data that makes it run as often (or leave it out with modules=[...])"
                )
            delivered.add(i)
            on_gradient(i, g)

        capture_factors(self.model, self.layers, objective, batch, take)
        for i, g in pending.items():
            on_gradient(i, g)

    def _add_covariances(self, calls: list[int], i: int, x: Tensor, delta: Tensor) -> None:
        calls[i] += 1
        self.blocks[i].add_covariances(with_ones(x, self.layers[i].has_bias), delta)

    # ---- score
    def _query_gradients(self, queries: Any, start: int, stop: int) -> list[Tensor | tuple[Tensor, Tensor]]:
        """Each layer's preconditioned query gradients ``[Q, d_out, in_dim]`` (or their rank-r factors)."""
        device = self._device()
        parts: list[list] = [[] for _ in self.layers]
        for offset, batch in self._batches(queries, start, stop):
            n = self.task.batch_size(batch)
            got: dict[int, Tensor | tuple[Tensor, Tensor]] = {}

            def keep(i: int, g: Tensor, got=got) -> None:  # preconditioned (and compressed) a layer at a time
                p = self.blocks[i].precondition(g, self.damping)
                got[i] = p if self.query_rank is None else low_rank(p, self.query_rank)

            self._gradients(batch, self._objective("measurement", offset), keep)
            for i, layer in enumerate(self.layers):  # a layer the query's loss does not reach: zeros
                parts[i].append(got.get(i, self._zero_query(n, layer, device)))
        if self.query_rank is None:
            return [torch.cat(p) for p in parts]
        return [(torch.cat([u for u, _ in p]), torch.cat([v for _, v in p])) for p in parts]

    def _zero_query(self, n: int, layer, device) -> Tensor | tuple[Tensor, Tensor]:
        if self.query_rank is None:
            return torch.zeros(n, layer.out_dim, layer.in_dim, device=device)
        r = min(self.query_rank, layer.out_dim, layer.in_dim)
        return torch.zeros(n, layer.out_dim, r, device=device), torch.zeros(n, layer.in_dim, r, device=device)

    def _query_chunk(self) -> int:
        per_query = sum(layer.out_dim * layer.in_dim for layer in self.layers)
        if self.query_rank is not None:
            per_query = sum(self.query_rank * (layer.out_dim + layer.in_dim) for layer in self.layers)
        return max(1, QUERY_BYTES // (4 * per_query))

    def score(self, queries: Any, top_k: int | None = None) -> Scores | TopScores:
        """Scores ``[n_query, n_train]`` (positive = proponent), or each query's ``top_k`` best and worst."""
        self._require_fit()
        queries = as_data(queries)
        lo, hi = distributed.my_rows(len(queries))
        parts = []
        with eval_mode(self.model):
            for a in range(lo, hi, self._query_chunk()):
                b = min(a + self._query_chunk(), hi)
                preconditioned = self._query_gradients(queries, a, b)
                sink = make_sink(b - a, self.n_train, top_k)
                for start, values in self._stream(preconditioned):
                    sink.add(start, values.T)
                parts.append(sink.result(self.method_name, self.describe()))
        if not parts:  # a rank with no queries still joins the gather
            parts.append(make_sink(0, self.n_train, top_k).result(self.method_name, self.describe()))
        return concat_scores(parts, gather=distributed.active(), device=self._device())

    def _stream(self, preconditioned: list) -> Any:
        """``(offset, [B, Q])`` for every training batch: Σ over layers of ⟨P_q, G_b⟩."""
        device = self._device()
        n_query = (preconditioned[0] if self.query_rank is None else preconditioned[0][0]).shape[0]
        for start, batch in self._batches(self.train_data):
            total: list[Tensor] = []
            take = functools.partial(self._add_scores, preconditioned, total)
            capture_factors(self.model, self.layers, self._objective("loss", start), batch, take)
            if not total:  # no selected layer is reached by the loss: every score is 0
                total.append(torch.zeros(self.task.batch_size(batch), n_query, device=device))
            yield start, torch.stack(total).sum(0).double()

    def _add_scores(self, preconditioned: list, total: list[Tensor], i: int, x: Tensor, delta: Tensor) -> None:
        total.append(batch_scores(preconditioned[i], with_ones(x, self.layers[i].has_bias), delta))

    def self_scores(self) -> Scores:
        """``Scores [1, n_train]``: each training example's g_iᵀ (F̂ + λI)⁻¹ g_i."""
        self._require_fit()
        device = self._device()
        rows = []
        with eval_mode(self.model):
            for start, batch in self._batches(self.train_data):
                own = torch.zeros(self.task.batch_size(batch), dtype=torch.float64, device=device)

                def add(i: int, g: Tensor, own=own) -> None:
                    own.add_((self.blocks[i].precondition(g, self.damping) * g).flatten(1).sum(1).double())

                self._gradients(batch, self._objective("loss", start), add)
                rows.append(own)
        return self._self_scores(torch.cat(rows).cpu())

    def _require_fit(self) -> None:
        if not self.blocks or self.blocks[0].eigenvalues is None:
            raise DunegrassError(f"call fit before scoring with {type(self).__name__}")
        super()._require_fit()  # and the weights are those fitted


class EKFAC(KFAC):
    """EK-FAC influence: K-FAC's eigenbasis with eigenvalues fitted on the per-example gradients (one more
    pass over the training set). Arguments as KFAC."""

    method_name = "ekfac"
    corrected = True
