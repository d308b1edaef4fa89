"""Models and data as users hold them on disk, for the command line.

Models: a local Hugging Face directory (a causal LM or a sequence classifier, loaded offline), or
``package.module:factory`` returning ``(model, task)`` or ``(model, task, tokenizer)``; optionally a
weights file. Data: JSON Lines, a Hugging Face dataset saved to disk, or ``.npz`` / ``.safetensors``
tensors. Text is tokenised with the model's own tokenizer (and its chat template for prompt/completion
pairs); the loss covers the completion tokens only.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data import Padded, TensorData
from ..errors import DunegrassError
from ..hf import quiet_progress_bars, require_transformers
from ..task import CausalLMTask, SequenceClassificationTask, Task


@dataclass
class Loaded:
    """A model ready to attribute: the model, its task, its tokenizer (None without one), and its kind."""

    model: nn.Module
    task: Task
    tokenizer: Any
    kind: str  # "causal_lm" or "classification"


def load_model(spec: str, weights: str | None = None, task: str = "auto", device: str = "cpu") -> Loaded:
    """The model named by ``spec`` (a local Hugging Face directory or ``package.module:factory``)."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # CPU-only torch asserts on "cuda"
        raise DunegrassError(f"device {device!r} is not usable here ({e}); pass --device cpu") from e
    if os.path.isdir(spec):
        loaded = _from_directory(spec, task)
    elif ":" in spec:
        loaded = _from_factory(spec)
    else:
        raise DunegrassError(
            f"model {spec!r} is neither a local directory nor 'package.module:factory'; pass the directory a "
            "Hugging Face model was saved to (model.save_pretrained(dir)), or a factory returning (model, task)"
        )
    if weights is not None:
        _load_weights(loaded.model, weights)
    loaded.model.to(device).eval()
    return loaded


def _from_directory(path: str, task: str) -> Loaded:
    tf = require_transformers()
    try:
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DunegrassError(f"{path} holds no Hugging Face model config ({e})") from e
    names = " ".join(config.architectures or [])
    kind = task if task != "auto" else ("classification" if "SequenceClassification" in names else "causal_lm")
    auto = tf.AutoModelForSequenceClassification if kind == "classification" else tf.AutoModelForCausalLM
    try:
        with quiet_progress_bars():  # the command prints its own one-line summary
            model = auto.from_pretrained(path, local_files_only=True)
        tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DunegrassError(f"cannot load the model or tokenizer from {path}: {e}") from e
    made = SequenceClassificationTask() if kind == "classification" else CausalLMTask()
    return Loaded(model, made, tokenizer, kind)


def _from_factory(spec: str) -> Loaded:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise DunegrassError(f"cannot import {spec!r} ({e}); is the module on PYTHONPATH?") from e
    made = factory()
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        raise DunegrassError(f"{spec} must return (model, task) or (model, task, tokenizer), got {type(made).__name__}")
    model, task, tokenizer = (*made, None) if len(made) == 2 else made
    kind = "causal_lm" if isinstance(task, CausalLMTask) else "classification"
    return Loaded(model, task, tokenizer, kind)


