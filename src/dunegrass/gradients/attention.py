"""Attention implementations that torch.func's vmap can run.

Hugging Face models default to SDPA attention, whose mask preparation branches on the data
(``attention_mask.all()``), which vmap cannot trace: per-example gradients and vmapped ensembles
fail on such a model as it comes from ``from_pretrained``. ``vmap_safe_attention(model)`` switches
its attention to the eager implementation for the duration of the call (same values, up to float
rounding) and back afterwards, and says so once per model class.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from torch import nn

from ..notices import notice_once

SAFE = (None, "eager")


def _attention_owner(model: nn.Module) -> nn.Module | None:
    """The Hugging Face model whose config chooses the attention (a peft wrapper's base model too)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if (
            config is not None
            and hasattr(config, "_attn_implementation")
            and hasattr(module, "set_attn_implementation")
        ):
            return module
    return None


@contextlib.contextmanager
def vmap_safe_attention(model: nn.Module) -> Iterator[None]:
    owner = _attention_owner(model)
    current = None if owner is None else owner.config._attn_implementation
    with _materialised_bidirectional_masks(owner is not None):
        if current in SAFE:
            yield
            return
        with _eager(owner, current):
            yield


_masks = {"users": 0, "original": None}  # how many calls need the masks built, and transformers' own skip
_masks_lock = threading.Lock()


@contextlib.contextmanager
def _materialised_bidirectional_masks(active: bool) -> Iterator[None]:
    """An encoder's (BERT's) mask preparation skips the mask when no token is padded, which it learns by
    reading the data (``padding_mask.all()``) whatever the attention: vmap cannot run that. While any such
    call runs, the mask is always built (the same values: an all-ones padding mask masks nothing); counted,
    so that interleaved calls (two generators, two threads) restore transformers' function only after the last."""
    masking = None
    if active:
        try:
            from transformers import masking_utils as masking
        except ImportError:
            masking = None
    if getattr(masking, "_ignore_bidirectional_mask_sdpa", None) is None:
        yield
        return
    with _masks_lock:
        if _masks["users"] == 0:
            _masks["original"] = masking._ignore_bidirectional_mask_sdpa
            masking._ignore_bidirectional_mask_sdpa = _never_skip
        _masks["users"] += 1
    try:
        yield
    finally:
        with _masks_lock:
            _masks["users"] -= 1
            if _masks["users"] == 0:
                masking._ignore_bidirectional_mask_sdpa = _masks["original"]


def _never_skip(*args, **kwargs) -> bool:
    return False


@contextlib.contextmanager
def _eager(owner: nn.Module, current: str) -> Iterator[None]:
    name = type(owner).__name__
    notice_once(
        f"attention:{name}:{current}",
        f"{name} uses attn_implementation={current!r}, which torch.func's vmap cannot run; dunegrass switches "
        "it to 'eager' while it computes per-example gradients or vmapped members and restores it afterwards "
        "(same values). Load the model with attn_implementation='eager' to skip the switch.",
    )
    owner.set_attn_implementation("eager")
    try:
        yield
    finally:
        owner.set_attn_implementation(current)
