"""The member-by-member training loop: equal to the vmapped trainer, resumable, LoRA through peft."""

import pytest
import torch

import dunegrass as dg
from dunegrass.methods.daunce import Daunce
from dunegrass.train import EnsembleTrainer, Member, TrainConfig
from dunegrass.train.finetune import finetune
from dunegrass.train.lora import LoraConfig, add_lora, load_state, lora_names, remove_lora, reset_lora


class _Killed(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_finetune_trains_the_same_model_as_the_vmapped_trainer(tiny_classification, optimizer):
    model, train, _ = tiny_classification
    task = dg.ClassificationTask()
    config = TrainConfig(
        optimizer=optimizer,
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-2,
        steps=12,
        batch_size=8,
        schedule="cosine",
        warmup=0.2,
    )
    members = [Member(torch.arange(0, 40, 2), seed=3), Member(torch.arange(25), seed=4)]
    stacked = EnsembleTrainer(model, task, config).train(train, members)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for j, member in enumerate(members):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
        finetune(model, task, train, member, config)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), stacked[n][j], rtol=1e-4, atol=1e-6)
            assert not torch.equal(p.detach(), start[n])


def test_a_killed_member_resumes_from_its_checkpoint(tiny_classification, tmp_path):
    model, train, _ = tiny_classification
    task = dg.ClassificationTask()
    config = TrainConfig(optimizer="adam", lr=0.02, steps=10, batch_size=8, schedule="cosine")
    member = Member(torch.arange(30), seed=1)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    def reset():
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])

    finetune(model, task, train, member, config)
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    reset()
    calls = []

    def dies_at_step_7(outputs, batch, aux):
        calls.append(1)
        if len(calls) == 7:
            raise _Killed
        return task.loss(outputs, batch).mean()

    ckpt = tmp_path / "member.pt"
    with pytest.raises(_Killed):
        finetune(model, task, train, member, config, objective=dies_at_step_7, checkpoint=ckpt, checkpoint_every=3)
    assert ckpt.exists() and ckpt.read_bytes()[8:9] == b"{"  # safetensors (8-byte header size, JSON), no pickle
    reset()  # a new process starts from θ₀; the checkpoint holds steps 1-6
    calls.clear()
    finetune(model, task, train, member, config, checkpoint=ckpt, checkpoint_every=3, objective=dies_at_step_7)
    assert len(calls) == 4 and not ckpt.exists()  # steps 7-10 only
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], rtol=1e-5, atol=1e-7)


def test_a_corrupt_checkpoint_gets_a_clear_error(tiny_classification, tmp_path):
    model, train, _ = tiny_classification
    config = TrainConfig(optimizer="adam", lr=0.02, steps=4, batch_size=8)
    ckpt = tmp_path / "member.safetensors"
    ckpt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(dg.CorruptCacheError, match="member.safetensors is unreadable.*delete it"):
        finetune(model, dg.ClassificationTask(), train, Member(torch.arange(10), 0), config, checkpoint=ckpt)


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    config = transformers.GPT2Config(
        vocab_size=31, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 31, (12, 10), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids}


def test_lora_adapts_the_mlp_projections_and_starts_at_theta0():
    model, data = _tiny_gpt2()
    task = dg.CausalLMTask()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        before = task.loss(task.outputs(model, data), data)
    net = add_lora(model, LoraConfig(rank=4, alpha=8))
    names = lora_names(net)
    assert names and all(".mlp." in n for n in names)
    assert {n.split(".mlp.")[1].split(".")[0] for n in names} == {"c_fc", "c_proj"}
    reset_lora(net, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(task.loss(task.outputs(net, data), data), before)  # B = 0
    config = TrainConfig(optimizer="adamw", lr=1e-2, steps=4, batch_size=4, schedule="cosine", warmup=0.25)
    finetune(net, task, data, Member(torch.arange(8), seed=2), config)
    with torch.no_grad():
        after = task.loss(task.outputs(net, data), data)
    assert not torch.allclose(after, before)
    restored = remove_lora(net, flags)
    assert restored is model and not lora_names(model)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), base[n]) and p.requires_grad == flags[n]


def test_lora_targets_that_match_nothing_are_named_and_short_names_find_conv1d(recwarn):
    """A typo in target_modules was peft's NoMatchingPeftModuleError traceback; a short name of a GPT-2 Conv1D
    (c_fc) left fan_in_fan_out off, which peft warned about and corrected."""
    model, _ = _tiny_gpt2()
    with pytest.raises(dg.DunegrassError, match=r"target_modules \['q_proj'\] match no module of GPT2LMHeadModel; "
                       r"its linear layers are named c_attn, c_fc, c_proj"):  # fmt: skip
        add_lora(model, LoraConfig(target_modules=["q_proj"]))
    assert not lora_names(model)
    net = add_lora(model, LoraConfig(rank=2, target_modules=["c_fc"]))
    assert lora_names(net) and not [w for w in recwarn if "fan_in_fan_out" in str(w.message)]
    remove_lora(net, {n: True for n, _ in model.named_parameters()})


def test_daunce_with_lora_on_a_causal_lm_leaves_the_model_unchanged(tmp_path):
    model, data = _tiny_gpt2()
    task = dg.CausalLMTask()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    queries = {"input_ids": data["input_ids"][:3].flip(1)}
    daunce = Daunce(model, task, num_models=3, lora=LoraConfig(rank=4), steps=3, train_batch_size=4, lr=1e-2, seed=1)
    scores = daunce.fit(data, cache_dir=tmp_path).score(queries)
    assert daunce.trainer_used == "finetune"
    assert scores.shape == (3, 12) and torch.isfinite(scores.values).all() and (scores.stderr > 0).all()
    assert scores.values.abs().max() > 0
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), base[n])
    kept = daunce.store.load_weights(0)
    assert kept and all("lora_" in n for n in kept)
    # The scores are the covariance of each kept member's own losses, evaluated here through peft by hand.
    peft = add_lora(model, LoraConfig(rank=4)).eval()
    rows = []
    for k in range(3):
        load_state(peft, daunce.store.load_weights(k))
        with torch.no_grad():
            rows.append([task.loss(task.outputs(peft, b), b) for b in (data, queries)])
    remove_lora(peft, {n: True for n, _ in model.named_parameters()})
    A = torch.stack([r[0] for r in rows]).double()
    B = torch.stack([r[1] for r in rows]).double()
    want = (B - B.mean(0)).T @ (A - A.mean(0)) / 2
    torch.testing.assert_close(scores.values.double(), want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


def test_lora_dropout_is_off_so_members_are_reproducible():
    model, data = _tiny_gpt2()

    def signals():
        lora = LoraConfig(rank=4, dropout=0.5)
        daunce = Daunce(model, dg.CausalLMTask(), num_models=3, lora=lora, steps=3, train_batch_size=4, lr=1e-2, seed=1)
        return daunce.fit(data).signals()[0]

    torch.testing.assert_close(signals(), signals(), rtol=0, atol=0)


def test_lora_on_a_model_that_already_has_adapters_is_refused_before_anything_changes():
    """Unloading our adapters stripped the user's too (and crashed inside peft): a user's LoRA fine-tune."""
    import peft

    model, data = _tiny_gpt2()
    users = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    before = {n: p.detach().clone() for n, p in users.named_parameters()}
    with pytest.raises(dg.DunegrassError, match="already carries LoRA adapters.*without lora="):
        Daunce(users, dg.CausalLMTask(), num_models=2, lora=LoraConfig(rank=4), steps=2).fit(data)
    after = dict(users.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
