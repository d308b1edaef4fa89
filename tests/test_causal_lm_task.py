"""CausalLMTask: per-example mean token loss and sequence log-probability, with padding and -100 ignored."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dunegrass as dg
from dunegrass.errors import DunegrassError
from dunegrass.gradients import per_sample_gradients

transformers = pytest.importorskip("transformers")

from dunegrass.hf import tiny_gpt2  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(vocab_size=30, n_positions=16, n_embd=16, n_layer=1, n_head=2, seed=1)


def sequences(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 30, (int(length),), generator=gen) for length in torch.randint(3, 11, (n,), generator=gen)]


def pad(seqs: list[torch.Tensor], side: str, width: int = 12) -> dict:
    ids, mask = torch.zeros(len(seqs), width, dtype=torch.long), torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, cols], mask[i, cols] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def values(task, model, batch):
    with torch.no_grad():
        return task.measurement(task.outputs(model, batch), batch)


def test_loss_matches_hugging_face_for_unpadded_rows(model):
    task = dg.CausalLMTask()
    for s in sequences():
        batch = {"input_ids": s[None]}
        with torch.no_grad():
            want = model(input_ids=s[None], labels=s[None]).loss
        torch.testing.assert_close(values(task, model, batch), want[None])


@pytest.mark.parametrize("measurement", ["loss", "logprob"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_equal_the_unpadded_sequence(model, measurement, side):
    task = dg.CausalLMTask(measurement)
    seqs = sequences()
    got = values(task, model, pad(seqs, side))
    alone = torch.cat([values(task, model, {"input_ids": s[None]}) for s in seqs])
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_left_padding_gradients_equal_unpadded(model):
    """Positions count attended tokens only, so left padding changes no gradient either."""
    task = dg.CausalLMTask()
    seqs = sequences()

    def objective(m, b):
        return task.loss(task.outputs(m, b), b)

    names = ["transformer.h.0.attn.c_attn.weight", "transformer.wpe.weight"]
    padded = per_sample_gradients(model, objective, pad(seqs, "left"), names)
    alone = torch.cat([per_sample_gradients(model, objective, {"input_ids": s[None]}, names) for s in seqs])
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-6)


def test_ignored_labels_and_logprob_by_hand(model):
    seq = sequences(1)[0]
    labels = seq.clone()
    labels[1] = -100
    labels[-1] = -100
    batch = {"input_ids": seq[None], "labels": labels[None]}
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=seq[None]).logits[0, :-1], -1)
    target = labels[1:]
    counted = target != -100
    picked = logp[torch.arange(len(target)), target.clamp_min(0)][counted]
    torch.testing.assert_close(values(dg.CausalLMTask(), model, batch), -picked.mean()[None])
    task = dg.CausalLMTask("logprob")
    torch.testing.assert_close(values(task, model, batch), picked.sum()[None])
    assert task.measurement_higher_is_better
    with torch.no_grad():
        out = task.outputs(model, batch)
    torch.testing.assert_close(task.query_loss(out, batch), -picked.sum()[None])


def test_models_without_position_ids_get_the_mask_only():
    class Bigram(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(30, 30)

        def forward(self, input_ids, attention_mask=None):
            return self.table(input_ids)

    model, task = Bigram(), dg.CausalLMTask()
    seqs = sequences()
    got = values(task, model, pad(seqs, "left"))
    want = torch.stack([F.cross_entropy(model.table(s[:-1]), s[1:]) for s in seqs]).detach()
    torch.testing.assert_close(got, want)


def test_bad_batches_and_measurements_get_clear_errors(model):
    with pytest.raises(DunegrassError, match="unknown measurement 'margin'"):
        dg.CausalLMTask("margin")
    with pytest.raises(DunegrassError, match="expects dict batches with 'input_ids'"):
        dg.CausalLMTask().outputs(model, (torch.zeros(2, 3, dtype=torch.long),))


def test_an_example_with_no_token_to_score_is_named(monkeypatch):
    """Its gradient is 0, so it scores 0 against everything: said instead of silent zeros."""
    from dunegrass import notices

    monkeypatch.setattr(notices, "_said", set())
    ids = torch.randint(0, 90, (3, 6), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, 1:] = -100  # only the first label is set, and the first token is never predicted
    task = dg.CausalLMTask()
    with pytest.warns(dg.DunegrassWarning, match=r"1 example\(s\) of a batch have no token with a loss"):
        task.check_batch({"input_ids": ids, "labels": labels}, torch.Size([6, 96]))
    monkeypatch.setattr(notices, "_said", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task.check_batch({"input_ids": ids}, torch.Size([6, 96]))
