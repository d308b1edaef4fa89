"""Daunce: back ends agree, the signals store resumes and scores new queries, bad input is refused."""

import copy

import numpy as np
import pytest
import torch

import dunegrass as dg
from dunegrass.errors import ConfigMismatchError, NonFiniteError
from dunegrass.methods import daunce_backends
from dunegrass.methods.daunce import Daunce
from dunegrass.methods.daunce_objectives import covariance_scores, draw_members

SMALL = {"num_models": 6, "steps": 6, "train_batch_size": 8, "max_members": 3}


class _Killed(Exception):
    """Stands in for the process being killed mid-fit."""


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", ["if", "efim", "blackbox"])
def test_vmapped_and_member_by_member_back_ends_train_the_same_models(tiny_classification, variant):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    before = _weights(model)
    fits = {
        trainer: Daunce(model, task, variant=variant, trainer=trainer, **SMALL).fit(train)
        for trainer in ("ensemble", "finetune")
    }
    for k in range(SMALL["num_models"]):
        a, b = (fits[t].store.load_weights(k) for t in ("ensemble", "finetune"))
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    sa, sb = (fits[t].score(test) for t in ("ensemble", "finetune"))
    torch.testing.assert_close(sa.values, sb.values, rtol=1e-3, atol=1e-3 * sa.values.abs().max().item())
    for name, p in model.named_parameters():  # the caller's model is left at θ₀
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0)


