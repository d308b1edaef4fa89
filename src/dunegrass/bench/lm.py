"""Offline causal-LM benchmark: a tiny GPT-2 fine-tuned on Python standard-library docstrings.

Everything is built on this machine, deterministically, with nothing downloaded:

- corpus: the docstrings of a fixed list of standard-library modules and their public classes,
  functions and methods (``inspect.getdoc``), sorted by qualified name. Its sha256 is recorded, since
  docstrings change between Python versions;
- tokenizer: characters — newline and printable ASCII (96 tokens); any other character becomes ``?``;
- split: docstrings hashed into a *pretraining* part (60 %) and a *fine-tuning* part; the fine-tuning
  text is cut into windows of ``seq_len`` characters and the windows are drawn (seeded) into the
  training set and the queries, so a query usually has training windows from the same docstring;
- model: ``GPT2Config`` (eager attention, no dropout), pretrained from random weights on the
  pretraining windows (θ_base), then fine-tuned on the training windows with ``finetune`` (θ₀, the
  model being explained). Ground truth fine-tunes θ_base on random half-subsets with the same recipe.

Usage::

    bench = lm_task()                         # LMBenchmarkTask; cached under cache_dir if given
    gt = lm_ground_truth(bench, num_subsets=50, cache_path="runs/lm/gt.npz")
    scores = dg.FactGraSS(bench.model, bench.task).fit(bench.train).score(bench.queries)
    dg.lds(scores, gt)
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import io
import math
import os
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigMismatchError, DunegrassError
from ..eval import GroundTruth, subset_retraining
from ..fingerprint import state_fingerprint
from ..seeding import derive_seed
from ..store import atomic_write_bytes, config_hash
from ..task import CausalLMTask
from ..train import EnsembleTrainer, Member, TrainConfig

STDLIB_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar collections contextlib copy csv dataclasses datetime "
    "decimal difflib email enum fractions functools gzip hashlib heapq hmac html http.client inspect io "
    "ipaddress itertools json logging math mimetypes operator os pathlib pickle pprint queue random re shlex "
    "shutil socket sqlite3 statistics string struct subprocess tarfile tempfile textwrap threading time "
    "tokenize unittest urllib.parse uuid warnings weakref xml.etree.ElementTree zipfile zlib"
).split()
MIN_DOC_CHARS = 80  # shorter docstrings ("Return self.") carry little text


class CharTokenizer:
    """Character tokens: 0 is newline, 1..95 are ASCII 32..126; other characters map to ``?``."""

    vocab = "\n" + "".join(chr(c) for c in range(32, 127))

    def __init__(self):
        self._index = {ch: i for i, ch in enumerate(self.vocab)}
        self._unknown = self._index["?"]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> Tensor:
        """``[len(text)]`` int64 token ids."""
        text = text.replace("\t", "    ")
        return torch.tensor([self._index.get(ch, self._unknown) for ch in text], dtype=torch.int64)

    def decode(self, ids: Tensor) -> str:
        return "".join(self.vocab[i] for i in ids.tolist())


def stdlib_docstrings(modules: tuple[str, ...] = STDLIB_MODULES) -> list[tuple[str, str]]:
    """``(qualified name, docstring)`` of the modules and their public members, sorted by name."""
    docs: dict[str, str] = {}

    def add(name: str, obj: object) -> None:
        doc = inspect.getdoc(obj)
        if doc and len(doc) >= MIN_DOC_CHARS:
            docs[name] = doc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases warn when touched
        for mod_name in modules:
            mod = importlib.import_module(mod_name)
            add(mod_name, mod)
            for attr, obj in sorted(vars(mod).items()):
                if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                    continue
                if inspect.isclass(obj):
                    add(f"{mod_name}.{attr}", obj)
                    for meth, member in sorted(vars(obj).items()):
                        # a method another package attached (transformers adds logging.Logger.warning_once when
                        # imported) would make the corpus depend on what the process imported before
                        if not meth.startswith("_") and callable(member) and _from_stdlib(member):
                            add(f"{mod_name}.{attr}.{meth}", member)
                elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
                    add(f"{mod_name}.{attr}", obj)
    return sorted(docs.items())


def _from_stdlib(member: object) -> bool:
    """Whether a class member comes from the standard library (C methods name no module)."""
    owner = getattr(member, "__module__", None)
    return not isinstance(owner, str) or owner.split(".")[0] in sys.stdlib_module_names


def _is_pretraining(name: str) -> bool:
    return hashlib.sha256(name.encode()).digest()[0] < 154  # 154/256 ≈ 60 %


def _windows(ids: Tensor, seq_len: int) -> Tensor:
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


@dataclass
class LMBenchmarkTask:
    """A ready causal-LM attribution benchmark.

    ``model`` is θ₀ (eval mode); ``base_state`` the pretrained weights every fine-tune starts from;
    ``train``/``queries`` are ``{"input_ids": [n, seq_len]}`` (no padding); ``finetune`` is the recipe
    for θ₀ and for every ground-truth fine-tune.
    """

    name: str
    model: nn.Module
    base_state: dict[str, Tensor]
    task: CausalLMTask
    train: dict[str, Tensor]
    queries: dict[str, Tensor]
    finetune: TrainConfig
    tokenizer: CharTokenizer
    info: dict = field(default_factory=dict)

    def base_model(self) -> nn.Module:
        """A copy of the model with the pretrained (pre-fine-tuning) weights."""
        base = copy.deepcopy(self.model)
        base.load_state_dict(self.base_state)
        return base.eval()


def _settings(quick: bool) -> dict:
    if quick:
        return {"n_train": 128, "n_query": 16, "seq_len": 32, "n_embd": 32, "n_layer": 1, "pretrain_steps": 150}
    return {"n_train": 256, "n_query": 48, "seq_len": 64, "n_embd": 64, "n_layer": 2, "pretrain_steps": 600}


def lm_task(
    quick: bool = False,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    finetune_epochs: float = 8.0,
) -> LMBenchmarkTask:
    """Build the benchmark (see the module docstring). ``quick``: a smaller model and data (seconds).
    ``finetune_epochs``: the length of the fine-tune (θ₀'s and the ground truth's; 8 by default).

    With ``cache_dir`` the pretrained and the fine-tuned weights are saved there (``.npz``, each keyed
    by a hash of every setting it depends on, the corpus included) and reused.
    """
    from ..hf import tiny_gpt2

    if not (math.isfinite(finetune_epochs) and finetune_epochs > 0):
        raise DunegrassError(f"finetune_epochs must be a positive number of epochs, got {finetune_epochs!r}")
    s = _settings(quick)
    tok = CharTokenizer()
    docs = stdlib_docstrings()
    corpus_sha = hashlib.sha256("".join(n + d for n, d in docs).encode()).hexdigest()
    pre_text = "".join(d + "\n\n" for n, d in docs if _is_pretraining(n))
    ft_text = "".join(d + "\n\n" for n, d in docs if not _is_pretraining(n))
    pre = _windows(tok.encode(pre_text), s["seq_len"])
    ft = _windows(tok.encode(ft_text), s["seq_len"])
    gen = torch.Generator().manual_seed(derive_seed(seed, 0x6C6D))
    order = torch.randperm(ft.shape[0], generator=gen)
    train = {"input_ids": ft[order[: s["n_train"]]].clone()}
    queries = {"input_ids": ft[order[s["n_train"] : s["n_train"] + s["n_query"]]].clone()}

    # Adam from the pretrained weights: a small learning rate and several epochs, so each training window
    # leaves a mark (LDS against half-subset fine-tunes: ~0.6 for LoGra/FactGraSS at 20 subsets in trials).
    pretrain = TrainConfig(optimizer="adam", lr=3e-3, steps=s["pretrain_steps"], batch_size=64, schedule="cosine")
    finetune = TrainConfig(optimizer="adam", lr=1e-4, epochs=float(finetune_epochs), batch_size=s["n_train"] // 8)
    model = tiny_gpt2(tok.vocab_size, s["seq_len"], s["n_embd"], s["n_layer"], n_head=2, seed=seed)
    base_key = {
        "benchmark": "stdlib-docstrings-gpt2",
        "seed": seed,
        "corpus_sha256": corpus_sha,
        "model": {k: s[k] for k in ("seq_len", "n_embd", "n_layer")},
        "pretrain": pretrain.to_dict(),
    }
    info = {
        **base_key,
        "quick": quick,
        **s,
        "pretrain_windows": int(pre.shape[0]),
        "finetune_windows": int(ft.shape[0]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "finetune": finetune.to_dict(),
    }
    task = CausalLMTask()
    base_path, tuned_path = _cache_path(cache_dir, "base", base_key), _cache_path(cache_dir, "tuned", info)
    base_state = _load_state(base_path)
    if base_state is None:
        _train(model, task, {"input_ids": pre}, pretrain, derive_seed(seed, 1))
        base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        _save_state(base_path, base_state)
    tuned = _load_state(tuned_path)
    if tuned is None:
        model.load_state_dict(base_state)
        _train(model, task, train, finetune, derive_seed(seed, 2))
        _save_state(tuned_path, model.state_dict())
    else:
        model.load_state_dict(tuned)
    model.eval()
    return LMBenchmarkTask(info["benchmark"], model, base_state, task, train, queries, finetune, tok, info)


def _train(model: nn.Module, task: CausalLMTask, data: dict[str, Tensor], config: TrainConfig, seed: int) -> None:
    """Train ``model`` in place on all of ``data`` (the ensemble trainer with one member, as ground truth does)."""
    n = data["input_ids"].shape[0]
    trained = EnsembleTrainer(model, task, config).train(data, [Member(torch.arange(n), seed)])
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(trained[name][0])


def _cache_path(cache_dir: str | os.PathLike | None, kind: str, key: dict) -> str | None:
    return None if cache_dir is None else os.path.join(os.fspath(cache_dir), f"lm-{kind}-{config_hash(key)[:16]}.npz")


def _save_state(path: str | None, state: dict[str, Tensor]) -> None:
    if path is None:
        return
    buf = io.BytesIO()
    np.savez(buf, **{k: v.detach().numpy() for k, v in state.items()})
    atomic_write_bytes(path, buf.getvalue())


def _load_state(path: str | None) -> dict[str, Tensor] | None:
    if path is None or not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: torch.from_numpy(z[k].copy()) for k in z.files}


def lm_ground_truth(
    bench: LMBenchmarkTask,
    num_subsets: int = 50,
    alpha: float = 0.5,
    seed: int = 0,
    cache_path: str | os.PathLike | None = None,
    max_members: int | None = 10,
    progress: bool = False,
) -> GroundTruth:
    """Query losses after fine-tuning θ_base on ``num_subsets`` random α-subsets of the training set.

    ``values [num_subsets, n_query]`` are ``task.query_loss`` (mean token loss) of each fine-tuned
    model. With ``cache_path`` the result is saved (``.npz``) and reused when the benchmark, recipe and
    subsets are the same; a cache made otherwise raises ConfigMismatchError.
    """
    key = {
        "benchmark": bench.info,
        "base_weights": state_fingerprint(bench.base_state),
        "num_subsets": num_subsets,
        "alpha": alpha,
        "seed": seed,
    }
    if cache_path is not None and os.path.exists(cache_path):
        gt = GroundTruth.load(cache_path)
        if gt.config.get("key_hash") != config_hash(key):
            raise ConfigMismatchError(
                f"the ground truth at {cache_path} was computed for another benchmark or setting; "
                "delete it to recompute, or pass another cache_path"
            )
        return gt
    gt = subset_retraining(
        bench.base_model(),
        bench.task,
        bench.train,
        bench.queries,
        bench.finetune,
        num_subsets=num_subsets,
        alpha=alpha,
        num_seeds=1,
        seed=seed,
        from_scratch=False,
        max_members=max_members,
        progress=progress,
    )
    gt.config.update({"key": key, "key_hash": config_hash(key)})
    if cache_path is not None:
        gt.save(cache_path)
    return gt
