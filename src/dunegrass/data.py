"""Datasets as dunegrass sees them: anything indexable with a length, batched in order.

Tuples/lists/dicts of tensors (examples along dim 0) are sliced directly, which is much faster
than collating items one by one; any other map-style ``torch.utils.data.Dataset`` goes through a
DataLoader with ``collate_fn``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import DunegrassError


class TensorData:
    """Examples stored as a tuple or dict of tensors sharing their first dimension."""

    def __init__(self, tensors: Sequence[Tensor] | Mapping[str, Tensor]):
        self.tensors = tensors
        values = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
        if not values or not all(isinstance(t, Tensor) for t in values):
            raise DunegrassError("a dataset given as a tuple/dict must hold only tensors, and at least one")
        n = values[0].shape[0] if values[0].ndim else 0
        for t in values:
            if t.ndim == 0 or t.shape[0] != n:
                shapes = [tuple(v.shape) for v in values]
                raise DunegrassError(
                    f"the tensors of a dataset must share their first (example) dimension; got shapes {shapes}"
                )
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def slice(self, index: slice | Tensor) -> Any:
        if isinstance(self.tensors, Mapping):
            return {k: v[index] for k, v in self.tensors.items()}
        return tuple(t[index] for t in self.tensors)


def as_data(data: Any) -> TensorData | Dataset:
    """Accept a tuple/list/dict of tensors, a list of examples, a TensorData or a map-style Dataset; reject
    empty data."""
    if isinstance(data, TensorData):
        out: Any = data
    elif isinstance(data, Tensor):
        out = TensorData((data,))
    elif isinstance(data, (str, bytes, os.PathLike)):
        raise DunegrassError(
            f"got {type(data).__name__} {str(data)[:60]!r} as a dataset; pass the data itself (a tuple (X, y), a "
            "dict of tensors or a torch Dataset), not its name or path"
        )
    elif isinstance(data, (tuple, list)) and not data:
        raise DunegrassError("the dataset is empty; attribution needs at least one example")
    elif isinstance(data, list) and isinstance(data[0], (tuple, list, Mapping)):
        out = data  # a list of examples ((x, y) pairs, dicts): batched as a map-style Dataset is
    elif isinstance(data, (tuple, list, Mapping)):
        out = TensorData(data)
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        out = data
    else:
        raise DunegrassError(
            f"cannot use an object of type {type(data).__name__} as a dataset; pass a tuple of tensors "
            "(X, y), a dict of tensors, or a map-style torch Dataset with __len__"
        )
    if len(out) == 0:
        raise DunegrassError("the dataset is empty; attribution needs at least one example")
    return out


def iterate_batches(
    data: Any,
    batch_size: int,
    start: int = 0,
    stop: int | None = None,
    collate_fn: Callable | None = None,
) -> Iterator[tuple[int, Any]]:
    """Yield ``(offset, batch)`` over examples ``[start, stop)`` in order."""
    if batch_size < 1:
        raise DunegrassError(f"batch_size must be at least 1, got {batch_size}")
    data = as_data(data)
    stop = len(data) if stop is None else min(stop, len(data))
    if isinstance(data, TensorData):
        for lo in range(start, stop, batch_size):
            yield lo, data.slice(slice(lo, min(lo + batch_size, stop)))
        return
    collate_fn = collate_fn or getattr(data, "collate_fn", None)  # a dataset may say how to batch itself
    # its own generator: an iterator draws a seed from it, which would advance the user's global RNG
    subset, generator = Subset(data, range(start, stop)), torch.Generator()
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, generator=generator)
    batches = iter(loader)
    for i in range(len(loader)):
        try:
            batch = next(batches)
        except RuntimeError as e:
            unequal = (
                "stack expects each tensor to be equal size",
                "each element in list of batch should be of equal size",
            )
            if not any(text in str(e) for text in unequal):  # torch's words for tensors, and for lists (a HF dataset)
                raise
            raise DunegrassError(
                f"the batch from example {start + i * batch_size} holds tensors of different lengths, which torch's "
                "default batching cannot stack: wrap token sequences in dg.data.Padded(dataset, pad_id=...) (pads "
                "each batch and adds attention_mask), or give the dataset a collate_fn"
            ) from e
        yield start + i * batch_size, batch


def subset(data: Any, indices: Sequence[int] | Tensor) -> TensorData | Dataset:
    """The examples at ``indices`` (in that order); a dataset's ``collate_fn`` comes along."""
    data = as_data(data)
    idx = torch.as_tensor(indices, dtype=torch.long)
    if isinstance(data, TensorData):
        return TensorData(data.slice(idx))
    out = Subset(data, idx.tolist())
    if getattr(data, "collate_fn", None) is not None:
        out.collate_fn = data.collate_fn
    return out


class Padded(Dataset):
    """A dataset of token sequences of different lengths, batched by padding each batch to its longest.

    Each example is a dict with ``"input_ids"`` (1-D) and optionally ``"labels"`` (or ``"label"``): the same
    length, -100 for tokens without a loss (a language model), or one class index (a sequence classifier,
    with ``dg.SequenceClassificationTask``); a batch gets ``attention_mask`` (1 on real tokens) and ``pad_id``/-100
    in the padding, on the ``side`` given. Per-example results do not depend on the padding (CausalLMTask masks
    it). ``dg.data.Padded(my_dataset)`` wraps any such dataset, a Hugging Face one included.
    """

    def __init__(self, data: Any, pad_id: int = 0, side: str = "right"):
        if side not in ("left", "right"):
            raise DunegrassError(f"side must be 'left' or 'right', got {side!r}")
        self.data, self.pad_id, self.side = data, int(pad_id), side
        self._fingerprint = getattr(data, "_fingerprint", None)  # a Hugging Face dataset's stays its own

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return self.data[i]

    def collate_fn(self, examples: list[Mapping]) -> dict[str, Tensor]:
        longest = max(len(ex["input_ids"]) for ex in examples)
        out: dict[str, list[Tensor]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for ex in examples:
            ids = torch.as_tensor(ex["input_ids"], dtype=torch.long)
            given = ex["labels"] if "labels" in ex else ex.get("label")  # "label": a Hugging Face dataset's column
            labels = ids if given is None else torch.as_tensor(given, dtype=torch.long)
            gap = longest - len(ids)
            fill = (gap, 0) if self.side == "left" else (0, gap)
            out["input_ids"].append(torch.nn.functional.pad(ids, fill, value=self.pad_id))
            out["attention_mask"].append(torch.nn.functional.pad(torch.ones_like(ids), fill, value=0))
            # a class index per sequence is not padded
            out["labels"].append(labels if labels.ndim == 0 else torch.nn.functional.pad(labels, fill, value=-100))
        return {k: torch.stack(v) for k, v in out.items()}


def to_device(batch: Any, device: torch.device | str) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
