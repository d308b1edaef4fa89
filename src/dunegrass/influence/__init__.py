"""Influence back end: block eFIM preconditioner (blocks on disk), streamed scoring, exact Hessian influence."""

from .exact import damped_hessian, flat_parameters
from .preconditioner import BlockPreconditioner, check_fisher_memory
from .scoring import stream_scores

__all__ = ["BlockPreconditioner", "check_fisher_memory", "damped_hessian", "flat_parameters", "stream_scores"]
