"""``damping="auto"``: each Fisher block's damping chosen from the training features alone, without retraining.

The rule: held-out Gaussian log-likelihood. The features φ_i of a block are taken as draws from N(0, F + λI);
the training examples are split in two halves (even and odd rows), F is estimated on one half and λ is
the one under which the other half is most likely, both ways round:

    ℓ(λ) = Σ_(A,B) −½ [ log det(F_A + λI) + tr((F_A + λI)⁻¹ F_B) ],

which in F_A's eigenbasis (s_j, u_j) is −½ Σ_j [log(s_j + λ) + u_jᵀF_B u_j / (s_j + λ)]: two eigen-
decompositions per block, then O(k) per candidate. The candidates are λ = r · tr(F)/k for r on a log grid,
so the result is a relative damping like the fixed one. The rule sees how well the Fisher is estimated
from n examples in k dimensions (k near or above n asks for more damping); it does not see the
curvature that the Fisher leaves out, which is why benchmarks/damping.py measures it against a sweep.
"""

from __future__ import annotations

import torch
from torch import Tensor

# λ / (tr(F)/k) candidates: 1e-4 … 10, five per decade
RATIOS = torch.logspace(-4, 1, 26, dtype=torch.float64)
FALLBACK = 0.1  # an all-zero block (a layer the loss never reaches)


def held_out_log_likelihood(fit: Tensor, held: Tensor, lams: Tensor) -> Tensor:
    """``[len(lams)]``: −½[log det(fit + λI) + tr((fit + λI)⁻¹ held)] for each λ (float64 matrices)."""
    s, u = torch.linalg.eigh(fit)
    s = s.clamp_min(0)
    d = ((u.T @ held) * u.T).sum(1)  # u_jᵀ held u_j
    denom = s[None, :] + lams[:, None]
    return -0.5 * (denom.log().sum(1) + (d[None, :] / denom).sum(1))


def choose_ratio(gram_even: Tensor, n_even: int, gram_odd: Tensor, n_odd: int) -> float:
    """The relative damping r (λ = r · tr(F)/k) that maximises the two-way held-out log-likelihood of a block,
    from the Gram matrices ΦᵀΦ of its even and odd training rows."""
    fa = gram_even.to(torch.float64) / max(n_even, 1)
    fb = gram_odd.to(torch.float64) / max(n_odd, 1)
    k = fa.shape[0]
    mean_eig = float(torch.trace(gram_even.to(torch.float64) + gram_odd.to(torch.float64))) / max(n_even + n_odd, 1) / k
    if not mean_eig > 0 or n_even < 1 or n_odd < 1:
        return FALLBACK
    lams = RATIOS.to(fa.device) * mean_eig
    score = held_out_log_likelihood(fa, fb, lams) + held_out_log_likelihood(fb, fa, lams)
    return float(RATIOS[int(score.argmax())])
