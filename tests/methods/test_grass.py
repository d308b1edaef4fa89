"""dg.GraSS: a preset of the gradient engine with a mask → SparseJL compressor and two back ends."""

from __future__ import annotations

import pytest
import torch

import dunegrass as dg
from dunegrass.compress import Identity, SelectiveMask, SelectiveMaskConfig, describe
from dunegrass.errors import ConfigMismatchError, DunegrassError
from dunegrass.gradients import per_sample_gradients
from dunegrass.methods.grass import GraSS, GraSSTRAK

FAST = SelectiveMaskConfig(max_steps=40)


def test_random_grass_is_the_engine_with_the_grass_spec(tiny_classification):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    grass = GraSS(model, task, k=16, progress=False).fit(train)
    assert grass.featurizers[0].spec() == "mask:64>sjlt:16"
    engine = dg.GradientInfluence(model, task, compressor="mask:64>sjlt:16", progress=False).fit(train)
    scores = grass.score(test)
    assert scores.values.shape == (7, 40) and scores.method == "grass"
    torch.testing.assert_close(scores.values, engine.score(test).values, rtol=0, atol=0)
    torch.testing.assert_close(grass.self_scores().values, engine.self_scores().values, rtol=0, atol=0)


def test_scores_track_uncompressed_influence(tiny_classification):
    model, train, test = tiny_classification  # 83 parameters
    task = dg.ClassificationTask()
    exact = dg.GradientInfluence(model, task, progress=False).fit(train).score(test).values.flatten()

    def corr(k: int) -> float:
        approx = GraSS(model, task, k=k, progress=False).fit(train).score(test).values.flatten()
        return float(torch.corrcoef(torch.stack([exact, approx]))[0, 1])

    assert corr(64) > 0.9 and corr(16) < corr(64)  # closer to the uncompressed scores as k grows


def test_mask_size_defaults_to_4k_and_is_capped(tiny_classification):
    model, train, _ = tiny_classification
    task = dg.ClassificationTask()
    assert GraSS(model, task, k=8, progress=False).featurizers[0].spec() == "mask:32>sjlt:8"
    capped = GraSS(model, task, k=32, progress=False).featurizers[0].compressors[0]  # 4k = 128 > d = 83
    assert isinstance(capped.stages[0], Identity)  # keeping every coordinate: no mask to apply or learn
    assert GraSS(model, task, k=32, mask="selective", progress=False).featurizers[0].spec() == "identity:83>sjlt:32"
    # Per parameter, blocks smaller than k (the biases: 8 and 3 coordinates) keep their size.
    per_parameter = GraSS(model, task, k=4, per_parameter=True, progress=False).featurizers[0].compressors
    blocks = [describe(c) for c in per_parameter]  # 4k = 16 kept of 48, 8, 24 and 3 coordinates
    assert blocks == ["mask:16>sjlt:4", "identity:8>sjlt:4", "mask:16>sjlt:4", "identity:3>sjlt:3"]


def test_arguments_after_the_task_are_keywords(tiny_classification):
    model, _, _ = tiny_classification
    with pytest.raises(TypeError):  # a positional backend would bypass the TRAK class
        GraSS(model, dg.ClassificationTask(), 16, "random", None, "trak")


def test_trak_backend(tiny_classification):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    grass = GraSS(model, task, k=16, backend="trak", progress=False)
    assert isinstance(grass, GraSSTRAK) and isinstance(grass, GraSS) and isinstance(grass, dg.TRAK)
    trak = dg.TRAK(model, task, compressor="mask:64>sjlt:16", progress=False).fit(train)
    torch.testing.assert_close(grass.fit(train).score(test).values, trak.score(test).values, rtol=0, atol=0)
    assert grass.describe()["backend"] == "trak"
    with pytest.raises(DunegrassError, match="ClassificationTask"):
        GraSS(model, dg.CausalLMTask(), backend="trak")


def test_selective_mask_is_learned_on_per_example_gradients_and_cached(tiny_classification, tmp_path, monkeypatch):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    grass = GraSS(model, task, k=8, mask="selective", mask_size=24, mask_examples=30, mask_config=FAST, progress=False)
    scores = grass.fit(train, cache_dir=tmp_path).score(test)
    assert scores.method == "grass-selective"
    mask = grass.featurizers[0].compressors[0].stages[0]
    assert isinstance(mask, SelectiveMask) and mask.fitted and mask.out_dim == 24

    # The same mask from SelectiveMask.fit on the per-example gradients of the same 30 examples.
    chosen = torch.randperm(40, generator=torch.Generator().manual_seed(dg.seeding.derive_seed(0, 0, 0x6D61736B)))
    chosen = chosen[:30]
    obj = lambda m, b: task.loss(task.outputs(m, b), b)  # noqa: E731
    grads = per_sample_gradients(model, obj, (train[0][chosen], train[1][chosen]), grass.featurizers[0].params)
    again = SelectiveMask(83, 24, seed=mask.seed).fit(grads, config=FAST)
    assert torch.equal(again.indices, mask.indices)

    # A second run reuses the cached mask instead of learning it again; other settings are refused.
    monkeypatch.setattr(SelectiveMask, "fit", lambda *a, **k: pytest.fail("the cached mask was not reused"))
    reused = GraSS(model, task, k=8, mask="selective", mask_size=24, mask_examples=30, mask_config=FAST, progress=False)
    torch.testing.assert_close(reused.fit(train, cache_dir=tmp_path).score(test).values, scores.values)
    other = GraSS(model, task, k=8, mask="selective", mask_size=24, mask_examples=20, mask_config=FAST, progress=False)
    with pytest.raises(ConfigMismatchError, match="another configuration"):
        other.fit(train, cache_dir=tmp_path)
    # Masks learned for other parameters of the same size, or for another task, are refused too.
    for kwargs in ({"params": ["0.weight"]}, {"task": dg.ClassificationTask(measurement="margin")}):
        settings = {"task": task, **kwargs}
        other = GraSS(model, k=4, mask="selective", mask_size=12, mask_examples=30, mask_config=FAST, **settings)
        with pytest.raises(ConfigMismatchError, match="selective masks cached"):
            other.fit(train, cache_dir=tmp_path)

    # The same object fitted into a new cache_dir writes its masks there too.
    reused.fit(train, cache_dir=tmp_path / "second")
    assert SelectiveMask.load(tmp_path / "second" / "ckpt-0" / "masks" / "0").indices.equal(mask.indices)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"backend": "exact"}, "backend must be one of"),
        ({"mask": "learned"}, "mask must be one of"),
        ({"k": 16, "mask_size": 8}, "k <= mask_size"),
        ({"k": 100}, "larger than the input dimension 83"),
        ({"mask": "selective", "k": 4, "mask_examples": 5}, "at least 10"),
    ],
)
def test_bad_settings(tiny_classification, kwargs, match):
    model, _, _ = tiny_classification
    with pytest.raises(DunegrassError, match=match):
        GraSS(model, dg.ClassificationTask(), progress=False, **kwargs)


def test_refitting_relearns_the_mask_only_for_other_data(tiny_classification, monkeypatch):
    model, train, _ = tiny_classification
    task = dg.ClassificationTask()
    grass = GraSS(model, task, k=8, mask="selective", mask_size=24, mask_examples=30, mask_config=FAST, progress=False)
    grass.fit(train)
    calls, original = [], SelectiveMask.fit
    monkeypatch.setattr(SelectiveMask, "fit", lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))
    grass.fit(train)
    assert calls == []  # same data and weights: the learned mask is kept
    grass.fit((train[0].flip(0), train[1].flip(0)))
    assert calls == [1]
