"""``damping="auto"``: each Fisher block's damping from the shape of its features, without retraining.

The rule: λ_l = tr(F_l) / min(n, k_l), the mean of the block's nonzero eigenvalues when its features have
full rank (n training examples in general position span min(n, k_l) of its k_l directions; features with
linear dependencies — e.g. an output bias, whose gradients sum to zero over the classes — span fewer, and
λ is then that much below the mean). As a relative damping (λ = r · tr(F)/k, the fixed knob's scale) it is
r = k_l / min(n, k_l): 1 when the examples outnumber the dimensions, k/n when they do not. kronfluence's
rule, 0.1 × the mean eigenvalue, averages over all k_l eigenvalues, zeros included, so it damps less the
more dimensions the examples leave empty; this one does not depend on them.

Why this scale (benchmarks/damping.py, LDS against subset retraining on the built-in tasks): the best fixed
relative damping moves with k/n — on the digits MLP and CNN (500 examples) from r ≈ 1 at k = 256 to r ≈ 3
at k = 2048, on the MNIST-1D MLP (1000) from 0.3 to 1, and to r ≈ 10–100 on the 128-example LM task — and
this rule follows it, within 0.01 of the sweep's best on 18 of 24 task × method pairs (every one-block and
per-layer vision pair, the LM's per-layer blocks). It under-damps a single whole-model block on the LM
(0.03–0.05 below the best) and one block per parameter tensor on the digits MLP, the CNN and the LM
(0.010–0.022). The rule measured first and set aside, the held-out Gaussian log-likelihood of the features,
chose r ≈ 10⁻⁴–0.4: it sees how well F is estimated, not how far the retrained model is from θ₀. (E)K-FAC
keep a numeric damping: their Kronecker eigenvalues fill every direction, so the premise does not hold.
"""

from __future__ import annotations

from ..errors import DunegrassError

AUTO_RULE = "tr/min(n,k)"  # names the rule in the Fisher cache's key, so a change of rule refits the factors


def auto_ratio(n: int, k: int) -> float:
    """The relative damping r of a k-dimensional block fitted on n examples: λ = r · tr(F)/k = tr(F)/min(n, k)."""
    if n < 1 or k < 1:
        raise DunegrassError(f"a Fisher block needs n >= 1 examples and k >= 1 dimensions, got n={n}, k={k}")
    return k / min(n, k)
