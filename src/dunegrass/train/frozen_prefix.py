"""Skip the transformer blocks no member changes: θ₀'s hidden states below the first adapted block,
computed once per example and reused by every member.

With LoRA on the last blocks of a language model (``LoraConfig(last_layers=m)``), every Daunce member,
and θ₀ itself, computes the same thing up to the first adapted block. ``FrozenPrefix`` keeps, for each
example it has seen, the input of that block at the example's real tokens (the positions its
``attention_mask`` keeps); a later forward pass whose rows are all known skips the blocks below and puts
the kept states in their place. Rows are known by their token ids and positions, so the same example
in another batch, with other padding, is found again; a batch with an unknown row runs in full and
fills the cache. The result is exact because the skipped blocks hold no trainable parameter (checked)
and run in eval mode, and a real token's state depends on neither the padding (masked in attention)
nor the other rows of its batch.

Memory bound: at most ``max_bytes`` of kept states (default 1 GiB, on the model's device); rows beyond
it are recomputed each time, which costs time, never correctness — once the data's states outgrow the
bound, nearly every batch holds such a row and runs in full. "Exact" is to floating-point rounding:
a row's states come from whichever batch first held it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..fingerprint import weights_signature
from ..notices import DunegrassWarning, user_stacklevel

KEYED = ("input_ids", "attention_mask", "position_ids", "return_dict")  # what a row's key covers (and a flag)


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's stack of transformer blocks: the longest ``nn.ModuleList`` of ≥ 2 modules of one class."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    return best


def block_index(param_name: str, prefix: str) -> int | None:
    """The block a parameter ``prefix.i.…`` lives in, or None if it is outside the stack."""
    head = prefix + "." if prefix else ""
    if not param_name.startswith(head):
        return None
    first = param_name[len(head) :].split(".", 1)[0]
    return int(first) if first.isdigit() else None


class FrozenPrefix:
    """Installed on ``model`` by ``FrozenPrefix.install`` (None when there is nothing to skip); ``close``
    puts the model back as it was."""

    def __init__(
        self, model: nn.Module, blocks: nn.ModuleList, first: int, max_bytes: int, kept: KeptStates | None = None
    ):
        self.model, self.blocks, self.first, self.max_bytes = model, blocks, first, max_bytes
        self.kept = KeptStates() if kept is None else kept  # another install's states, when passed
        self._own = kept is None
        self.hits = self.misses = 0
        self._rows: list[tuple[bytes, Tensor]] | None = None  # this call's (key, kept positions) per row
        self._skip = False
        self._usable = True
        self._handles = [
            model.register_forward_pre_hook(self._on_call, with_kwargs=True),
            model.register_forward_hook(self._after_call, always_call=True),
            blocks[first].register_forward_pre_hook(self._at_first_adapted, with_kwargs=True),
        ]
        # A block's own instance forward (e.g. accelerate's device hook) is wrapped, and put back at close.
        self._instance_forwards = [vars(block).get("forward") for block in blocks[:first]]
        for block in blocks[:first]:
            block.forward = self._skippable(block.forward)

    @property
    def cache(self) -> dict[bytes, Tensor]:
        return self.kept.states

    @property
    def bytes(self) -> int:
        return self.kept.bytes

    @classmethod
    def install(cls, model: nn.Module, max_bytes: int = 1 << 30, kept: KeptStates | None = None) -> FrozenPrefix | None:
        """Hooks on ``model`` when its trainable parameters all lie in blocks ``first ≥ 1`` of its block
        stack and it is in eval mode; None otherwise (or when ``max_bytes`` is 0). ``kept``: states kept
        by earlier installs on the same frozen blocks, reused and added to (the caller vouches that those
        blocks have not changed; ``KeptStates.for_weights`` checks it)."""
        found = block_list(model)
        if found is None or max_bytes <= 0 or model.training:
            return None
        prefix, blocks = found
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        where = [block_index(n, prefix) for n in trainable]
        if not trainable or any(i is None for i in where) or min(where) < 1:
            return None
        return cls(model, blocks, min(where), max_bytes, kept)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        for block, forward in zip(self.blocks[: self.first], self._instance_forwards):
            if forward is None:
                vars(block).pop("forward", None)  # the class's forward again
            else:
                block.forward = forward
        if self._own:  # shared states outlive this install
            self.kept.clear()

    # -- hooks -------------------------------------------------------------------------------------
    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._rows, self._skip = None, False
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        if not self._usable or not isinstance(ids, Tensor) or ids.ndim != 2 or len(args) > 1:
            return
        # Only the token ids, their mask and positions may shape the kept states: any other input (image
        # features, token types, a cache, hidden states asked for) and the whole pass runs.
        if any(k not in KEYED for k, v in kwargs.items() if v is not None and v is not False):
            return
        mask = kwargs.get("attention_mask")
        keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        if keep.shape != ids.shape:
            return
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        elif not isinstance(pos, Tensor) or pos.shape != ids.shape:
            return
        ids_h, pos_h, keep_h = ids.cpu(), pos.cpu(), keep.cpu()  # small: token ids only
        self._rows = [
            (ids_h[r][keep_h[r]].numpy().tobytes() + b"|" + pos_h[r][keep_h[r]].numpy().tobytes(), keep[r])
            for r in range(ids.shape[0])
        ]
        self._skip = self.kept.tail is not None and all(key in self.cache for key, _ in self._rows)
        self.hits += self._skip
        self.misses += not self._skip

    def _after_call(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._rows, self._skip = None, False

    def _skippable(self, forward):
        def maybe_skip(*args, **kwargs):
            if not self._skip:
                out = forward(*args, **kwargs)
                self._learn_output_form(out)
                return out
            hidden = args[0] if args else kwargs["hidden_states"]
            return hidden if self.kept.tail == () else (hidden, *self.kept.tail)

        return maybe_skip

    def _learn_output_form(self, out: Any) -> None:
        """A skipped block returns what the real one did: its hidden states alone, or a tuple whose
        other entries are None (anything else, e.g. a key-value cache, and nothing is skipped)."""
        if isinstance(out, Tensor):
            self.kept.tail = ()
        elif isinstance(out, tuple) and out and all(o is None for o in out[1:]):
            self.kept.tail = tuple(out[1:])
        else:
            self._usable = False
            warnings.warn(
                "FrozenPrefix: the transformer blocks return more than their hidden states (e.g. a key-value "
                "cache, as older transformers releases do); the frozen blocks are not skipped",
                DunegrassWarning,
                stacklevel=user_stacklevel(),
            )

    def _at_first_adapted(self, module: nn.Module, args: tuple, kwargs: dict):
        if self._rows is None:
            return None
        positional = bool(args)
        hidden = args[0] if positional else kwargs["hidden_states"]
        if self._skip:
            hidden = hidden.clone()
            for r, (key, keep) in enumerate(self._rows):
                hidden[r, keep.to(hidden.device)] = self.cache[key].to(hidden.device, hidden.dtype)
            return ((hidden, *args[1:]), kwargs) if positional else (args, {**kwargs, "hidden_states": hidden})
        for r, (key, keep) in enumerate(self._rows):
            if key not in self.cache:
                state = hidden[r, keep.to(hidden.device)].detach().clone()
                size = state.numel() * state.element_size()
                if self.kept.bytes + size <= self.max_bytes:
                    self.cache[key] = state
                    self.kept.bytes += size
        return None


class KeptStates:
    """The hidden states ``FrozenPrefix`` keeps (row key → states), shareable between installs on one model
    whose frozen blocks do not change (a back end that fine-tunes member after member)."""

    def __init__(self):
        self.states: dict[bytes, Tensor] = {}
        self.bytes = 0
        self.tail: tuple | None = None  # the non-hidden part of a frozen block's tuple output, once seen
        self._weights: tuple | None = None

    def clear(self) -> None:
        self.states.clear()
        self.bytes, self.tail = 0, None

    def for_weights(self, model: nn.Module) -> KeptStates:
        """Self, emptied first if ``model``'s weights differ from the last call's (``weights_signature``, by
        content: writes through ``.data``, as peft's merge makes, move no version counter); a pass over the
        weights costs far less than the fine-tune or loss evaluation each call precedes."""
        weights = weights_signature(model)
        if weights != self._weights:
            self.clear()
            self._weights = weights
        return self