def _load_weights(model: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise DunegrassError(f"weights file {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise DunegrassError(f"the weights in {path} do not fit the model: {e}") from e


@dataclass
class Examples:
    """A dataset ready for an attributor, and each example's text for the outputs (None for tensors)."""

    data: Any
    texts: list[str] | None


def load_data(path: str, loaded: Loaded, max_length: int = 512) -> Examples:
    """The examples in ``path`` (JSON Lines, a saved Hugging Face dataset, ``.npz`` or ``.safetensors``)."""
    _exists(path)
    if os.path.isdir(path):
        rows = _hf_rows(path)
    elif path.endswith((".jsonl", ".json")):
        rows = _jsonl_rows(path)
    elif path.endswith((".npz", ".safetensors")):
        return Examples(TensorData(_tensor_file(path)), None)
    else:
        raise DunegrassError(
            f"cannot read data from {path}: use JSON Lines (.jsonl), a Hugging Face dataset saved with "
            "save_to_disk (a directory), or .npz / .safetensors tensors"
        )
    if not rows:
        raise DunegrassError(f"{path} holds no examples")
    if loaded.kind == "classification" and loaded.tokenizer is None:
        return _vectors(rows, path)
    if loaded.tokenizer is None:
        raise DunegrassError(
            f"text in {path} needs a tokenizer: give the model as a directory, or return one from the factory"
        )
    return _tokenised(rows, loaded, max_length, path)


def _exists(path: str) -> None:
    if not os.path.exists(path):
        raise DunegrassError(f"{path} does not exist (from {os.getcwd()}); check the --data / --queries path")


def load_pairs(path: str) -> Examples:
    """``{"prompt", "completion"}`` rows (``"system"`` optional) as they are, for a fine-tuning service."""
    _exists(path)
    rows = _hf_rows(path) if os.path.isdir(path) else _jsonl_rows(path) if path.endswith((".jsonl", ".json")) else None
    if rows is None:
        raise DunegrassError(f"cannot read {path}: a fine-tuning service takes JSON Lines or a saved dataset of text")
    if not rows:
        raise DunegrassError(f"{path} holds no examples")
    for number, row in enumerate(rows, 1):
        texts = (row.get("prompt"), row.get("completion")) if isinstance(row, dict) else (None,)
        if not all(isinstance(t, str) for t in texts):
            wanted = '{"prompt", "completion"}'
            raise DunegrassError(f"{path}, example {number}: a fine-tuning service needs {wanted} rows")
    pairs = [{k: row[k] for k in ("system", "prompt", "completion") if k in row} for row in rows]
    return Examples(pairs, [f"{row['prompt']} → {row['completion']}" for row in rows])


def _jsonl_rows(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise DunegrassError(f"{path}, line {number}, is not JSON: {e}") from e
    return rows


def _hf_rows(path: str) -> list[dict]:
    try:
        import datasets
    except ImportError as e:
        raise DunegrassError(
            f"{path} is a directory: reading a saved Hugging Face dataset needs pip install 'dunegrass[data]'"
        ) from e
    try:
        dataset = datasets.load_from_disk(path)
    except (OSError, ValueError, FileNotFoundError) as e:
        raise DunegrassError(f"{path} is not a Hugging Face dataset saved with save_to_disk ({e})") from e
    if isinstance(dataset, datasets.DatasetDict):
        raise DunegrassError(f"{path} holds several splits ({', '.join(dataset)}); point at one of them")
    return [dict(row) for row in dataset]


def _tensor_file(path: str) -> dict[str, Tensor]:
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {k: torch.from_numpy(z[k].copy()) for k in z.files}
    from safetensors.torch import load_file

    return load_file(path)


def _vectors(rows: list[dict], path: str) -> Examples:
    try:
        x = torch.tensor([row["inputs"] for row in rows], dtype=torch.float32)
        y = torch.tensor([row["label"] for row in rows], dtype=torch.long)
    except (KeyError, TypeError, ValueError) as e:
        raise DunegrassError(f'{path}: a classifier\'s rows are {{"inputs": [numbers], "label": int}} ({e})') from e
    return Examples(TensorData((x, y)), [json.dumps(row["inputs"])[:200] for row in rows])


def _tokenised(rows: list[dict], loaded: Loaded, max_length: int, path: str) -> Examples:
    tok = loaded.tokenizer
    examples, texts = [], []
    for number, row in enumerate(rows, 1):
        if "prompt" in row and "completion" in row:
            ids, first = _prompt_completion(tok, str(row["prompt"]), str(row["completion"]))
            text = f"{row['prompt']} → {row['completion']}"
        elif "text" in row:
            ids, first, text = tok(str(row["text"]), add_special_tokens=True)["input_ids"], 0, str(row["text"])
        else:
            wanted = '{"text", "label"}' if loaded.kind == "classification" else '{"prompt", "completion"} or {"text"}'
            raise DunegrassError(f"{path}, example {number}: rows here are {wanted}; got the keys {sorted(row)}")
        if loaded.kind != "classification" and first >= min(len(ids), max_length):
            raise DunegrassError(
                f"{path}, example {number}: its prompt takes {first} tokens, so max_length={max_length} leaves none "
                f"of its completion to attribute (it would score 0 against everything); raise --max_length (the "
                f"example has {len(ids)} tokens) or shorten the prompt"
            )
        ids = torch.tensor(ids[:max_length], dtype=torch.long)
        example = {"input_ids": ids}
        if loaded.kind == "classification":
            example["labels"] = torch.tensor(int(row["label"]))
        else:
            labels = ids.clone()
            labels[: min(first, len(ids))] = -100  # the loss covers the completion only
            example["labels"] = labels
        examples.append(example)
        texts.append(text)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    if loaded.kind == "classification":
        return Examples(_ClassifierRows(examples, pad), texts)
    return Examples(Padded(examples, pad_id=pad), texts)


def _prompt_completion(tok: Any, prompt: str, completion: str) -> tuple[list[int], int]:
    """Token ids of the pair, and where the completion starts: with the tokenizer's chat template when it
    has one (the prompt as the user's message, the completion as the assistant's answer)."""
    if getattr(tok, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        head = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True)
        whole = tok.apply_chat_template(user + [{"role": "assistant", "content": completion}], tokenize=True)
        head, whole = _ids(head), _ids(whole)
        return whole, len(head)
    head = tok(prompt, add_special_tokens=True)["input_ids"]
    tail = tok(completion, add_special_tokens=False)["input_ids"]
    return head + tail, len(head)


def _ids(out: Any) -> list[int]:
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


class _ClassifierRows(Padded):
    """Padded token sequences with one class label each."""

    def collate_fn(self, examples: list[dict]) -> dict[str, Tensor]:
        batch = super().collate_fn([{"input_ids": ex["input_ids"]} for ex in examples])
        batch["labels"] = torch.stack([ex["labels"] for ex in examples])
        return batch
