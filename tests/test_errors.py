"""Bad input gets a clear error that names the problem and the fix."""

import pytest
import torch

import dunegrass as dg


def test_empty_dataset(tiny_classification):
    model, _, _ = tiny_classification
    empty = (torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
    with pytest.raises(dg.DunegrassError, match="dataset is empty"):
        dg.TracIn(model, dg.ClassificationTask()).fit(empty)


def test_shape_mismatch_between_model_and_batch(tiny_classification):
    model, _, _ = tiny_classification
    bad = (torch.zeros(5, 7), torch.zeros(5, dtype=torch.long))
    with pytest.raises(dg.DunegrassError, match=r"inputs of shape \(2, 7\).*expected input shape"):
        dg.TracIn(model, dg.ClassificationTask()).fit(bad)


def test_dtype_mismatch_between_model_and_batch(tiny_classification):
    model, _, _ = tiny_classification
    bad = (torch.zeros(5, 6, dtype=torch.float64), torch.zeros(5, dtype=torch.long))
    with pytest.raises(dg.DunegrassError, match="dtype torch.float64.*dtype"):
        dg.TracIn(model, dg.ClassificationTask()).fit(bad)


def test_non_finite_loss(tiny_classification):
    model, (x, y), _ = tiny_classification
    x = x.clone()
    x[1] = float("nan")
    with pytest.raises(dg.NonFiniteError, match=r"training loss is NaN or infinite for example\(s\) \[1\]"):
        dg.TracIn(model, dg.ClassificationTask()).fit((x, y))


def test_float_labels(tiny_classification):
    model, (x, y), _ = tiny_classification
    with pytest.raises(dg.DunegrassError, match=r"integer class labels.*labels.long\(\)"):
        dg.TracIn(model, dg.ClassificationTask()).fit((x, y.float()))


def test_examples_must_line_up():
    with pytest.raises(dg.DunegrassError, match="share their first"):
        dg.TensorData((torch.zeros(4, 2), torch.zeros(5)))


def test_k_larger_than_the_input_dimension(tiny_classification):
    model, train, _ = tiny_classification
    with pytest.raises(dg.DunegrassError, match="k = 1000 is larger than the input dimension 83"):
        dg.GradientInfluence(model, dg.ClassificationTask(), compressor="gaussian:1000")


def test_unknown_compressor_and_measurement():
    with pytest.raises(dg.DunegrassError, match="unknown compressor 'gauss'.*gaussian"):
        dg.compressor("gauss:16", 100)
    with pytest.raises(dg.DunegrassError, match="unknown measurement 'acc'"):
        dg.ClassificationTask(measurement="acc")


def test_bad_options(tiny_classification):
    model, _, _ = tiny_classification
    task = dg.ClassificationTask()
    with pytest.raises(dg.DunegrassError, match="damping must be positive"):
        dg.GradientInfluence(model, task, damping=0.0)
    with pytest.raises(dg.DunegrassError, match="task must be a dunegrass Task"):
        dg.TracIn(model, object())
    with pytest.raises(dg.DunegrassError, match="call fit"):
        dg.TracIn(model, task).self_scores()
    with pytest.raises(dg.DunegrassError, match="optimizer must be one of"):
        dg.TrainConfig(optimizer="lbfgs")


def test_a_fisher_block_too_large_fails_when_the_method_is_built():
    """Blocks are inverted one group at a time, so 40 layers of 16384² (80 GiB in all) are fine; one block
    of 32768² (8 GiB of float64) is refused before any gradient is computed, with the fixes."""
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(40)])
    task = dg.ClassificationTask()
    dg.FactGraSS(model, task, k=16384, mask_size=(256, 256))
    wide = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    with pytest.raises(dg.DunegrassError, match=r"32768 x 32768 \(8\.0 GiB in float64\).*smaller k"):
        dg.GraSS(wide, task, k=32768, mask_size=65536)
    dg.GraSS(wide, task, k=32768, mask_size=65536, damping=None)  # dot products need no Fisher
