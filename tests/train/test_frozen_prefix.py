"""FrozenPrefix: with LoRA on the last blocks, θ₀'s states below them are kept per example and reused,
giving the same outputs and the same Daunce scores as running every block, within a stated memory bound."""

import pytest
import torch

import dunegrass as dg
from dunegrass.errors import DunegrassError
from dunegrass.methods.daunce import Daunce
from dunegrass.train.frozen_prefix import FrozenPrefix, block_list
from dunegrass.train.lora import LoraConfig, add_lora, lora_names, remove_lora

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


def _model(kind: str, device):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=4, n_head=2)
        return transformers.GPT2LMHeadModel(config).to(device).eval()
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(device).eval()


def _lm_data(padded_batch, n=24, seed=0, side="right"):
    data = padded_batch(n=n, t=10, vocab=40, seed=seed, side=side)
    data["labels"] = data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
    return data


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_skipping_the_frozen_blocks_gives_the_full_models_outputs(kind, side, padded_batch, device):
    model = _model(kind, device)
    task = dg.CausalLMTask()
    net = add_lora(model, LoraConfig(rank=4, last_layers=1)).eval()
    assert lora_names(net) and all(".3." in n for n in lora_names(net))  # block 3 of 4 only
    data = {k: v.to(device) for k, v in _lm_data(padded_batch, side=side).items()}
    with torch.no_grad():
        for mod in net.modules():  # adapters away from zero, so that the top block really differs from θ₀'s
            if hasattr(mod, "lora_B"):
                for b in mod.lora_B.values():
                    b.weight.normal_()
        full = task.loss(task.outputs(net, data), data)
        prefix = FrozenPrefix.install(net, max_bytes=1 << 20)
        assert prefix is not None and prefix.first == 3
        head = {k: v[:16] for k, v in data.items()}
        first = task.loss(task.outputs(net, head), head)
        distinct = len({tuple(r) for r in head["input_ids"].tolist()})
        assert prefix.misses == 1 and prefix.hits == 0 and len(prefix.cache) == distinct
        # The same examples in another order and batch, with others' padding: all known, the prefix skipped.
        order = torch.tensor([7, 2, 15, 0, 9])
        sub = {k: v[order] for k, v in data.items()}
        trimmed = {k: v[:, : int(sub["attention_mask"].sum(1).max())] if side == "right" else v for k, v in sub.items()}
        again = task.loss(task.outputs(net, trimmed), trimmed)
        assert prefix.hits == 1
        with net.disable_adapter():  # θ₀'s outputs (Daunce's anchors) go through the same cache
            theta0_skipped = task.loss(task.outputs(net, sub), sub)
        rest = task.loss(task.outputs(net, data), data)  # 8 unknown rows: run in full, then kept
        prefix.close()
        with net.disable_adapter():
            theta0 = task.loss(task.outputs(net, sub), sub)
    torch.testing.assert_close(first, full[:16], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, full[order], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rest, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theta0_skipped, theta0, rtol=1e-5, atol=1e-6)
    assert prefix.hits == 2 and len(prefix.cache) == 0  # closed: states released
    assert all("forward" not in vars(b) for b in block_list(net)[1])  # the blocks' own forward again


def test_the_memory_bound_holds_and_rows_beyond_it_are_recomputed(padded_batch, device):
    net = add_lora(_model("gpt2", device), LoraConfig(rank=4, last_layers=2)).eval()
    task = dg.CausalLMTask()
    data = {k: v.to(device) for k, v in _lm_data(padded_batch).items()}
    with torch.no_grad():
        full = task.loss(task.outputs(net, data), data)
        one_row = 10 * 16 * 4  # at most 10 tokens × 16 features × float32
        prefix = FrozenPrefix.install(net, max_bytes=5 * one_row)
        assert prefix.first == 2
        for _ in range(2):
            out = task.loss(task.outputs(net, data), data)
            torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-6)
        assert 0 < prefix.bytes <= 5 * one_row and prefix.hits == 0  # never all known: always the full model
        prefix.close()


def test_other_inputs_run_in_full_and_close_puts_back_a_blocks_own_forward(padded_batch, device):
    net = add_lora(_model("llama", device), LoraConfig(rank=4, last_layers=1)).eval()
    blocks = block_list(net)[1]
    calls = []
    original = blocks[0].forward

    def hooked(*args, **kwargs):  # an instance forward of someone else's (e.g. accelerate's device hook)
        calls.append(1)
        return original(*args, **kwargs)

    blocks[0].forward = hooked
    data = {k: v.to(device) for k, v in _lm_data(padded_batch, n=6).items()}
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    with torch.no_grad():
        prefix = FrozenPrefix.install(net)
        net(**inputs)
        net(**inputs)
        assert prefix.hits == 1 and len(calls) == 1  # the second pass skipped block 0
        full = net(**inputs, output_hidden_states=True)  # hidden states asked for: nothing may be skipped
        cached = net(**inputs, use_cache=True)  # a key-value cache of every block: nothing may be skipped
        assert prefix.hits == 1 and len(calls) == 3
        torch.testing.assert_close(full.logits, cached.logits, rtol=1e-5, atol=1e-6)
        prefix.close()
    assert vars(blocks[0])["forward"] is hooked and all("forward" not in vars(b) for b in blocks[1:])


