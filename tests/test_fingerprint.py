"""Fingerprints tie caches to their data, weights, architecture and task: a change anywhere must be seen."""

from __future__ import annotations

import pytest
import torch

import dunegrass as dg
from dunegrass.fingerprint import RowHasher, data_fingerprint, model_fingerprint


def test_a_change_in_the_middle_of_in_memory_data_is_seen():
    x, y = torch.randn(300, 4), torch.arange(300)
    changed = x.clone()
    changed[150, 2] += 1.0
    assert data_fingerprint((x, y)) == data_fingerprint((x.clone(), y.clone()))
    assert data_fingerprint((x, y)) != data_fingerprint((changed, y))
    assert data_fingerprint({"x": x}) != data_fingerprint({"x": changed})


def test_every_example_of_a_dataset_is_hashed_whatever_the_batching():
    x, y = torch.randn(3000, 4), torch.arange(3000)
    changed = x.clone()
    changed[1537, 0] += 1.0  # an example that a sample of 1024 evenly spread rows did not read
    dataset = torch.utils.data.TensorDataset
    assert data_fingerprint(dataset(x, y)) == data_fingerprint(dataset(x.clone(), y), batch_size=7)
    assert data_fingerprint(dataset(x, y)) != data_fingerprint(dataset(changed, y))
    assert (
        RowHasher().update((x[:5], y[:5])).hexdigest()
        == RowHasher().update((x[:2], y[:2])).update((x[2:5], y[2:5])).hexdigest()
    )


