"""Built-in, offline benchmark tasks and data."""

from .tasks import TASKS, BenchmarkTask, digits_cnn, digits_logreg, digits_mlp, mnist1d_mlp, train_model

__all__ = ["TASKS", "BenchmarkTask", "digits_cnn", "digits_logreg", "digits_mlp", "mnist1d_mlp", "train_model"]
