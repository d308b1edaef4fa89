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
    model, train, _ = tiny_classification
    bad = (torch.zeros(5, 7), torch.zeros(5, dtype=torch.long))
    with pytest.raises(dg.DunegrassError, match=r"inputs of shape \(2, 7\).*expected input shape"):
        dg.TracIn(model, dg.ClassificationTask()).fit(bad)
    # queries too: the shape was one example's (inside vmap) before they got the plain pass
    fitted = dg.GraSS(model, dg.ClassificationTask(), k=16).fit(train)
    with pytest.raises(dg.DunegrassError, match=r"inputs of shape \(2, 7\).*expected input shape"):
        fitted.score(bad)


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
    with pytest.raises(dg.DunegrassError, match="damping must be a positive finite number"):
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


@pytest.mark.parametrize(
    "labels, match",
    [
        (lambda y: y + 3, r"labels must lie in \[0, 3\) for a model with 3 outputs; got [345]\.\.[345]"),
        (lambda y: torch.where(y == 0, -1, y), r"labels must lie in \[0, 3\).*-1\.\.2.*-100 to ignore"),
        (lambda y: torch.nn.functional.one_hot(y, 3), r"class indices of shape \[B\].*one-hot.*argmax\(1\)"),
    ],
)
def test_labels_that_do_not_fit_the_model(tiny_classification, labels, match):
    """Cross-entropy raised a raw RuntimeError (on a GPU: a device-side assert that kills the process)."""
    model, (x, y), (xq, yq) = tiny_classification
    task = dg.ClassificationTask()
    for attr in (dg.GradientInfluence(model, task), dg.LoGra(model, task), dg.Daunce(model, task, num_models=2)):
        with pytest.raises(dg.DunegrassError, match=match):
            attr.fit((x, labels(y)))
    good = dg.GradientInfluence(model, task).fit((x, y))
    with pytest.raises(dg.DunegrassError, match=match):  # queries too
        good.score((xq, labels(yq)))


@pytest.mark.parametrize("k", [1.5, True, "16", 0, -2])
def test_sizes_that_are_not_positive_integers(tiny_classification, k):
    """k = 1.5 and k = True silently became 1; k = "16" raised a TypeError."""
    model, _, _ = tiny_classification
    task = dg.ClassificationTask()
    for build in (
        lambda: dg.GraSS(model, task, k=k),
        lambda: dg.TRAK(model, task, k=k),
        lambda: dg.FactGraSS(model, task, k=k),
        lambda: dg.LoGra(model, task, k_in=k),
        lambda: dg.GradientInfluence(model, task, batch_size=k),
    ):
        with pytest.raises(dg.DunegrassError, match="must be a positive integer"):
            build()
    with pytest.raises(dg.DunegrassError, match="num_models must be an integer"):
        dg.Daunce(model, task, num_models=True)


def test_a_cache_dir_that_is_a_file(tiny_classification, tmp_path):
    model, train, _ = tiny_classification
    path = tmp_path / "not-a-dir"
    path.write_text("x")
    for attr in (dg.GradientInfluence(model, dg.ClassificationTask()), dg.Daunce(model, dg.ClassificationTask())):
        with pytest.raises(dg.DunegrassError, match="is a file, not a directory"):
            attr.fit(train, cache_dir=path)


def test_scores_from_a_file_that_is_not_scores(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(dg.DunegrassError, match="not a scores file") as info:
        dg.Scores.load(text)
    assert "pickle" not in str(info.value)
    with pytest.raises(dg.DunegrassError, match="no such file"):
        dg.Scores.load(tmp_path / "missing.npz")


def test_ranking_a_negative_number_of_examples():
    s = dg.Scores(torch.randn(2, 5))
    for bad in (-2, 0, 1.5):
        with pytest.raises(dg.DunegrassError, match="positive integer"):
            s.top(bad)
        with pytest.raises(dg.DunegrassError, match="positive integer"):
            s.bottom(bad)


def test_inputs_without_labels_and_a_string_as_data(tiny_classification):
    model, (x, y), _ = tiny_classification
    attr = dg.GradientInfluence(model, dg.ClassificationTask()).fit((x, y))
    with pytest.raises(dg.DunegrassError, match=r"got 1 tensor\(s\) \(inputs without labels\?\)"):
        attr.score(x[:3])
    with pytest.raises(dg.DunegrassError, match="not its name or path"):
        attr.fit("train.jsonl")


def test_files_written_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        dg.Scores(torch.randn(2, 3)).save(tmp_path / "s.npz")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "s.npz").st_mode & 0o777) == 0o644


def test_messages_that_name_a_fix_that_works(tiny_classification, tmp_path):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    top = dg.GradientInfluence(model, task).fit(train).score(test, top_k=100)  # all 40 kept
    assert top.top(60).indices.shape == (7, 40)  # nothing more to ask for: no "score again" advice
    top.save(tmp_path / "top.npz")
    with pytest.raises(dg.DunegrassError, match="not dense ones; use TopScores.load"):
        dg.Scores.load(tmp_path / "top.npz")
    for build, match in (
        (lambda: dg.GradientInfluence(model, task, damping="0.1"), "damping must be a positive finite number, 'auto'"),
        (lambda: dg.Daunce(model, task, subsample_ratio="0.3"), "subsample_ratio must be a number"),
        (lambda: dg.ExactInfluence(model, task, damping=None), "non-negative numbers"),
        (lambda: dg.GraSS(torch.nn.Linear(256, 256), task, k=32768, mask_size=65536), r"k=4096"),
    ):
        with pytest.raises(dg.DunegrassError, match=match):
            build()


def test_a_backward_hook_and_token_ids_past_the_vocabulary_are_named(tiny_classification):
    """Both failed with torch's own text (the hook's blamed the data's shape); LoGra works with the hook."""
    from dunegrass.hf import tiny_gpt2

    model, train, _ = tiny_classification
    model[2].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    with pytest.raises(dg.DunegrassError, match="backward hook on one of the model's modules.*remove it"):
        dg.GraSS(model, dg.ClassificationTask(), k=16).fit(train)
    assert dg.LoGra(model, dg.ClassificationTask(), k_in=2, k_out=2).fit(train).score(train).shape == (40, 40)
    lm = tiny_gpt2()
    ids = torch.full((2, 8), lm.config.vocab_size + 5)
    with pytest.raises(dg.DunegrassError, match=r"token ids must lie in \[0, 96\).*another model's tokenizer"):
        dg.GraSS(lm, dg.CausalLMTask(), k=16).fit({"input_ids": ids})
