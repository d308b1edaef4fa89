"""The docstring LM benchmark's fine-tune length is a setting: it reaches θ₀'s recipe and its cache key."""

import pytest

import dunegrass as dg
from dunegrass.bench.lm import lm_task, stdlib_docstrings


@pytest.mark.parametrize("epochs", [0, -1.0, float("nan"), float("inf")])
def test_a_fine_tune_of_no_length_is_refused(epochs):
    with pytest.raises(dg.DunegrassError, match="finetune_epochs"):
        lm_task(quick=True, finetune_epochs=epochs)


def test_the_fine_tune_length_is_theta0s_recipe_and_part_of_its_cache_key(tmp_path):
    short = lm_task(quick=True, cache_dir=tmp_path, finetune_epochs=1.0)
    longer = lm_task(quick=True, cache_dir=tmp_path, finetune_epochs=2.0)
    assert (short.finetune.epochs, longer.finetune.epochs) == (1.0, 2.0)
    assert short.info["finetune"]["epochs"] == 1.0
    tuned = sorted(p.name for p in tmp_path.glob("lm-tuned-*.npz"))
    assert len(tuned) == 2 and len(list(tmp_path.glob("lm-base-*.npz"))) == 1  # one pretrained base, two θ₀
    other = dict(longer.model.named_parameters())
    moved = [name for name, p in short.model.named_parameters() if (p - other[name]).abs().max() > 1e-6]
    assert moved, "a longer fine-tune left every weight where the shorter one did"


def test_the_corpus_ignores_methods_other_packages_attach_to_stdlib_classes(monkeypatch):
    """transformers adds logging.Logger.warning_once when imported: the corpus (and every cache key made from
    it) must not depend on whether the process imported it first."""
    import logging

    before = stdlib_docstrings()

    def warning_twice(self, msg):
        """A method a third-party package attached to a standard-library class, with a docstring long enough
        to be taken into the corpus if it were not filtered out."""

    warning_twice.__module__ = "someones_package.utils.logging"
    monkeypatch.setattr(logging.Logger, "warning_twice", warning_twice, raising=False)
    after = dict(stdlib_docstrings())
    assert after == dict(before)
    # members of the standard library stay, those from C modules (no __module__) and from another stdlib
    # module (logging.Formatter.converter is time.localtime) included
    kept = {"logging.Logger.warning", "logging.Formatter.converter", "collections.OrderedDict.move_to_end"}
    assert kept <= set(after)
