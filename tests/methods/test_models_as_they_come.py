"""Models as users hold them: BatchNorm left in train mode, frozen layers, forwards that return tuples, dicts
or ModelOutputs, Hugging Face's default SDPA attention, and defaults that fit a small model."""

import copy
import warnings

import pytest
import torch

import dunegrass as dg
from dunegrass import notices
from dunegrass.hf import tiny_gpt2

METHODS = {
    "gradient": lambda m, t: dg.GradientInfluence(m, t, compressor="gaussian:16"),
    "grass": lambda m, t: dg.GraSS(m, t, k=16),
    "trak": lambda m, t: dg.TRAK(m, t, k=16),
    "tracin": lambda m, t: dg.TracIn(m, t),
    "logra": lambda m, t: dg.LoGra(m, t, k_in=4, k_out=4),
    "factgrass": lambda m, t: dg.FactGraSS(m, t, k=16, mask_size=(4, 4)),
    "exact": lambda m, t: dg.ExactInfluence(m, t, hessian="gauss_newton", damping=0.1),
}


def _bn_model(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():  # running statistics that differ from their initial values
        for _ in range(3):
            model(torch.randn(16, 6) * 2 + 1)
    return model.to(device)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_model_left_in_train_mode_is_attributed_in_eval_mode_and_left_as_it_was(device, tiny_classification, name):
    _, train, test = tiny_classification
    task = dg.ClassificationTask()
    model = _bn_model(device).train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    got = METHODS[name](model, task).fit(train).score(test).values
    assert model.training and model[1].training, "the caller's mode is restored"
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), f"{k} changed"
    frozen = copy.deepcopy(model).eval()
    want = METHODS[name](frozen, task).fit(train).score(test).values
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