class _Table(torch.utils.data.Dataset):
    """A lazily read dataset, as a Hugging Face dataset or a folder of files is."""

    def __init__(self, x, y, fingerprint=None):
        self.x, self.y = x, y
        if fingerprint is not None:
            self._fingerprint = fingerprint

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_a_changed_row_of_a_lazy_dataset_is_an_error_not_a_stale_cache(tmp_path):
    """The cached score of a changed example was +37.5 where a fresh fit gives −55.6, and nothing was said."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2000, 6, generator=gen), torch.randint(0, 3, (2000,), generator=gen)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    task = dg.ClassificationTask()
    build = lambda: dg.GradientInfluence(model, task, compressor="gaussian:16", batch_size=256)  # noqa: E731
    first = build().fit(_Table(x, y), cache_dir=tmp_path).score((x[:2], y[:2])).values
    again = build().fit(_Table(x.clone(), y), cache_dir=tmp_path).score((x[:2], y[:2])).values
    torch.testing.assert_close(again, first)  # the same data reuse the cache
    changed = x.clone()
    changed[1537] += 1.0
    with pytest.raises(dg.ConfigMismatchError, match=r"training examples 1024\.\.1999 differ"):
        build().fit(_Table(changed, y), cache_dir=tmp_path)


def test_a_dataset_that_carries_its_own_fingerprint_is_named_by_it():
    x, y = torch.randn(10, 2), torch.arange(10)
    assert data_fingerprint(_Table(x, y, "abc123")) == "n=10:dataset:abc123"
    assert data_fingerprint(_Table(x, y, "abc123")) != data_fingerprint(_Table(x, y, "def456"))


def test_the_architecture_is_part_of_the_weights_fingerprint(tmp_path):
    """Tanh → ReLU keeps every tensor of the state dict and changes every score."""
    torch.manual_seed(0)
    tanh = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    relu = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    relu.load_state_dict(tanh.state_dict())
    assert model_fingerprint(tanh) != model_fingerprint(relu)
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    dg.GradientInfluence(tanh, dg.ClassificationTask()).fit((x, y), cache_dir=tmp_path)
    with pytest.raises(dg.ConfigMismatchError, match="weights"):
        dg.GradientInfluence(relu, dg.ClassificationTask()).fit((x, y), cache_dir=tmp_path)


class _ScaledLoss(dg.ClassificationTask):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def loss(self, outputs, batch):
        return self.scale * super().loss(outputs, batch)


def test_a_tasks_settings_are_part_of_its_config(tmp_path):
    assert _ScaledLoss(1.0).config() != _ScaledLoss(2.0).config()
    assert _ScaledLoss(2.0).config()["scale"] == 2.0 and _ScaledLoss(2.0).config()["task"] == "_ScaledLoss"
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    dg.GradientInfluence(model, _ScaledLoss(1.0)).fit((x, y), cache_dir=tmp_path)
    with pytest.raises(dg.ConfigMismatchError, match="scale"):
        dg.GradientInfluence(model, _ScaledLoss(2.0)).fit((x, y), cache_dir=tmp_path)


def test_after_deleting_the_stale_features_the_fisher_is_recomputed_too(tmp_path):
    """The error says to delete the cache; deleting only its features must not leave a stale Fisher in use."""
    import shutil

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(100, 6, generator=gen), torch.randint(0, 3, (100,), generator=gen)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    task = dg.ClassificationTask()
    build = lambda: dg.GradientInfluence(model, task, compressor="gaussian:16", shard_size=50)  # noqa: E731
    build().fit(_Table(x, y), cache_dir=tmp_path)
    changed = x * 2
    with pytest.raises(dg.ConfigMismatchError, match="differ"):
        build().fit(_Table(changed, y), cache_dir=tmp_path)
    shutil.rmtree(tmp_path / "ckpt-0" / "train")
    cached = build().fit(_Table(changed, y), cache_dir=tmp_path).score((x[:3], y[:3])).values
    fresh = build().fit(_Table(changed, y)).score((x[:3], y[:3])).values
    torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-6 * fresh.abs().max().item())


def test_selective_masks_are_relearned_when_a_lazy_dataset_changes(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(60, 6, generator=gen), torch.randint(0, 3, (60,), generator=gen)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    grass = dg.GraSS(model, dg.ClassificationTask(), k=4, mask="selective", mask_size=12, mask_examples=30)
    learned = []
    original = grass._mask_gradients
    monkeypatch.setattr(grass, "_mask_gradients", lambda *a: learned.append(1) or original(*a))
    grass.fit(_Table(x, y))
    grass.fit(_Table(x.clone(), y))  # the same examples: the masks learned in memory are kept
    assert len(learned) == 1
    grass.fit(_Table(x * 3, y))  # same length and type, other examples
    assert len(learned) == 2


def test_text_columns_and_the_hashers_independence_from_batching():
    rows = RowHasher().update({"text": ["a", "b", "c"], "ids": torch.arange(3)}).hexdigest()
    split = RowHasher().update({"text": ["a"], "ids": torch.arange(1)})
    assert rows == split.update({"text": ["b", "c"], "ids": torch.arange(1, 3)}).hexdigest()
    assert rows != RowHasher().update({"text": ["a", "B", "c"], "ids": torch.arange(3)}).hexdigest()


def test_task_settings_that_are_functions_or_objects_key_a_cache_the_same_in_every_process():
    class WithFunction(dg.ClassificationTask):
        def __init__(self):
            super().__init__()
            self.criterion = torch.nn.functional.cross_entropy
            self.helper = object()

    config = WithFunction().config()
    assert config["criterion"] == "torch.nn.functional.cross_entropy" and "0x" not in str(config)


def test_the_weights_signature_follows_content_not_version_counters(device):
    """It is what every score checks against its fit: stable for unchanged weights, moved by an edit made
    through .data (no version counter moves), by a permutation (same sum and norm) and by a buffer."""
    from dunegrass.fingerprint import weights_signature

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4)).to(device)
    signature = weights_signature(model)
    assert weights_signature(model) == signature and len(signature) == 3 * 6  # 2 + 2 parameters, 2 float buffers
    weight = model[0].weight
    for edit in (
        lambda: weight.data.__setitem__((1, 2), weight.data[1, 2] + 1e-3),
        lambda: weight.data.copy_(weight.data[[1, 0, 2, 3]]),
        lambda: model[1].running_mean.add_(0.5),
    ):
        before = weights_signature(model)
        with torch.no_grad():
            edit()
        assert weights_signature(model) != before


def test_the_weights_signature_is_thread_independent_and_takes_any_tensor():
    """Found in review: a wide row was reduced by several threads (another thread count, a false refusal); a
    NaN never equalled itself (always refused); an empty first dimension crashed; a bf16 edit of 1 % was
    rounded away."""
    from dunegrass.fingerprint import weights_signature

    torch.manual_seed(0)
    model = torch.nn.Linear(16, 50_000)  # its bias: one row of 50k
    model.register_buffer("nan", torch.tensor([float("nan"), float("inf"), -float("inf")]))
    model.register_buffer("empty", torch.empty(0, 8))
    threads = torch.get_num_threads()
    signature = weights_signature(model)
    try:
        torch.set_num_threads(1)
        assert weights_signature(model) == signature
    finally:
        torch.set_num_threads(threads)
    half = torch.nn.Linear(1024, 512).bfloat16()
    for row in range(5):
        before = weights_signature(half)
        with torch.no_grad():
            half.weight[row * 100, row * 7] *= 1.01
        assert weights_signature(half) != before
