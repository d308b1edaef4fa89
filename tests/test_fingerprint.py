"""Fingerprints tie caches to their data: a change anywhere in the data must change them."""

from __future__ import annotations

import torch

from dunegrass.fingerprint import data_fingerprint


def test_a_change_in_the_middle_of_in_memory_data_is_seen():
    x, y = torch.randn(300, 4), torch.arange(300)
    changed = x.clone()
    changed[150, 2] += 1.0
    assert data_fingerprint((x, y)) == data_fingerprint((x.clone(), y.clone()))
    assert data_fingerprint((x, y)) != data_fingerprint((changed, y))
    assert data_fingerprint({"x": x}) != data_fingerprint({"x": changed})


def test_datasets_are_sampled_across_their_length():
    x, y = torch.randn(3000, 4), torch.arange(3000)
    picks = torch.linspace(0, 2999, 1024).round().long()
    changed = x.clone()
    changed[picks[512], 0] += 1.0  # an example in the middle that the sample reads
    dataset = torch.utils.data.TensorDataset
    assert data_fingerprint(dataset(x, y)) == data_fingerprint(dataset(x.clone(), y))
    assert data_fingerprint(dataset(x, y)) != data_fingerprint(dataset(changed, y))