def test_members_move_away_from_theta0_and_scores_are_covariances(tiny_classification):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    daunce = Daunce(model, task, **SMALL).fit(train)
    moved = max((daunce.store.load_weights(0)[n] - p).abs().max().item() for n, p in model.named_parameters())
    assert moved > 1e-3
    A, B = daunce.signals(test)
    assert A.shape == (6, 40) and B.shape == (6, 7)
    # The stored signals are each member's own losses: evaluate every kept member in a copy of the model
    # by hand, and take the covariance of those.
    copy_ = copy.deepcopy(model).cpu()
    mine = []
    for k in range(6):
        copy_.load_state_dict({n: v.cpu() for n, v in daunce.store.load_weights(k).items()}, strict=False)
        with torch.no_grad():
            mine.append(torch.cat([task.loss(copy_(x), (x, y)) for x, y in (test, train)]).double())
    by_hand = torch.stack(mine).numpy()
    np.testing.assert_allclose(by_hand[:, 7:], A.numpy(), rtol=1e-5, atol=1e-7)
    scores = daunce.score(test)
    want = np.cov(by_hand, rowvar=False)[:7, 7:]
    np.testing.assert_allclose(scores.values.numpy(), want, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(daunce.self_scores().values[0].numpy(), A.numpy().var(0, ddof=1), rtol=1e-4, atol=1e-12)
    assert scores.stderr is not None and (scores.stderr > 0).all()


def test_member_draws_do_not_depend_on_k():
    few, many = draw_members(50, 3, 0.3, seed=7), draw_members(50, 8, 0.3, seed=7)
    for a, b in zip(few, many):
        assert torch.equal(a.indices, b.indices) and a.seed == b.seed
    assert len(few[0].indices) == 15 and not torch.equal(few[0].indices, few[1].indices)


def test_a_killed_fit_resumes_at_the_next_group(tiny_classification, tmp_path, monkeypatch):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    reference = Daunce(model, task, **SMALL).fit(train, queries=test).score(test)

    calls = []
    original = daunce_backends.EnsembleBackend.train

    def dies_on_second_group(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise _Killed
        return original(self, *args, **kwargs)

    monkeypatch.setattr(daunce_backends.EnsembleBackend, "train", dies_on_second_group)
    with pytest.raises(_Killed):
        Daunce(model, task, **SMALL).fit(train, queries=test, cache_dir=tmp_path)
    calls.clear()
    resumed = Daunce(model, task, **SMALL).fit(train, queries=test, cache_dir=tmp_path)
    assert len(calls) == 1  # only the second group of 3 members was trained again
    torch.testing.assert_close(resumed.score(test).values, reference.values, rtol=1e-5, atol=1e-9)
    calls.clear()
    again = Daunce(model, task, **SMALL).fit(train, cache_dir=tmp_path)
    assert not calls
    torch.testing.assert_close(again.score(test).values, reference.values, rtol=1e-5, atol=1e-9)


def test_a_killed_member_by_member_fit_resumes(tiny_classification, tmp_path, monkeypatch):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    settings = {**SMALL, "trainer": "finetune"}
    reference = Daunce(model, task, **settings).fit(train).score(test)
    original = daunce_backends.FinetuneBackend.train
    trained, armed = [], [True]

    def dies_at_member_4(self, data, members, *args):
        if len(trained) == 4 and armed and armed.pop():
            raise _Killed
        trained.append(members[0].seed)
        return original(self, data, members, *args)

    monkeypatch.setattr(daunce_backends.FinetuneBackend, "train", dies_at_member_4)
    with pytest.raises(_Killed):
        Daunce(model, task, **settings).fit(train, cache_dir=tmp_path)
    resumed = Daunce(model, task, **settings).fit(train, cache_dir=tmp_path)
    assert len(trained) == 6 and len(set(trained)) == 6  # members 0-3 once, then 4 and 5
    torch.testing.assert_close(resumed.score(test).values, reference.values, rtol=1e-5, atol=1e-9)


def test_new_queries_are_scored_from_kept_members_without_retraining(tiny_classification, tmp_path):
    model, (x, y), _ = tiny_classification
    task = dg.ClassificationTask()
    train, later = (x[:30], y[:30]), (x[30:], y[30:])
    known = Daunce(model, task, **SMALL).fit(train, queries=later).score(later)
    Daunce(model, task, **SMALL).fit(train, cache_dir=tmp_path)
    reopened = Daunce(model, task, **SMALL).fit(train, cache_dir=tmp_path)
    torch.testing.assert_close(reopened.score(later).values, known.values, rtol=1e-5, atol=1e-9)
    lean = Daunce(model, task, keep_members=False, **SMALL).fit(train)
    with pytest.raises(dg.DunegrassError, match="keep_members"):
        lean.score(later)


def test_a_cache_made_with_another_configuration_is_refused(tiny_classification, tmp_path):
    model, train, _ = tiny_classification
    task = dg.ClassificationTask()
    Daunce(model, task, **SMALL).fit(train, cache_dir=tmp_path)
    with pytest.raises(ConfigMismatchError, match="variant"):
        Daunce(model, task, variant="efim", **SMALL).fit(train, cache_dir=tmp_path)


def test_standard_error_formula_against_a_jackknife():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 5, generator=gen), torch.randn(200, 3, generator=gen)
    b[:, 0] += a[:, 0]
    values, stderr = covariance_scores(a, b)
    K = 200
    loo = torch.stack(
        [covariance_scores(torch.cat([a[:k], a[k + 1 :]]), torch.cat([b[:k], b[k + 1 :]]))[0] for k in range(K)]
    )
    jack = ((K - 1) / K * ((loo - loo.mean(0)) ** 2).sum(0)).sqrt()
    torch.testing.assert_close(stderr, jack.float(), rtol=0.05, atol=1e-6)
    torch.testing.assert_close(values.double(), torch.from_numpy(np.cov(torch.cat([b, a], 1).T.numpy())[:3, 3:]))


class _NoOutputs(dg.Task):
    def outputs(self, model, batch):
        raise NotImplementedError

    def loss(self, outputs, batch):
        return outputs


class _ScalarOutputs(dg.ClassificationTask):
    def outputs(self, model, batch):
        return model(batch[0]).sum()


def test_bad_input_gets_a_clear_error(tiny_classification):
    model, (x, y), test = tiny_classification
    task = dg.ClassificationTask()
    with pytest.raises(dg.DunegrassError, match="num_models"):
        Daunce(model, task, num_models=1)
    for ratio in (0.0, 1.5, -0.2):
        with pytest.raises(dg.DunegrassError, match="subsample_ratio"):
            Daunce(model, task, subsample_ratio=ratio)
    with pytest.raises(dg.DunegrassError, match="variant"):
        Daunce(model, task, variant="fisher")
    with pytest.raises(dg.DunegrassError, match="margin"):
        Daunce(model, dg.CausalLMTask(), signal="margin")
    with pytest.raises(dg.DunegrassError, match="finetune"):
        Daunce(model, task, lora=True, trainer="ensemble")
    for bad_task in (_NoOutputs(), _ScalarOutputs()):
        with pytest.raises(dg.DunegrassError, match="outputs"):
            Daunce(model, bad_task, **SMALL).fit((x, y))
    x_nan = x.clone()
    x_nan[3, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"\[3\]"):
        Daunce(model, task, **SMALL).fit((x_nan, y))
    with pytest.raises(dg.DunegrassError, match="fit"):
        Daunce(model, task, **SMALL).score(test)


def test_a_diverging_member_is_reported(tiny_classification):
    model, train, _ = tiny_classification
    task = dg.ClassificationTask()
    with pytest.raises(NonFiniteError):
        Daunce(model, task, variant="efim", optimizer="sgd", lr=1e6, rho=1e3, **SMALL).fit(train)


def _batchnorm_net(device):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)
    ).to(device)
    with torch.no_grad():  # running statistics away from their initial values
        for _ in range(3):
            net(torch.randn(16, 6, device=device) * 2 + 1)
    return net


