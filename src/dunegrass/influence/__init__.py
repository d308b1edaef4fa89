"""Influence back end: block eFIM preconditioner, chunked scoring, exact Hessian influence."""

from .exact import damped_hessian, flat_parameters
from .preconditioner import BlockPreconditioner, check_fisher_memory
from .scoring import pairwise_scores, self_influence

__all__ = [
    "BlockPreconditioner",
    "check_fisher_memory",
    "damped_hessian",
    "flat_parameters",
    "pairwise_scores",
    "self_influence",
]
