"""Daunce through a fine-tuning service: the local back end reproduces dg.Daunce(variant="blackbox")."""

import pytest
import torch

import dunegrass as dg
from dunegrass.methods.blackbox import BlackBoxBackend, BlackBoxDaunce, LocalBackend
from dunegrass.methods.daunce import Daunce
from dunegrass.train import TrainConfig

CONFIG = TrainConfig(optimizer="adam", lr=3e-3, steps=6, batch_size=8, schedule="cosine")


class _Counting(LocalBackend):
    def __init__(self, *args, fail_at=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tunes, self.fail_at = 0, fail_at

    def fine_tune(self, train, indices, seed):
        self.tunes += 1
        return super().fine_tune(train, indices, seed)

    def losses(self, handle, data):
        if self.fail_at is not None and len(self.members) == self.fail_at:
            self.fail_at = None
            raise ConnectionError("the service went away")
        return super().losses(handle, data)


def test_local_backend_matches_the_blackbox_variant(tiny_classification):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    service = BlackBoxDaunce(LocalBackend(model, task, CONFIG), num_models=5, seed=3).fit(train)
    local = Daunce(model, task, num_models=5, variant="blackbox", trainer="finetune", train=CONFIG, seed=3).fit(train)
    a, b = service.score(test), local.score(test)
    torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(a.stderr, b.stderr, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(service.self_scores().values, local.self_scores().values, rtol=1e-4, atol=1e-8)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])


def test_a_member_fine_tuned_before_a_crash_is_not_fine_tuned_again(tiny_classification, tmp_path):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    backend = _Counting(model, task, CONFIG, fail_at=3)
    with pytest.raises(ConnectionError):
        BlackBoxDaunce(backend, num_models=4).fit(train, cache_dir=tmp_path)
    assert backend.tunes == 3
    resumed = BlackBoxDaunce(backend, num_models=4).fit(train, queries=test, cache_dir=tmp_path)
    assert backend.tunes == 4  # the third job's handle was stored; only the fourth was new
    fresh = BlackBoxDaunce(LocalBackend(model, task, CONFIG), num_models=4).fit(train)
    torch.testing.assert_close(resumed.score(test).values, fresh.score(test).values, rtol=1e-5, atol=1e-9)


def test_a_new_process_refits_the_local_members_that_died_with_the_old_one(tiny_classification, tmp_path):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    with pytest.raises(ConnectionError):
        BlackBoxDaunce(_Counting(model, task, CONFIG, fail_at=3), num_models=4).fit(train, cache_dir=tmp_path)
    restarted = _Counting(model, task, CONFIG)  # a new process: the stored handle names no member it has
    resumed = BlackBoxDaunce(restarted, num_models=4).fit(train, cache_dir=tmp_path)
    assert restarted.tunes == 2  # the member whose losses were lost, and the fourth
    fresh = BlackBoxDaunce(LocalBackend(model, task, CONFIG), num_models=4).fit(train)
    torch.testing.assert_close(resumed.signals()[0], fresh.signals()[0], rtol=1e-5, atol=1e-9)
    # new queries need the first process's members, which are gone: fine-tuned again (the same subset and seed)
    torch.testing.assert_close(resumed.score(test).values, fresh.score(test).values, rtol=1e-5, atol=1e-9)
    assert restarted.tunes == 4

    class _Noisy(LocalBackend):  # fine-tunes that differ from run to run cannot stand in for the lost ones
        def losses(self, handle, data):
            return super().losses(handle, data) + 1e-3 * torch.rand(len(data), dtype=torch.float64)

    noisy = BlackBoxDaunce(_Noisy(model, task, CONFIG), num_models=4).fit(train, cache_dir=tmp_path)
    for _ in range(2):  # asked again, the stand-in that failed the check is not used either
        with pytest.raises(dg.DunegrassError, match="member 0 is gone .* does not reproduce its stored training"):
            noisy.score((test[0][:3], test[1][:3]))


def test_a_local_cache_belongs_to_its_base_weights(tiny_classification, tmp_path):
    model, train, _ = tiny_classification
    task = dg.ClassificationTask()
    BlackBoxDaunce(LocalBackend(model, task, CONFIG), num_models=2).fit(train, cache_dir=tmp_path)
    with torch.no_grad():
        model[0].weight.add_(0.1)
    with pytest.raises(dg.ConfigMismatchError):
        BlackBoxDaunce(LocalBackend(model, task, CONFIG), num_models=2).fit(train, cache_dir=tmp_path)


def test_bad_backend_output_is_refused(tiny_classification):
    model, train, _ = tiny_classification

    class Broken(BlackBoxBackend):
        def fine_tune(self, train, indices, seed):
            return "m"

        def losses(self, handle, data):
            return torch.full((3,), float("nan"))

    with pytest.raises(dg.DunegrassError, match="bad losses"):
        BlackBoxDaunce(Broken(), num_models=2).fit(train)
    with pytest.raises(dg.DunegrassError, match="num_models"):
        BlackBoxDaunce(Broken(), num_models=1)


def test_a_service_cache_grows_with_k(tiny_classification, tmp_path):
    """Each member is a paid job: K = 2 grown to 3 fine-tunes one more, and keeps the first two."""
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    backend = _Counting(model, task, CONFIG)
    BlackBoxDaunce(backend, num_models=2).fit(train, cache_dir=tmp_path)
    grown = BlackBoxDaunce(backend, num_models=3).fit(train, cache_dir=tmp_path)
    assert backend.tunes == 3
    fresh = BlackBoxDaunce(LocalBackend(model, task, CONFIG), num_models=3).fit(train)
    torch.testing.assert_close(grown.score(test).values, fresh.score(test).values, rtol=1e-5, atol=1e-8)


def test_fine_tuning_lost_members_again_on_a_paid_service_asks_first(tiny_classification, tmp_path, capsys):
    """Re-fine-tuning starts jobs: on a paid back end it is planned and needs confirm=True above the limits."""
    model, train, test = tiny_classification
    task = dg.ClassificationTask()

    class _Paid(LocalBackend):
        paid = True

    BlackBoxDaunce(_Paid(model, task, CONFIG), num_models=4, confirm=True).fit(train, cache_dir=tmp_path)
    later = BlackBoxDaunce(_Paid(model, task, CONFIG), num_models=4).fit(train, cache_dir=tmp_path)  # members gone
    with pytest.raises(dg.DunegrassError, match="would start 4 fine-tuning jobs .* pass confirm=True"):
        later.score(test)
    assert "this score starts 4 fine-tuning jobs" in capsys.readouterr().err