@pytest.mark.parametrize("trainer", ["ensemble", "finetune"])
def test_fit_and_score_leave_the_model_exactly_as_it_was(tiny_classification, device, trainer):
    _, (x, y), test = tiny_classification
    train, later = (x[:30], y[:30]), (x[30:], y[30:])
    model = _batchnorm_net(device).train()
    model[4].eval()  # a submodule the caller froze in eval mode stays so
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    daunce = Daunce(model, dg.ClassificationTask(), trainer=trainer, **SMALL)
    scores = daunce.fit(train, queries=test).score(test)
    late = daunce.score(later)  # new queries: members loaded back into the model
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # BatchNorm's running statistics and num_batches_tracked too
    frozen = copy.deepcopy(model).eval()
    reference = Daunce(frozen, dg.ClassificationTask(), trainer=trainer, **SMALL).fit(train, queries=test)
    torch.testing.assert_close(scores.values, reference.score(test).values, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(late.values, reference.score(later).values, rtol=1e-6, atol=1e-9)
    assert scores.values.abs().max() > 0


def test_confident_examples_keep_their_signal(device):
    """Examples the model gets right with p = 1 in float32 (margins 18 to 40): a float32 cross-entropy is
    exactly 0 for every member, which made their scores and standard errors exact zeros."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 4, generator=gen)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(4, 2).to(device)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-10.0, 0, 0, 0], [10.0, 0, 0, 0]]))  # margin = 20 |x₀|
        model.bias.zero_()
    confident = ((x[:, 0].abs() > 0.9) & (x[:, 0].abs() < 2)).nonzero()[:, 0]
    unsure = (x[:, 0].abs() < 0.5).nonzero()[:3, 0]
    assert len(confident) > 5 and len(unsure) == 3
    with torch.no_grad():  # these examples' float32 cross-entropy is exactly 0 at θ₀
        logits = model(x[confident].to(device))
        assert (torch.nn.functional.cross_entropy(logits, y[confident].to(device), reduction="none") == 0).all()
    daunce = Daunce(model, dg.ClassificationTask(), num_models=8, steps=5, train_batch_size=16).fit((x, y))
    A, _ = daunce.signals()
    assert (A[:, confident].var(0) > 0).all()
    scores = daunce.score((x[unsure], y[unsure]))
    assert (scores.stderr[:, confident] > 0).all() and (scores.values[:, confident] != 0).all()


def test_a_cache_made_with_fewer_members_grows(tiny_classification, tmp_path, monkeypatch):
    """Member k does not depend on K: K = 64 grown to 128 trains only the 64 new members and equals K = 128."""
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    settings = {"steps": 4, "train_batch_size": 8, "max_members": 16}
    Daunce(model, task, num_models=64, **settings).fit(train, cache_dir=tmp_path)
    trained = []
    original = daunce_backends.EnsembleBackend.train
    monkeypatch.setattr(
        daunce_backends.EnsembleBackend,
        "train",
        lambda self, data, members, eps: trained.extend(members) or original(self, data, members, eps),
    )
    grown = Daunce(model, task, num_models=128, **settings).fit(train, queries=test, cache_dir=tmp_path)
    assert len(trained) == 64
    fewer = Daunce(model, task, num_models=64, **settings).fit(train, cache_dir=tmp_path)  # a prefix: nothing trains
    assert len(trained) == 64 and fewer.signals()[0].shape == (64, 40)
    scratch = Daunce(model, task, num_models=128, **settings).fit(train)
    torch.testing.assert_close(grown.score(test).values, scratch.score(test).values, rtol=1e-5, atol=1e-8)


def test_a_query_with_nan_is_named_not_blamed_on_a_member(tiny_classification):
    model, train, test = tiny_classification
    daunce = Daunce(model, dg.ClassificationTask(), **SMALL).fit(train)
    xq, yq = test[0].clone(), test[1]
    xq[4, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"query signal at θ₀ is NaN or infinite for example\(s\) \[4\]"):
        daunce.score((xq, yq))


def test_k_grows_with_the_default_group_size_and_result_neutral_settings_reuse_the_cache(tiny_classification, tmp_path):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    Daunce(model, task, num_models=4, steps=3, train_batch_size=8).fit(train, cache_dir=tmp_path)
    grown = Daunce(model, task, num_models=8, steps=3, train_batch_size=8).fit(train, cache_dir=tmp_path)
    scratch = Daunce(model, task, num_models=8, steps=3, train_batch_size=8).fit(train)
    torch.testing.assert_close(grown.score(test).values, scratch.score(test).values, rtol=1e-4, atol=1e-7)
    # settings that change no member's signals do not make another cache
    again = Daunce(model, task, num_models=8, steps=3, train_batch_size=8, eval_batch_size=5, keep_members=False)
    torch.testing.assert_close(again.fit(train, cache_dir=tmp_path).score(test).values, grown.score(test).values)
    model[0].requires_grad_(False)  # other trainable parameters: other members
    with pytest.raises(ConfigMismatchError, match="trainable"):
        Daunce(model, task, num_models=8, steps=3, train_batch_size=8).fit(train, cache_dir=tmp_path)
