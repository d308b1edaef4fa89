"""Tasks: one loss signature everywhere.

A Task turns ``(model, batch)`` into model outputs, and outputs into per-example values:
``loss(outputs, batch) -> [B]`` (what training minimises) and ``measurement(outputs, batch) -> [B]``
(what is being explained). Outputs are exposed because Daunce linearises in output space.

Sign convention: on the query side dunegrass always differentiates a *loss-like* quantity,
``query_loss = measurement`` when lower is better, ``-measurement`` when higher is better.
"""

from __future__ import annotations

import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import DunegrassError, NonFiniteError
from .notices import notice_once


class Task(ABC):
    """Base class. Subclass it and implement ``outputs``, ``loss`` and ``measurement``.

    ``measurement_higher_is_better`` says which way the measurement points (a margin or a
    log-probability: True; a loss: False).
    """

    measurement_higher_is_better: bool = False

    @abstractmethod
    def outputs(self, model: nn.Module, batch: Any) -> Tensor:
        """Model outputs for a batch, e.g. logits ``[B, C]``."""

    @abstractmethod
    def loss(self, outputs: Tensor, batch: Any) -> Tensor:
        """Per-example training loss ``[B]`` (not reduced)."""

    def measurement(self, outputs: Tensor, batch: Any) -> Tensor:
        """Per-example measurement ``[B]`` whose behaviour is being explained."""
        return self.loss(outputs, batch)

    def query_loss(self, outputs: Tensor, batch: Any) -> Tensor:
        """The loss-like form of the measurement ``[B]``: lower is better."""
        m = self.measurement(outputs, batch)
        return -m if self.measurement_higher_is_better else m

    def sampled_loss(self, outputs: Tensor, batch: Any, seeds: list[int]) -> Tensor:
        """The training loss ``[B]`` with targets drawn from the model's own predictive distribution (example b
        with a generator seeded ``seeds[b]``, so draws do not depend on batching): its gradients' covariance
        is the true Fisher (K-FAC's default). Not defined by default."""
        raise DunegrassError(
            f"{type(self).__name__} does not say how to sample targets from the model (Task.sampled_loss), which "
            "the true Fisher needs; pass fisher='empirical' (the training labels' gradients) or implement it"
        )

    def batch_size(self, batch: Any) -> int:
        """Number of examples in a batch (the leading dimension of its first tensor)."""
        return int(first_tensor(batch).shape[0])

    def check_batch(self, batch: Any, output_shape: torch.Size) -> None:
        """Raise a DunegrassError if ``batch`` does not suit this task for a model whose outputs are
        ``output_shape`` per example (labels out of range, say). Called on every batch, on real tensors
        outside vmap, where data-dependent checks can run; nothing by default."""
        return None

    def config(self) -> dict:
        """JSON-able description, part of every cache's config hash: the class name and every public
        attribute (a Task built with other settings must not share a cache). Override it when a setting
        lives elsewhere (a private attribute, a global) or an attribute is not a plain value: return
        ``{**super().config(), "my_setting": ...}``."""
        return {"task": type(self).__qualname__, **{k: _plain(v) for k, v in sorted(vars(self).items()) if k[0] != "_"}}


