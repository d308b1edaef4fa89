"""Offline datasets: scikit-learn's digits and breast cancer, and MNIST-1D generated locally.

MNIST-1D comes from ``mnist1d.data.make_dataset(get_dataset_args())``, which generates the data from
templates in the package; ``mnist1d``'s ``get_dataset()`` downloads and is never used.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

Split = tuple[Tensor, Tensor]


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    return (x_train - mu) / sd, (x_test - mu) / sd


def _split(x: np.ndarray, y: np.ndarray, n_train: int, n_test: int, seed: int) -> tuple[Split, Split]:
    perm = np.random.default_rng(seed).permutation(len(x))
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    xtr, xte = _standardize(x[tr].astype(np.float64), x[te].astype(np.float64))
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return (as_t(xtr), torch.tensor(y[tr], dtype=torch.long)), (as_t(xte), torch.tensor(y[te], dtype=torch.long))


def digits(n_train: int = 1000, n_test: int = 300, seed: int = 0) -> tuple[Split, Split]:
    """scikit-learn's 8×8 digits (1797 images, 64 features, 10 classes), standardised."""
    from sklearn.datasets import load_digits

    d = load_digits()
    if n_train + n_test > len(d.target):
        raise ValueError(f"digits has {len(d.target)} examples; asked for {n_train} + {n_test}")
    return _split(d.data, d.target, n_train, n_test, seed)


def digits_as_images(n_train: int = 1000, n_test: int = 300, seed: int = 0) -> tuple[Split, Split]:
    """``digits(n_train, n_test, seed)`` with each example as a ``[1, 8, 8]`` image (standardised per pixel)."""
    (x_train, y_train), (x_test, y_test) = digits(n_train, n_test, seed)
    return (x_train.view(-1, 1, 8, 8), y_train), (x_test.view(-1, 1, 8, 8), y_test)


def digits_images(n_train: int = 1000, n_test: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The raw 8×8 images (0-16) of ``digits(n_train, n_test, seed)``, in the same order, for display."""
    from sklearn.datasets import load_digits

    images = load_digits().images
    perm = np.random.default_rng(seed).permutation(len(images))
    return images[perm[:n_train]], images[perm[n_train : n_train + n_test]]


def breast_cancer(n_train: int = 400, n_test: int = 100, seed: int = 0) -> tuple[Split, Split]:
    """scikit-learn's breast cancer (569 examples, 30 features, 2 classes), standardised."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    return _split(d.data, d.target, n_train, n_test, seed)


def mnist1d(n_train: int = 4000, n_test: int = 1000, seed: int = 0) -> tuple[Split, Split]:
    """MNIST-1D (40 features, 10 classes) generated offline with the package's default arguments."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)
    if n_train > len(d["y"]) or n_test > len(d["y_test"]):
        raise ValueError(f"MNIST-1D has {len(d['y'])} + {len(d['y_test'])} examples; asked for {n_train} + {n_test}")
    x_tr, y_tr = d["x"][:n_train], d["y"][:n_train]
    x_te, y_te = d["x_test"][:n_test], d["y_test"][:n_test]
    x_tr, x_te = _standardize(x_tr.astype(np.float64), x_te.astype(np.float64))
    return (
        (torch.tensor(x_tr, dtype=torch.float32), torch.tensor(y_tr, dtype=torch.long)),
        (torch.tensor(x_te, dtype=torch.float32), torch.tensor(y_te, dtype=torch.long)),
    )


def flip_labels(y: Tensor, fraction: float, num_classes: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Flip ``fraction`` of the labels to another random class: ``(noisy labels, flipped mask)``."""
    gen = torch.Generator().manual_seed(seed)
    n = y.numel()
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=gen)[: int(round(fraction * n))]] = True
    shift = torch.randint(1, num_classes, (n,), generator=gen)
    noisy = torch.where(flipped, (y + shift) % num_classes, y)
    return noisy, flipped
