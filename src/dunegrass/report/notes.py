"""What the scores mean: the sign convention and why each method's scores have their own scale."""

from __future__ import annotations

from collections.abc import Sequence

from .page import esc

SIGN_NOTE = (
    "A positive score means training on that example helps the query (lowers its loss or raises its "
    "measurement): a proponent. A negative score means it hurts the query: an opponent."
)

SCALE_NOTE = (
    "Scores of different methods are on different scales, often orders of magnitude apart, because each "
    "measures something different (below): a preconditioner divides by the curvature (its damping sets how "
    "much), a covariance is in units of loss², a plain dot product grows with the gradients' norms. Compare "
    "ranks across methods and values within one; LDS uses only the order."
)

SIGNIFICANCE_NOTE = (
    "± is a standard error (Daunce: scores are sample covariances over its K perturbed models; the Bayesian "
    "influence function: batch means over its SGLD chains); "
    "★ marks a score more than two standard errors from zero."
)

# Keyed by the canonical method name (Attributor.method_name, the ``method`` of a run config).
_SCALES = {
    "trak": "projected gradients of the correct class's log-odds, weighted by the inverse of their second-moment "
    "matrix over the training set and by 1 − p, averaged over independently trained checkpoints.",
    "tracin": "a plain dot product of the loss gradients, g_zᵀ g_i, with no preconditioner: its size is that of "
    "the squared gradients, large for examples the model gets wrong.",
    "gradient": "an inverse-Fisher-weighted gradient product, φ_zᵀ (F + λI)⁻¹ φ_i, in a randomly projected "
    "gradient space (F: the damped empirical Fisher of the projected gradients).",
    "grass": "the same inverse-Fisher-weighted product as gradient influence, in a space made by a random "
    "mask of coordinates then a sparse projection.",
    "factgrass": "the same inverse-Fisher-weighted product, with each layer's gradient compressed through its "
    "input and output factors (a mask, then a sparse projection).",
    "logra": "the same inverse-Fisher-weighted product, with each layer's gradient projected to a low rank "
    "through its input and output factors.",
    "exact": "g_zᵀ (H + λI)⁻¹ g_i with the full (Gauss-Newton) Hessian: about n times the change of the "
    "query's loss if the example were left out.",
    "daunce": "a covariance, across K models fine-tuned on random subsets with perturbed objectives, between "
    "the example's loss and the query's: units of loss², with a standard error that shrinks as 1/√K.",
    "grass-trak": "TRAK's score in GraSS's sparse projection space.",
    "bif": "a covariance, across SGLD draws from a posterior localised at the trained weights, between the "
    "example's loss and the query's: about g_zᵀ(nβH + γI)⁻¹g_i, units of loss², with a standard error from "
    "the spread between chains.",
}

_ALIASES = {"gradientinfluence": "gradient", "exactinfluence": "exact", "bayesianinfluence": "bif"}


def canonical_method(name: str) -> str:
    """``"GradientInfluence"``, ``"gradient"`` → ``"gradient"``; ``"Daunce (LoRA)"`` → ``"daunce"``."""
    key = name.split("(")[0].strip().lower().removesuffix("-selective")
    return _ALIASES.get(key, key)


def scale_note(method: str) -> str | None:
    """One sentence on what ``method``'s score is, or None for a method this module does not know."""
    return _SCALES.get(canonical_method(method))


def scores_note(methods: Sequence[str], with_stderr: bool) -> str:
    """What the scores mean (sign, scale, each method's score) as a boxed note."""
    items = "".join(f"<li><b>{esc(m)}</b>: {esc(scale_note(m))}</li>" for m in methods if scale_note(m))
    parts = [f"<p>{esc(SIGN_NOTE)}</p>", f"<p>{esc(SCALE_NOTE)}</p>"]
    if items:
        parts.append(f"<ul>{items}</ul>")
    if with_stderr:
        parts.append(f"<p>{esc(SIGNIFICANCE_NOTE)}</p>")
    return f'<h2>Reading the scores</h2><div class="note">{"".join(parts)}</div>'