def _plain(value: Any) -> Any:
    """``value`` if JSON can hold it; a tensor's digest; a function's qualified name; else its repr without
    memory addresses (stable from one run to the next)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Tensor):  # its repr elides the middle of a large tensor
        from .fingerprint import state_fingerprint

        return {"tensor_sha256": state_fingerprint({"t": value})}
    if callable(value) and hasattr(value, "__qualname__"):  # a function or class: by name, not address
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    # a default repr holds a memory address, which differs between runs: it would never match a cache
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def model_logits(out: Any, model: nn.Module) -> Tensor:
    """The logits in what a model's forward returned: a tensor as it is; a Hugging Face ``ModelOutput``'s
    (or a dict's) ``logits``; a dict's only tensor; a tuple's or list's first element (Hugging Face's
    ``return_dict=False`` order). Anything else is ambiguous: a DunegrassError says how to write
    ``Task.outputs`` for it."""
    if isinstance(out, Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping):
        tensors = [v for v in out.values() if isinstance(v, Tensor)]
        if len(tensors) == 1:
            return tensors[0]
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    what = f"a dict with keys {list(out)}" if isinstance(out, Mapping) else f"a {type(out).__name__}"
    raise DunegrassError(
        f"{type(model).__name__}'s forward returned {what}, and dunegrass cannot tell which part is the logits; "
        "subclass the task and override outputs(model, batch) to return the logits tensor [B, ...]"
    )


def first_tensor(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        for v in batch.values():
            if isinstance(v, Tensor):
                return v
    if isinstance(batch, Sequence):
        for v in batch:
            if isinstance(v, Tensor):
                return v
    raise DunegrassError(
        f"cannot find a tensor in a batch of type {type(batch).__name__}; "
        "batches must be tensors, or tuples/lists/dicts of tensors with examples along dim 0"
    )


def _unpack(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Mapping):
        try:
            return batch["inputs"], batch["labels"]
        except KeyError as e:
            raise DunegrassError(
                f"ClassificationTask expects batches with keys 'inputs' and 'labels', got {list(batch)}"
            ) from e
    if isinstance(batch, Sequence) and not isinstance(batch, Tensor) and len(batch) == 2:
        return batch[0], batch[1]
    what = f"{len(batch)} tensor(s)" if isinstance(batch, Sequence) else f"a {type(batch).__name__}"
    raise DunegrassError(
        f"ClassificationTask expects batches of (inputs, labels); got {what} (inputs without labels?). "
        "Pass the data as a tuple (X, y) or a dict with 'inputs' and 'labels'."
    )


class ClassificationTask(Task):
    """Cross-entropy classification on ``(inputs, labels)`` batches.

    measurement:
      - ``"loss"``: cross-entropy (lower is better);
      - ``"margin"``: correct logit minus the largest other logit (higher is better);
      - ``"logodds"``: log(p / (1 - p)) of the correct class, as in TRAK (higher is better).
    """

    MEASUREMENTS = ("loss", "margin", "logodds")

    def __init__(self, measurement: str = "loss"):
        if measurement not in self.MEASUREMENTS:
            raise DunegrassError(f"unknown measurement {measurement!r}; choose one of {', '.join(self.MEASUREMENTS)}")
        self.measurement_name = measurement
        self.measurement_higher_is_better = measurement != "loss"

    def outputs(self, model: nn.Module, batch: Any) -> Tensor:
        inputs, labels = _unpack(batch)
        try:
            logits = model_logits(model(inputs), model)
        except RuntimeError as e:
            hint = _transform_hint(e) or "Check that the data matches the model's expected input shape and dtype."
            raise DunegrassError(
                f"the model failed on inputs of shape {tuple(inputs.shape)} and dtype {inputs.dtype}: {e}. {hint}"
            ) from e
        if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
            raise DunegrassError(
                f"ClassificationTask expects logits of shape [B, C] with B = {labels.shape[0]} labels, "
                f"got {tuple(logits.shape)}"
            )
        return logits

    def check_batch(self, batch: Any, output_shape: torch.Size) -> None:
        """Labels must be class indices ``[B]`` in ``[0, C)`` for a model with C outputs (cross-entropy would
        otherwise fail with a raw RuntimeError, or a device-side assert on a GPU)."""
        labels, classes = self._labels(None, batch), output_shape[0]
        if labels.ndim != 1:
            raise DunegrassError(
                f"ClassificationTask expects class indices of shape [B], got labels of shape {tuple(labels.shape)} "
                "(one-hot labels? convert them with labels.argmax(1))"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise DunegrassError(
                f"labels must lie in [0, {classes}) for a model with {classes} outputs; got "
                f"{int(labels.min())}..{int(labels.max())} (-1 or -100 to ignore an example is not supported: drop it)"
            )

    def _labels(self, outputs: Tensor, batch: Any) -> Tensor:
        labels = _unpack(batch)[1]
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise DunegrassError(
                f"ClassificationTask expects integer class labels, got dtype {labels.dtype}; "
                "convert them with labels.long()"
            )
        return labels.long()

    def loss(self, outputs: Tensor, batch: Any) -> Tensor:
        """Cross-entropy ``[B]``, as softplus(−log-odds) = log(1 + Σ_{j≠y} e^{x_j − x_y}): the same value as
        ``F.cross_entropy``, but a confident example keeps a loss of e^{−margin} instead of rounding to 0
        (logsumexp − x_y cancels to exactly 0 in float32 once p rounds to 1, which erases the differences
        Daunce measures)."""
        return F.softplus(-self.logodds(outputs, batch))

    def sampled_loss(self, outputs: Tensor, batch: Any, seeds: list[int]) -> Tensor:
        """Cross-entropy against a class drawn from softmax(outputs) per example."""
        drawn = _draw(outputs, seeds)
        return F.cross_entropy(outputs, drawn, reduction="none")

    def logodds(self, outputs: Tensor, batch: Any) -> Tensor:
        """log(p / (1 - p)) for the correct class ``[B]``."""
        labels = self._labels(outputs, batch)
        correct = outputs.gather(1, labels[:, None])[:, 0]
        others = outputs.masked_fill(_one_hot(labels, outputs.shape[1]), float("-inf"))
        return correct - torch.logsumexp(others, dim=1)

    def probability_correct(self, outputs: Tensor, batch: Any) -> Tensor:
        """Softmax probability of the correct class ``[B]``."""
        labels = self._labels(outputs, batch)
        return torch.softmax(outputs, dim=1).gather(1, labels[:, None])[:, 0]

    def measurement(self, outputs: Tensor, batch: Any) -> Tensor:
        if self.measurement_name == "loss":
            return self.loss(outputs, batch)
        if self.measurement_name == "logodds":
            return self.logodds(outputs, batch)
        labels = self._labels(outputs, batch)
        correct = outputs.gather(1, labels[:, None])[:, 0]
        others = outputs.masked_fill(_one_hot(labels, outputs.shape[1]), float("-inf"))
        return correct - others.max(dim=1).values


def _draw(logits: Tensor, seeds: list[int], counted: Tensor | None = None) -> Tensor:
    """One draw from softmax(logits[b, ...]) per row of each example b (``[B, ..., C] -> [B, ...]``, long), with
    a generator seeded ``seeds[b]``. With ``counted`` (``[B, ...]`` bool) only those rows are drawn, in order,
    so an example's draws do not depend on how much padding its batch gave it; the others are 0."""
    if not torch.isfinite(logits).all():
        raise NonFiniteError("the model's outputs hold NaN or inf, so no targets can be drawn from them (true Fisher)")
    probs = torch.softmax(logits.detach().float(), dim=-1)
    out = torch.zeros(probs.shape[:-1], dtype=torch.long, device=logits.device)
    for b, seed in enumerate(seeds):
        gen = torch.Generator(device=logits.device).manual_seed(int(seed))
        rows = probs[b] if counted is None else probs[b][counted[b]]
        rows = rows.reshape(-1, probs.shape[-1])
        if rows.shape[0]:
            picked = torch.multinomial(rows, 1, generator=gen)[:, 0]
            if counted is None:
                out[b] = picked.reshape(out.shape[1:])
            else:
                out[b][counted[b]] = picked
    return out


def _one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """Boolean one-hot ``[B, C]`` (F.one_hot cannot run under vmap)."""
    return torch.arange(num_classes, device=labels.device)[None, :] == labels[:, None]


class SequenceClassificationTask(ClassificationTask):
    """Classification with a Hugging Face sequence classifier (``…ForSequenceClassification``): batches
    ``{"input_ids", "attention_mask", "labels"}`` (``dg.data.Padded`` pads them), outputs the model's
    ``logits``; measurements as ClassificationTask."""

    def outputs(self, model: nn.Module, batch: Any) -> Tensor:
        kwargs = {"input_ids": batch["input_ids"]}
        if "attention_mask" in batch:
            kwargs["attention_mask"] = batch["attention_mask"]
        return model(**kwargs).logits

    def _labels(self, outputs: Tensor, batch: Any) -> Tensor:
        if not isinstance(batch, dict) or "labels" not in batch:
            raise DunegrassError("a sequence classifier's batches are {'input_ids', 'attention_mask', 'labels'}")
        return super()._labels(outputs, (batch["input_ids"], batch["labels"]))


class CausalLMTask(Task):
    """Next-token prediction on batches ``{"input_ids", "attention_mask"?, "labels"?}`` (Hugging Face style).

    Per-example loss: mean cross-entropy over the tokens that carry labels (labels shifted by one as
    in Hugging Face; label -100 and padding, where ``attention_mask`` is 0, are ignored — also as the
    position a prediction is made from). Without ``labels`` the input ids are the labels.

    With an ``attention_mask``, models whose ``forward`` takes ``position_ids`` get positions that count
    only attended tokens (as ``generate`` does), so left- and right-padded rows give the unpadded values.

    measurement:
      - ``"loss"``: that per-example mean token loss (lower is better);
      - ``"logprob"``: the sequence log-probability, Σ log p(label tokens) (higher is better).
    """

    MEASUREMENTS = ("loss", "logprob")

    def __init__(self, measurement: str = "loss"):
        if measurement not in self.MEASUREMENTS:
            raise DunegrassError(f"unknown measurement {measurement!r}; choose one of {', '.join(self.MEASUREMENTS)}")
        self.measurement_name = measurement
        self.measurement_higher_is_better = measurement == "logprob"

    @staticmethod
    def _fields(batch: Any) -> tuple[Tensor, Tensor | None, Tensor]:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise DunegrassError(
                "CausalLMTask expects dict batches with 'input_ids' (and optionally 'attention_mask', 'labels'), "
                f"got {type(batch).__name__}"
            )
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        labels = batch.get("labels")
        if labels is None:
            labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
        elif mask is not None:
            labels = labels.masked_fill(mask == 0, -100)
        return ids, mask, labels

    def outputs(self, model: nn.Module, batch: Any) -> Tensor:
        ids, mask, _ = self._fields(batch)
        kwargs = {"input_ids": ids}
        if isinstance(batch, Mapping) and "position_ids" in batch:
            kwargs["position_ids"] = batch["position_ids"]
        if mask is not None:
            kwargs["attention_mask"] = mask
            if "position_ids" not in kwargs and _takes_position_ids(model):
                # Without this, left padding would shift every real token's position embedding.
                kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        try:
            out = model(**kwargs)
        except RuntimeError as e:
            hint = _transform_hint(e)
            raise DunegrassError(
                f"the model failed on input_ids of shape {tuple(ids.shape)}: {e}. {hint}".strip()
            ) from e
        except IndexError as e:  # an embedding lookup past the vocabulary (cannot be checked inside vmap)
            embeddings = getattr(model, "get_input_embeddings", lambda: None)()
            rows = f"[0, {embeddings.num_embeddings})" if hasattr(embeddings, "num_embeddings") else "the vocabulary"
            raise DunegrassError(
                f"the model failed on input_ids of shape {tuple(ids.shape)}: {e}; token ids must lie in {rows} — "
                "was the data tokenised with another model's tokenizer?"
            ) from e
        return model_logits(out, model)

    def check_batch(self, batch: Any, output_shape: torch.Size) -> None:
        """Say when an example has no token with a loss: its gradient is 0 and every score of it is 0."""
        _, mask, labels = self._fields(batch)
        empty = int((~_counted(mask, labels).any(1)).sum())
        if empty:
            notice_once(
                "causal-lm-no-loss-tokens",
                f"{empty} example(s) of a batch have no token with a loss (every next-token label is -100 or "
                "padding), so their gradients are 0 and they score 0 against everything; the loss covers the labels "
                "that are not -100 from the second token on",
            )

    def _token_logprobs(self, outputs: Tensor, batch: Any) -> tuple[Tensor, Tensor]:
        """Log-probabilities of each next-token label ``[B, T-1]`` and the mask of counted tokens."""
        _, mask, labels = self._fields(batch)
        logits, target, counted = outputs[:, :-1], labels[:, 1:], _counted(mask, labels)
        # at least float32: half-precision logits lose the tokens' differences
        logits = logits if logits.dtype == torch.float64 else logits.float()
        index = target.clamp_min(0).unsqueeze(-1)
        correct = logits.gather(-1, index).squeeze(-1)
        others = torch.logsumexp(logits.scatter(-1, index, float("-inf")), dim=-1)
        # log p = −softplus(lse_{j≠y} − x_y): a confidently predicted token keeps a log-probability of
        # about −e^{−margin} where log_softmax would round it to exactly 0 in float32
        picked = -F.softplus(others - correct)
        return torch.where(counted, picked, torch.zeros_like(picked)), counted

    def loss(self, outputs: Tensor, batch: Any) -> Tensor:
        picked, counted = self._token_logprobs(outputs, batch)
        return -picked.sum(1) / counted.sum(1).clamp_min(1)

    def sampled_loss(self, outputs: Tensor, batch: Any, seeds: list[int]) -> Tensor:
        """The loss with every counted next token replaced by one drawn from the model's prediction there."""
        _, counted = self._token_logprobs(outputs.detach(), batch)
        drawn = _draw(outputs[:, :-1], seeds, counted)
        labels = torch.full(outputs.shape[:2], -100, dtype=torch.long, device=outputs.device)
        labels[:, 1:] = torch.where(counted, drawn, torch.full_like(drawn, -100))
        return self.loss(outputs, {**batch, "labels": labels})

    def measurement(self, outputs: Tensor, batch: Any) -> Tensor:
        if self.measurement_name == "loss":
            return self.loss(outputs, batch)
        return self._token_logprobs(outputs, batch)[0].sum(1)


def _counted(mask: Tensor | None, labels: Tensor) -> Tensor:
    """``[B, T-1]``: the next-token labels that carry a loss (not -100, and predicted from a real token)."""
    counted = labels[:, 1:] != -100
    if mask is not None:
        # A left-padded row would otherwise predict its first real token from a pad position.
        counted = counted & (mask[:, :-1] != 0)
    return counted


def _transform_hint(error: RuntimeError) -> str:
    """What to do when the model fails under torch.func (vmap/grad), which the gradient methods and Daunce's
    trainers run it through; empty when the error is not one of those."""
    text = str(error)
    if "setup_context" in text:
        return (
            "A backward hook on one of the model's modules (register_full_backward_hook or _pre_hook) cannot run "
            "under torch.func's vmap/grad: remove it while attributing (LoGra and FactGraSS work with it)."
        )
    if "randomness" in text:
        return "A random layer (e.g. dropout) runs in train mode here: call model.eval() first."
    return ""


def _takes_position_ids(model: Any) -> bool:
    """Whether ``model.forward`` names a ``position_ids`` argument (Hugging Face causal LMs do; a peft
    wrapper passes it on to its base model through ``**kwargs``)."""
    base = getattr(model, "get_base_model", None)
    for m in (model, base() if callable(base) else None):
        try:
            if m is not None and "position_ids" in inspect.signature(m.forward).parameters:
                return True
        except (AttributeError, TypeError, ValueError):
            continue
    return False