class _Returns(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind, self.net = kind, torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def forward(self, x):
        logits = self.net(x)
        if self.kind == "tuple":
            return logits, x.sum(1)
        if self.kind == "dict":
            return {"logits": logits, "hidden": x}
        if self.kind == "model_output":
            from transformers.modeling_outputs import SequenceClassifierOutput

            return SequenceClassifierOutput(logits=logits)
        return {"scores": logits, "hidden": x}  # ambiguous


@pytest.mark.parametrize("kind", ["tuple", "dict", "model_output"])
@pytest.mark.parametrize("name", ["gradient", "logra"])
def test_forwards_returning_tuples_dicts_and_model_outputs(device, tiny_classification, kind, name):
    _, train, test = tiny_classification
    task = dg.ClassificationTask()
    model = _Returns(kind).to(device)
    plain = model.net
    got = METHODS[name](model, task).fit(train).score(test).values
    want = METHODS[name](plain, task).fit(train).score(test).values
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_an_ambiguous_forward_says_how_to_write_outputs(device, tiny_classification):
    _, train, _ = tiny_classification
    with pytest.raises(dg.DunegrassError, match=r"keys \['scores', 'hidden'\].*override outputs\(model, batch\)"):
        dg.GradientInfluence(_Returns("ambiguous").to(device), dg.ClassificationTask()).fit(train)


def _lm_data():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 90, (6, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    mask[3, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("name", ["gradient", "grass", "daunce"])
def test_default_sdpa_attention_works_and_is_restored(device, name, monkeypatch):
    """A Hugging Face model as from_pretrained gives it (SDPA) with padding: the per-example gradients run with
    eager attention for the call, said once (pointing at the user's line), and the model gets its SDPA back."""
    data, task = _lm_data(), dg.CausalLMTask()
    build = {
        "gradient": lambda m: dg.GradientInfluence(m, task, compressor="sjlt:64"),
        "grass": lambda m: dg.GraSS(m, task, k=64),
        "daunce": lambda m: dg.Daunce(
            m, task, num_models=3, steps=3, train_batch_size=2, trainer="ensemble"
        ),  # vmapped
    }
    sdpa = tiny_gpt2(attn_implementation="sdpa").to(device)
    monkeypatch.setattr(notices, "_said", set())  # said once per process: make this the first time
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        got = build[name](sdpa).fit(data).score(data).values
    (switch,) = [w for w in said if "switches it to 'eager'" in str(w.message)]
    assert switch.filename == __file__  # not contextlib's, through which the switch is made
    assert sdpa.config._attn_implementation == "sdpa"
    want = build[name](tiny_gpt2(attn_implementation="eager").to(device)).fit(data).score(data).values
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_frozen_parameters_are_left_out_by_every_materialised_method(device, tiny_classification):
    """One rule: the trainable parameters by default, params= to choose."""
    model, train, test = tiny_classification
    model[0].requires_grad_(False)
    task = dg.ClassificationTask()
    for attr in (dg.GradientInfluence(model, task), dg.TracIn(model, task), dg.ExactInfluence(model, task)):
        assert attr.featurizers[0].params == ["2.weight", "2.bias"]
    chosen = dg.GradientInfluence(model, task, params=["0.weight"])
    assert chosen.featurizers[0].params == ["0.weight"]


class _Rows(torch.utils.data.Dataset):
    """Examples as a Hugging Face dataset holds them: a dict per row, a plain-int label and a string id."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"inputs": self.x[i], "labels": int(self.y[i]), "id": f"row-{i}"}


@pytest.mark.parametrize("name", ["grass", "gradient", "tracin", "trak", "exact", "logra"])
def test_dict_rows_with_non_tensor_fields_score_as_tensors_do(device, tiny_classification, name):
    """A field that is not a tensor (an id, a text) rides along whole; it failed inside vmap before."""
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    build = {
        "grass": lambda: dg.GraSS(model, task, k=16),
        "gradient": lambda: dg.GradientInfluence(model, task, compressor="sjlt:16"),
        "tracin": lambda: dg.TracIn(model, task),
        "trak": lambda: dg.TRAK(model, task, k=16),
        "exact": lambda: dg.ExactInfluence(model, task),
        "logra": lambda: dg.LoGra(model, task, k_in=4, k_out=2),
    }[name]
    got = build().fit(_Rows(*train)).score(_Rows(*test)).values
    want = build().fit(train).score(test).values
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("trainer", ["ensemble", "newton"])
def test_daunce_trains_the_trainable_parameters_only(device, tiny_classification, trainer):
    """Every Daunce trainer leaves a frozen layer at θ₀ (Newton's method minimised over all parameters), and a
    model with nothing to train is refused with the fix instead of failing inside the trainer."""
    model, train, test = tiny_classification
    model[0].requires_grad_(False)
    task = dg.ClassificationTask()
    opts = {"trainer": trainer, "l2": 1e-2} if trainer == "newton" else {"trainer": trainer, "steps": 3}
    daunce = dg.Daunce(model, task, num_models=2, keep_members=True, **opts).fit(train)
    for j in range(2):
        assert sorted(daunce.store.load_weights(j)) == ["2.bias", "2.weight"]
    assert torch.isfinite(daunce.score(test).values).all()
    model.requires_grad_(False)
    with pytest.raises(dg.DunegrassError, match=r"no trainable parameters.*requires_grad_\(True\)"):
        dg.Daunce(model, task, num_models=2, **opts).fit(train)


def test_default_k_fits_a_small_model(device, tiny_classification, monkeypatch):
    model, train, test = tiny_classification  # 83 parameters
    task = dg.ClassificationTask()
    monkeypatch.setattr(notices, "_said", set())  # said once per process: make this the first time
    with pytest.warns(dg.DunegrassWarning, match="83 parameters .* using k = 83"):
        grass = dg.GraSS(model, task)
    assert grass.k == 83 and grass.fit(train).score(test).shape == (7, 40)
    trak = dg.TRAK(model, task)
    assert trak.featurizers[0].dim == 83
    with pytest.raises(dg.DunegrassError, match="k = 4096 is larger than the input dimension 83"):
        dg.GraSS(model, task, k=4096)
    for bad in (1.5, True, "16", 0):
        with pytest.raises(dg.DunegrassError, match="k must be a positive integer"):
            dg.GraSS(model, task, k=bad)


@pytest.mark.parametrize("name", ["logra", "factgrass", "ekfac"])
def test_a_model_that_is_one_linear_layer(device, tiny_classification, name):
    """The root module was never a candidate layer: a bare nn.Linear (logistic regression) was refused as having
    no nn.Linear. It scores as the same layer wrapped in a Sequential does."""
    _, train, test = tiny_classification
    task = dg.ClassificationTask()
    build = {
        "logra": lambda m: dg.LoGra(m, task, k_in=4, k_out=3),
        "factgrass": lambda m: dg.FactGraSS(m, task, k=8, mask_size=4),
        "ekfac": lambda m: dg.EKFAC(m, task),
    }[name]
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 3).to(device)
    got = build(linear).fit(train).score(test).values
    want = build(torch.nn.Sequential(linear)).fit(train).score(test).values
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_messages_name_a_root_layer(device):
    """A model that is itself the layer has the empty name: messages showed '' where the layer goes."""
    from dunegrass.errors import DunegrassError
    from dunegrass.gradients.factorized import capture_factors, factor_layers

    model = torch.nn.Linear(4, 2).to(device)
    (layer,) = factor_layers(model)
    assert layer.label == "(the model itself)" and factor_layers(torch.nn.Sequential(model))[0].label == "'0'"
    with pytest.raises(DunegrassError, match=r"supported layers are: '' \(the model itself\)"):
        factor_layers(model, ["fc"])

    def objective(m, batch):
        out = m(batch).sum(1)
        batch.mul_(2.0)  # changes the input the layer saw, after it ran
        return out

    with pytest.raises(DunegrassError, match=r"the input of layer \(the model itself\) was modified in place"):
        capture_factors(model, [layer], objective, torch.randn(3, 4, device=device), lambda i, a, g: None)


@pytest.mark.parametrize("name", ["logra", "gradient", "trak", "ekfac", "daunce", "blackbox"])
def test_weights_changed_after_fit_are_refused_not_mixed(device, tiny_classification, name):
    """A model edited between fit and score (an in-place update, a write through .data) gave scores that mixed
    the fitted training features or signals with the new weights, silently; now score says so. Scoring
    again after the weights are put back works."""
    from dunegrass.errors import DunegrassError
    from dunegrass.methods.blackbox import BlackBoxDaunce, LocalBackend

    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    recipe = dg.TrainConfig(lr=1e-2, steps=4, batch_size=16)
    attr = {
        "logra": lambda: dg.LoGra(model, task, k_in=4, k_out=3),
        "gradient": lambda: dg.GradientInfluence(model, task, compressor="identity"),
        "trak": lambda: dg.TRAK(model, task, k=16),
        "ekfac": lambda: dg.EKFAC(model, task),
        "daunce": lambda: dg.Daunce(model, task, num_models=3, train=recipe),
        "blackbox": lambda: BlackBoxDaunce(LocalBackend(model, task, recipe), num_models=3),
    }[name]().fit(train)
    before = attr.score(test).values
    weight = next(model.parameters())
    kept = weight.detach().clone()
    weight.data.mul_(1.5)
    with pytest.raises(DunegrassError, match="the model's weights changed since fit"):
        attr.score(test)
    weight.data.copy_(kept)
    torch.testing.assert_close(attr.score(test).values, before)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_an_encoder_classifier_with_padding_gets_exact_per_example_gradients(device, attention):
    """A BERT-style classifier (bidirectional masks) failed in every per-example-gradient method: transformers
    reads the padding mask (``.all()``) to skip it, which vmap cannot run, whatever the attention. Scores with
    the identity compressor and no damping are g_q · g_i; each g is checked against autograd on the example
    alone, unpadded. TRAK runs through the task it is given (it replaced it with a plain ClassificationTask)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3, attn_implementation=attention,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(1, 40, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen),
         "labels": torch.tensor(i % 3)}
        for i in range(6)
    ]  # fmt: skip
    task = dg.SequenceClassificationTask()
    got = dg.GradientInfluence(model, task, compressor="identity", damping=None).fit(dg.data.Padded(rows))
    scores = got.score(dg.data.Padded(rows[:2])).values

    def alone(row):
        batch = {"input_ids": row["input_ids"][None].to(device), "labels": row["labels"][None].to(device)}
        model.zero_grad()
        task.loss(task.outputs(model, batch), batch).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).cpu()

    grads = torch.stack([alone(r) for r in rows])
    model.zero_grad()
    want = grads[:2] @ grads.T
    torch.testing.assert_close(scores, want, rtol=1e-3, atol=1e-5 * want.abs().max().item())
    trak = dg.TRAK(model, task, k=16).fit(dg.data.Padded(rows)).score(dg.data.Padded(rows[:2]))
    assert trak.values.isfinite().all() and trak.top(1).indices.flatten().tolist() == [0, 1]


def test_attributing_a_dataset_leaves_the_global_random_state_alone(tiny_classification):
    """torch's DataLoader drew its seed from the global generator: a user's seeded run after attribution
    changed whenever the data came as a Dataset or a list of examples."""
    model, (x, y), _ = tiny_classification
    rows = [(x[i], y[i]) for i in range(len(y))]
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    dg.LoGra(model, dg.ClassificationTask(), k_in=4, k_out=3).fit(rows).score(rows[:2])
    assert torch.equal(torch.rand(3), want)


def test_interleaved_calls_keep_the_encoder_masks_built_and_restore_transformers_after_the_last():
    """Found in review: each call saved and restored transformers' function itself, so two interleaved ones
    (two generators, two threads) left the patch installed for good, and the second ran unpatched."""
    masking_utils = pytest.importorskip("transformers.masking_utils")
    from dunegrass.gradients.attention import _materialised_bidirectional_masks

    original = masking_utils._ignore_bidirectional_mask_sdpa
    first, second = _materialised_bidirectional_masks(True), _materialised_bidirectional_masks(True)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert masking_utils._ignore_bidirectional_mask_sdpa is not original  # the second still needs it
    assert masking_utils._ignore_bidirectional_mask_sdpa(torch.ones(1, 3, dtype=torch.bool), 3) is False
    second.__exit__(None, None, None)
    assert masking_utils._ignore_bidirectional_mask_sdpa is original