def test_nothing_is_installed_where_nothing_can_be_skipped(device):
    model = _model("gpt2", device)
    everywhere = add_lora(model, LoraConfig(rank=4)).eval()  # adapters in block 0: nothing below them
    assert FrozenPrefix.install(everywhere) is None
    remove_lora(everywhere, {n: True for n, _ in model.named_parameters()})
    top = add_lora(model, LoraConfig(rank=4, last_layers=1))
    assert FrozenPrefix.install(top.train()) is None  # dropout would make θ₀'s states random
    assert FrozenPrefix.install(top.eval(), max_bytes=0) is None
    with pytest.raises(DunegrassError, match="last_layers must be an integer in \\[1, 4\\]"):
        add_lora(_model("gpt2", device), LoraConfig(last_layers=5))
    with pytest.raises(DunegrassError, match="no stack of transformer blocks|needs a stack"):
        add_lora(torch.nn.Sequential(torch.nn.Linear(3, 3)), LoraConfig(target_modules=["0"], last_layers=1))


def _record_installs(monkeypatch) -> list:
    """Every FrozenPrefix.install's result (None where nothing was installed), in order."""
    made = []
    install = FrozenPrefix.install.__func__
    monkeypatch.setattr(FrozenPrefix, "install", classmethod(lambda cls, *a, **k: made.append(install(cls, *a, **k))
                                                             or made[-1]))  # fmt: skip
    return made


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_daunce_scores_equal_with_and_without_the_prefix_cache(kind, padded_batch, device, monkeypatch):
    data = _lm_data(padded_batch, n=20)
    queries = _lm_data(padded_batch, n=3, seed=1)

    made = _record_installs(monkeypatch)

    def run(mib):
        model = _model(kind, device)
        lora = LoraConfig(rank=4, last_layers=1)
        daunce = Daunce(model, dg.CausalLMTask(), num_models=3, lora=lora, prefix_cache_mib=mib, seed=2)
        return daunce.fit(data, queries=queries).score(queries).values, model

    cached, model = run(1)
    assert made[-1] is not None and made[-1].hits > made[-1].misses  # members ran from the kept states
    plain, _ = run(0)
    assert made[-1] is None
    assert cached.abs().max() > 0
    torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-4 * plain.abs().max().item())
    assert not lora_names(model) and all("forward" not in vars(m) for m in model.modules())  # left as it was


def test_the_black_box_back_end_keeps_the_states_across_members_until_the_weights_change(
    padded_batch, device, monkeypatch
):
    """LocalBackend kept θ₀'s states for one member's epochs only: each member and each loss evaluation ran
    every frozen block again. Now they are shared (same losses as without them) and dropped when the model's
    weights change."""
    from dunegrass.methods.blackbox import BlackBoxDaunce, LocalBackend

    data = _lm_data(padded_batch, n=16)
    queries = _lm_data(padded_batch, n=3, seed=1)
    made = _record_installs(monkeypatch)
    recipe = dg.TrainConfig(lr=1e-2, steps=4, batch_size=4)

    def run(mib):
        model = _model("llama", device)
        backend = LocalBackend(
            model, dg.CausalLMTask(), recipe, LoraConfig(rank=4, last_layers=1), prefix_cache_mib=mib
        )
        return BlackBoxDaunce(backend, num_models=3, seed=1).fit(data).score(queries).values, backend, model

    kept, backend, model = run(1)
    installs = [p for p in made if p is not None]
    # per member a fine-tune and its training losses, then each member's query losses; one set of states
    assert len(installs) == 3 * 3 and len({id(p.kept) for p in installs}) == 1 and len(backend.kept.states) == 16 + 3
    # after the first member's fine-tune and losses every training row is known: no frozen block runs again
    assert [(p.hits, p.misses) for p in installs[2:6]] == [(4, 0), (1, 0), (4, 0), (1, 0)]
    assert installs[6].misses == 1 and [(p.hits, p.misses) for p in installs[7:]] == [(1, 0), (1, 0)]  # queries
    plain, _, _ = run(0)
    assert kept.abs().max() > 0
    torch.testing.assert_close(kept, plain, rtol=1e-4, atol=1e-4 * plain.abs().max().item())
    assert not lora_names(model) and all("forward" not in vars(m) for m in model.modules())  # left as it was
    edits = [
        lambda: next(model.parameters()).add_(1.0),
        lambda: model.model.layers[0].mlp.down_proj.weight.data.mul_(2.0),  # no version counter moves
        lambda: model.model.rotary_emb.inv_freq.mul_(1.5),  # a buffer
        lambda: model.model.embed_tokens.weight.index_copy_(  # two rows swapped: sum and norm unchanged
            0, torch.tensor([1, 2], device=device), model.model.embed_tokens.weight[[2, 1]].clone()
        ),
    ]
    for edit in edits:  # other weights: the kept states are not theirs
        backend.kept.states[b"row"] = torch.zeros(1)
        assert backend.kept.for_weights(model).states  # unchanged weights: kept
        with torch.no_grad():
            edit()
        assert backend.kept.for_weights(model).states == {}


def test_last_layers_takes_short_target_names_and_checks_itself(device):
    model = _model("llama", device)
    net = add_lora(model, LoraConfig(rank=4, target_modules=["q_proj", "v_proj"], last_layers=1))
    assert sorted({n.split(".lora_")[0].split("model.layers.")[1] for n in lora_names(net)}) == [
        "3.self_attn.q_proj",
        "3.self_attn.v_proj",
    ]
    for bad in (0, -1, "1", True):
        with pytest.raises(DunegrassError, match="last_layers must be a positive integer"):
            LoraConfig(last_layers=bad)
