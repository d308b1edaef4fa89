"""Functional optimisers on (stacked) parameter dicts; the same arithmetic as torch.optim's defaults."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import TrainConfig


class FunctionalOptimizer:
    """SGD (with momentum), Adam and AdamW over a dict of tensors, updated in place."""

    def __init__(self, params: dict[str, Tensor], config: TrainConfig):
        self.config = config
        self.t = 0
        self.state = {n: {} for n in params}

    @torch.no_grad()
    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor], lr: float) -> None:
        c = self.config
        self.t += 1
        for n, p in params.items():
            g = grads[n]
            st = self.state[n]
            if c.optimizer == "adamw":
                p.mul_(1 - lr * c.weight_decay)
            elif c.weight_decay:
                g = g.add(p, alpha=c.weight_decay)
            if c.optimizer == "sgd":
                if c.momentum:
                    if "buf" not in st:
                        st["buf"] = g.clone()
                    else:
                        st["buf"].mul_(c.momentum).add_(g)
                    g = st["buf"]
                p.add_(g, alpha=-lr)
                continue
            b1, b2 = c.betas
            if "m" not in st:
                st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
            st["m"].lerp_(g, 1 - b1)
            st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
            bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
            denom = (st["v"].sqrt() / math.sqrt(bc2)).add_(c.eps)
            p.addcdiv_(st["m"], denom, value=-lr / bc1)

    def state_tensors(self) -> dict[str, Tensor]:
        """The optimiser state as flat named tensors (``"<param>/<slot>"`` and ``"step"``), for checkpoints."""
        out = {"step": torch.tensor(self.t, dtype=torch.long)}
        for n, st in self.state.items():
            out.update({f"{n}/{slot}": v for slot, v in st.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Restore what ``state_tensors`` returned (onto the devices of the current state's params)."""
        self.t = int(tensors["step"])
        for n in self.state:
            self.state[n] = {
                key.rsplit("/", 1)[1]: v.clone() for key, v in tensors.items() if key.rsplit("/", 1)[0] == n
            }
