"""Hugging Face helpers (the ``[hf]`` extra): build causal LMs from a config or a local directory, offline.

Nothing here reaches a hub: models come from a config (random weights) or from
``from_pretrained(local_dir, local_files_only=True)``. transformers is imported only when these
functions run, so dunegrass itself does not need it.

Attention: these builders default to ``attn_implementation="eager"``, which every path runs as it is. A
model with SDPA attention (as ``from_pretrained`` gives it) works too: the vmapped paths (per-example
gradients, vmapped Daunce members) switch it to eager for the call and back (``gradients.attention``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn

from .errors import DunegrassError
from .seeding import seeded_generators


def require_transformers():
    """The transformers module, or a clear error saying how to install it."""
    try:
        import transformers
    except ImportError as e:
        raise DunegrassError(
            "this needs Hugging Face transformers; install the extra: pip install 'dunegrass[hf]'"
        ) from e
    return transformers


@contextlib.contextmanager
def quiet_progress_bars():
    """transformers' progress bars off for a load or save whose own line says what happened, then as before."""
    logging = require_transformers().utils.logging
    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()


def causal_lm_from_config(config: Any, seed: int = 0, attn_implementation: str = "eager") -> nn.Module:
    """A causal LM with random weights (drawn under ``seed``) from a transformers config or a dict of its fields.

    A dict needs ``"model_type"`` (e.g. ``{"model_type": "gpt2", "n_layer": 2, ...}``). Returned in eval mode.
    """
    tf = require_transformers()
    if isinstance(config, dict):
        fields = dict(config)
        kind = fields.pop("model_type", None)
        if kind is None:
            raise DunegrassError("a config dict needs 'model_type', e.g. {'model_type': 'gpt2', 'n_layer': 2}")
        config = tf.AutoConfig.for_model(kind, **fields)
    config._attn_implementation = attn_implementation
    with seeded_generators(seed):  # built on the CPU
        model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def load_causal_lm(
    path: str | os.PathLike,
    attn_implementation: str = "eager",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, local_files_only=True)`` from a local directory, in eval mode."""
    tf = require_transformers()
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DunegrassError(
            f"{path!r} is not a local directory; dunegrass loads models from disk only (save one with "
            "model.save_pretrained(dir), or download it yourself first)"
        )
    kwargs = {"local_files_only": True, "attn_implementation": attn_implementation}
    if dtype is not None:  # transformers 5 calls it dtype; 4.x torch_dtype
        kwargs["dtype" if int(tf.__version__.split(".")[0]) >= 5 else "torch_dtype"] = dtype
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise DunegrassError(f"cannot load a causal LM from {path}: {e}") from e
    return model.eval()


def tiny_gpt2(
    vocab_size: int = 96,
    n_positions: int = 64,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 2,
    seed: int = 0,
    attn_implementation: str = "eager",
) -> nn.Module:
    """A small GPT-2 (``GPT2LMHeadModel``) from ``GPT2Config`` with dropout off, for tests and benchmarks.

    No pad token is configured: transformers' "padding without attention mask" check reads the data
    (``.item()``), which torch.func's vmap cannot run. Pass an ``attention_mask`` for padded batches.
    """
    tf = require_transformers()
    config = tf.GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return causal_lm_from_config(config, seed=seed, attn_implementation=attn_implementation)
