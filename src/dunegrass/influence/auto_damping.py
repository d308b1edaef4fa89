"""``damping="auto"``: each Fisher block's damping from the shape of its features, without retraining.

The rule: λ_l = tr(F_l) / min(n, k_l), the mean of the block's nonzero eigenvalues (n training examples in
general position span min(n, k_l) directions of its k_l). As a relative damping (λ = r · tr(F)/k, the
fixed knob's scale) that is r = k_l / min(n, k_l): 1 when the examples outnumber the dimensions, k/n when
they do not. kronfluence's rule, 0.1 × the mean eigenvalue, averages over all k_l eigenvalues, zeros
included, so it damps less the more dimensions the examples leave empty; this one does not depend on them.

Why this scale (benchmarks/damping.py, LDS against subset retraining on the built-in tasks): the best fixed
relative damping moves with k/n — on the vision MLPs and the CNN from r ≈ 1 at k = 256 to r ≈ 3 at k = 2048
with 500 examples, and to r ≈ 10–100 on the 128-example LM task — and this rule follows it, within 0.01 of
the sweep's best on 18 of 24 task × method pairs (every one-block and per-layer vision pair, the LM's
per-layer blocks). It under-damps a single whole-model block on the LM (0.03–0.05 below the best) and one
block per parameter tensor (0.01–0.02). The rule measured first and set aside, the held-out Gaussian
log-likelihood of the features, chose r ≈ 10⁻⁴–0.4: it sees how well F is estimated, not how far the
retrained model is from θ₀. (E)K-FAC's Kronecker eigenvalues fill every direction, and there this rule
over-damps, so they keep a numeric damping.
"""

from __future__ import annotations


def auto_ratio(n: int, k: int) -> float:
    """The relative damping r of a k-dimensional block fitted on n examples: λ = r · tr(F)/k = tr(F)/min(n, k)."""
    if n < 1 or k < 1:
        raise ValueError(f"a Fisher block needs n >= 1 examples and k >= 1 dimensions, got n={n}, k={k}")
    return k / min(n, k)
