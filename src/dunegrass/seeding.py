"""Deterministic seeds: derive independent streams from (seed, stream ids) with splitmix64; seed torch's global
generators for a block without disturbing the caller's."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

import torch

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *streams: int) -> int:
    """A 63-bit seed for the stream ``streams`` of ``seed``; equal inputs give equal seeds everywhere."""
    x = splitmix64(seed & MASK64)
    for s in streams:
        x = splitmix64(x ^ (s & MASK64))
    return x >> 1


@contextmanager
def seeded_generators(seed: int, devices: Iterable[torch.device | str] = ()) -> Iterator[None]:
    """For the block, the CPU generator and those of ``devices`` (accelerators whose random draws the block
    makes: dropout masks, initialisers) seeded with ``seed``; afterwards every one as it was. Other devices'
    generators are not touched (``torch.manual_seed`` would reseed every accelerator and restore none)."""
    accelerators = sorted({torch.device(d) for d in devices} - {torch.device("cpu")}, key=str)
    with ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))  # the CPU generator
        for kind in sorted({d.type for d in accelerators}):
            mine = [d for d in accelerators if d.type == kind]
            stack.enter_context(torch.random.fork_rng(devices=mine, device_type=kind))
        torch.default_generator.manual_seed(seed)
        for device in accelerators:
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            else:
                getattr(torch, device.type).manual_seed(seed)
        yield
