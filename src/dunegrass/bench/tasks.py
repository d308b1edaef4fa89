"""Built-in benchmark tasks: data, a model trained to θ₀, and the training recipe for ground truth.

All offline: scikit-learn digits (logistic regression, an MLP, and a small BatchNorm CNN on the 8×8
images) and MNIST-1D (MLP 40-256-256-10).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..task import ClassificationTask, Task
from ..train import EnsembleTrainer, Member, TrainConfig
from ..train.ensemble import load_member
from ..train.newton import load_flat, newton_fit
from . import data as datasets
from .models import cnn, logistic_regression, mlp


@dataclass
class BenchmarkTask:
    name: str
    model: nn.Module  # trained to θ₀ on ``train``
    task: Task
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    train_config: TrainConfig  # recipe for θ₀ and for every ground-truth retraining
    l2: float = 0.0
    extra: dict = field(default_factory=dict)

    def accuracy(self) -> float:
        with torch.no_grad():
            x, y = self.test
            return float((self.model(x).argmax(1) == y).float().mean())


def train_model(model: nn.Module, task: Task, train, config: TrainConfig, seed: int = 0) -> nn.Module:
    """Train ``model`` in place on all of ``train`` with ``config`` (the ensemble trainer with one member).

    Trains in train mode (BatchNorm normalises with batch statistics and updates its running
    statistics, which are copied into the model with the parameters) and returns the model in eval
    mode, the mode θ₀ is explained and measured in.
    """
    n = len(train[0])
    trained = EnsembleTrainer(model, task, config, train_mode=True).train(train, [Member(torch.arange(n), seed)])
    return load_member(model, trained, 0).eval()


def digits_mlp(
    n_train: int = 1000, n_test: int = 200, hidden: int = 128, epochs: float = 30.0, seed: int = 0
) -> BenchmarkTask:
    """Digits, MLP 64-hidden-10 trained with Adam."""
    train, test = datasets.digits(n_train, n_test, seed)
    config = TrainConfig(optimizer="adam", lr=3e-3, epochs=epochs, batch_size=64, weight_decay=1e-4)
    task = ClassificationTask()
    model = train_model(mlp(64, [hidden], 10, seed), task, train, config, seed)
    return BenchmarkTask("digits-mlp", model, task, train, test, config)


def digits_logreg(n_train: int = 1000, n_test: int = 200, l2: float = 1e-2, seed: int = 0) -> BenchmarkTask:
    """Digits, L2-regularised multinomial logistic regression minimised exactly (Newton)."""
    train, test = datasets.digits(n_train, n_test, seed)
    task = ClassificationTask()
    model = logistic_regression(64, 10, seed)
    load_flat(model, newton_fit(model, task, train, torch.ones(1, n_train), l2)[0])
    config = TrainConfig(optimizer="adam", lr=1e-2, epochs=100.0, batch_size=128, weight_decay=l2)
    return BenchmarkTask("digits-logreg", model, task, train, test, config, l2=l2)


def digits_cnn(n_train: int = 1000, n_test: int = 200, epochs: float = 20.0, seed: int = 0) -> BenchmarkTask:
    """Digits as ``[N, 1, 8, 8]`` images, the BatchNorm CNN of ``models.cnn`` (3 842 parameters, small
    enough for exact influence's full Hessian) trained with Adam in train mode and used in eval mode."""
    train, test = datasets.digits_as_images(n_train, n_test, seed)
    config = TrainConfig(optimizer="adam", lr=3e-3, epochs=epochs, batch_size=64, weight_decay=1e-4)
    task = ClassificationTask()
    model = train_model(cnn(seed=seed), task, train, config, seed)
    return BenchmarkTask("digits-cnn", model, task, train, test, config)


def mnist1d_mlp(n_train: int = 4000, n_test: int = 500, epochs: float = 40.0, seed: int = 0) -> BenchmarkTask:
    """MNIST-1D, MLP 40-256-256-10 trained with Adam."""
    train, test = datasets.mnist1d(n_train, n_test, seed)
    config = TrainConfig(optimizer="adam", lr=1e-3, epochs=epochs, batch_size=128, weight_decay=1e-4)
    task = ClassificationTask()
    model = train_model(mlp(40, [256, 256], 10, seed), task, train, config, seed)
    return BenchmarkTask("mnist1d-mlp", model, task, train, test, config)


TASKS: dict[str, Callable[..., BenchmarkTask]] = {
    "digits-mlp": digits_mlp,
    "digits-logreg": digits_logreg,
    "digits-cnn": digits_cnn,
    "mnist1d-mlp": mnist1d_mlp,
}
