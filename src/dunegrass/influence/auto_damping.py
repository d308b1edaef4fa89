"""``damping="auto"``: the Fisher blocks' damping from the shape of the features, without retraining.

The rule: one relative damping for every block (λ_l = r · tr(F_l)/k_l, the fixed knob's scale),
r = Σ_l k_l / Σ_l min(n, k_l) — the model's compressed dimensions over the most of them n training
examples can span. With one block, λ = tr(F)/min(n, k) is the mean of the Fisher's nonzero eigenvalues
when the features have full rank (features with linear dependencies — e.g. an output bias, whose gradients
sum to zero over the classes — span fewer, and λ is then that much below their mean); r is 1 when the
examples outnumber the dimensions and k/n when they do not. kronfluence's rule, 0.1 × the mean
eigenvalue, averages over all k eigenvalues, zeros included, so it damps less the more dimensions the
examples leave empty; this one does not depend on them. One r for all blocks, rather than each block's own
k_l / min(n, k_l), keeps the blocks' relative weights what they are under any fixed damping: per-block ratios
damp small blocks (biases, norms) less than large ones, which cost 0.010–0.022 LDS with one block per
parameter tensor.

Why this scale (benchmarks/damping.py, LDS against subset retraining on the built-in tasks): the best fixed
relative damping moves with k/n — on the digits MLP and CNN (500 examples) from r ≈ 1 at k = 256 to r ≈ 3–5 at
k = 2048, on the MNIST-1D MLP (1000) from 0.5 to 2, and to r ≈ 10–50 on the 128-example LM task — and this
rule follows it, within 0.01 of the sweep's best on 21 of 24 task × method pairs. It under-damps a single
block over the whole LM (0.04–0.05 below the best), consistent with the LM's short fine-tune (64 Adam steps
from pretrained weights, which leave its flat directions unlearnt) setting a damping that no rule tried here
reads from the features: fine-tuned four times as long, the LM's best r falls 2–7× while its features barely
change, and auto is within 0.01 on 5 of its 6 layouts (0.012 on the sixth). (21 of 24 is on the pairs the rule
was chosen on.) Out of sample it fails the other way: the MNIST-1D MLP trained 5 epochs instead of 20 wants
2.5–10× more damping and auto (which depends on n and k only) falls 0.03–0.08 below the best on 5 of 6 layouts
— the damping that predicts retraining is set by how far training went, which no rule tried here reads from
the features at θ₀.
Rules measured and set aside: the held-out Gaussian log-likelihood of the features (r ≈ 10⁻⁴–0.4: it sees
how well F is estimated, not how far retraining moves), and r set so that the damped Fisher keeps 1/8 of its
rank in effective degrees of freedom, Σ μ/(μ + λ) = Σ min(n, k_l)/8 (right on the LM's single block,
0.012–0.051 below the best on three of the MNIST-1D MLP's six layouts and 0.011 on the CNN's per-tensor
blocks, and over-damping the LM fine-tuned four times as long), and r set so that the mean predicted
leave-one-out loss rise, Σ μ/(μ + λ)/n, equals the held-out minus training loss at θ₀ (it moves with training
the right way, but the r it implies does not follow the compression: 4 of 36 pairs,
benchmarks/damping_gap.py). (E)K-FAC keep a numeric damping: their
Kronecker eigenvalues fill every direction, so the premise does not hold.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import DunegrassError

# names the rule in the Fisher cache's key, so a change of rule refits the factors
AUTO_RULE = "sum(k)/sum(min(n,k)), one ratio for all blocks"


def auto_ratio(n: int, ks: Sequence[int]) -> float:
    """The relative damping r of blocks of ``ks`` dimensions fitted on n examples: Σ k / Σ min(n, k)."""
    if n < 1 or not ks or min(ks) < 1:
        raise DunegrassError(f"a Fisher block needs n >= 1 examples and k >= 1 dimensions, got n={n}, ks={list(ks)}")
    return sum(ks) / sum(min(n, k) for k in ks)
