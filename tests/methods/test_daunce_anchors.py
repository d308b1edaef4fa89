"""θ₀'s anchors are recomputed per batch, never stored for all examples: the members are those of the
objective of algorithms.md §3 with anchors taken once for the whole training set (a direct
implementation here), and memory does not grow with what q for all examples would have taken."""

import copy

import pytest
import torch

import dunegrass as dg
from dunegrass.methods.daunce import Daunce
from dunegrass.methods.daunce_objectives import draw_eps, draw_members
from dunegrass.train import TrainConfig
from dunegrass.train.finetune import finetune
from dunegrass.train.lora import LoraConfig, add_lora, lora_state, remove_lora, reset_lora

RATIO, SEED = 0.5, 3


def _anchors_for_all(model, task, data):
    """q = ∂ℓ/∂o, ⟨o(θ₀), q⟩ and ℓ(θ₀) for every training example at once (what per-batch anchors replace)."""
    device = next(model.parameters()).device
    full = {k: v.to(device) for k, v in data.items()} if isinstance(data, dict) else tuple(t.to(device) for t in data)
    with torch.no_grad():
        out = task.outputs(model, full)
    o = out.detach().requires_grad_(True)
    loss = task.loss(o, full)
    (q,) = torch.autograd.grad(loss.sum(), o)
    oq0 = (out.double() * q.double()).flatten(1).sum(1)
    return {"q": q.cpu(), "oq0": oq0.cpu(), "l0": loss.detach().cpu()}


def _formula(task, variant, rho=1.0, gamma=1.0):
    """algorithms.md §3: ``if`` = γ·mean[ℓ − ℓ₀] − mean[(1 + ρε)⟨o − o₀, q⟩],
    ``efim`` = γ·mean[(ℓ − ℓ₀)²] − mean[ρε⟨o − o₀, q⟩]."""

    def objective(out, batch, aux):
        lin = (out * aux["q"]).flatten(1).sum(1) - aux["oq0"].to(out.dtype)
        dl = task.loss(out, batch) - aux["l0"]
        eps = aux["eps"].to(out.dtype)
        if variant == "if":
            return (gamma * dl - (1 + rho * eps) * lin).mean()
        return (gamma * dl * dl - rho * eps * lin).mean()

    return objective


def _reference_members(model, task, data, n, variant, config, K, lora=None):
    anchors = _anchors_for_all(model, task, data)
    members = draw_members(n, K, RATIO, SEED)
    eps = draw_eps(n, range(K), SEED)
    states = []
    for k, member in enumerate(members):
        if lora is None:
            net = copy.deepcopy(model)
        else:
            net = add_lora(copy.deepcopy(model), lora).eval()
            reset_lora(net, member.seed)
        finetune(net, task, data, member, config, _formula(task, variant), anchors, {"eps": eps[k]})
        if lora is None:
            states.append({n_: p.detach().cpu() for n_, p in net.named_parameters()})
        else:
            states.append({n_: v.cpu() for n_, v in lora_state(net).items()})
            remove_lora(net, {})
    return states


def _assert_members_equal(daunce, reference):
    for k, want in enumerate(reference):
        got = daunce.store.load_weights(k)
        assert got.keys() <= want.keys() and got
        for name, value in got.items():
            torch.testing.assert_close(value, want[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ["if", "efim"])
@pytest.mark.parametrize("trainer", ["ensemble", "finetune"])
def test_members_equal_the_objective_with_anchors_for_all_examples(tiny_classification, variant, trainer):
    model, train, _ = tiny_classification
    task = dg.ClassificationTask()
    config = TrainConfig(optimizer="adam", lr=0.05, steps=8, batch_size=8, schedule="cosine")
    reference = _reference_members(model, task, train, 40, variant, config, K=4)
    daunce = Daunce(
        model, task, num_models=4, variant=variant, config=config, trainer=trainer, subsample_ratio=RATIO, seed=SEED
    ).fit(train)
    _assert_members_equal(daunce, reference)
    moved = (daunce.store.load_weights(0)["0.weight"] - model[0].weight.detach().cpu()).abs().max()
    assert moved > 1e-2  # the members did train


@pytest.mark.parametrize("lora", [None, LoraConfig(rank=4)])
def test_causal_lm_members_equal_the_reference_full_and_lora(device, lora):
    pytest.importorskip("peft")
    from dunegrass.hf import tiny_gpt2

    model = tiny_gpt2(vocab_size=40, n_positions=16, n_embd=16, seed=0).to(device)
    task = dg.CausalLMTask()
    ids = torch.randint(1, 40, (10, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::3, 6:] = 0  # padded rows: their q is zero there
    data = {"input_ids": ids, "attention_mask": mask}
    config = TrainConfig(optimizer="adamw", lr=1e-2, steps=3, batch_size=4, schedule="cosine")
    reference = _reference_members(model, task, data, 10, "if", config, K=3, lora=lora)
    daunce = Daunce(
        model, task, num_models=3, config=config, trainer="finetune", lora=lora, subsample_ratio=RATIO, seed=SEED
    ).fit(data)
    _assert_members_equal(daunce, reference)


def test_theta0_nan_loss_names_the_example(tiny_classification):
    model, (x, y), _ = tiny_classification
    x = x.clone()
    x[17, 2] = float("nan")
    for trainer in ("ensemble", "finetune"):
        with pytest.raises(dg.NonFiniteError, match=r"θ₀.*\[17\]"):
            Daunce(model, dg.ClassificationTask(), num_models=2, steps=2, trainer=trainer).fit((x, y))


# Causal LM, T = 32 tokens, vocabulary 4096: q for all examples would be n × 32 × 4096 float32,
# 32 MiB at n = 64 and 320 MiB at n = 640 (the code before per-batch anchors peaked 580 MiB higher
# at n = 640); everything else Daunce holds is a few MiB, and one eval batch's logits 16 MiB.
_PROBE = """
import dunegrass as dg
from dunegrass.hf import tiny_gpt2
n = {n}
model = tiny_gpt2(vocab_size=4096, n_positions=32, n_embd=16, n_layer=1, n_head=2)
ids = torch.randint(0, 4096, (n, 32), generator=torch.Generator().manual_seed(0))
daunce = dg.Daunce(model, dg.CausalLMTask(), num_models=2, trainer="finetune", steps=2, train_batch_size=4,
                   eval_batch_size=32, progress=False)
daunce.fit({{"input_ids": ids}})
assert daunce.signals()[0].shape == (2, n)
"""


def test_memory_does_not_grow_with_what_q_for_all_examples_would_take(peak_rss_mb):
    pytest.importorskip("transformers")
    q_mib = 640 * 32 * 4096 * 4 / 2**20
    small = peak_rss_mb(_PROBE.format(n=64))
    large = peak_rss_mb(_PROBE.format(n=640))
    assert large - small < q_mib / 4, (small, large)
