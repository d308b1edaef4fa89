"""Data as users hold them: tensors, dict batches, and datasets of token sequences of different lengths."""

import pytest
import torch

import dunegrass as dg
from dunegrass.data import Padded, iterate_batches
from dunegrass.hf import tiny_gpt2


class _Sequences(torch.utils.data.Dataset):
    """Token sequences of 4 to 11 tokens, as a tokenised text dataset holds them."""

    def __init__(self, n: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        lengths = torch.randint(4, 12, (n,), generator=gen)
        self.rows = [torch.randint(1, 90, (int(t),), generator=gen) for t in lengths]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i]}


def test_padded_sequences_are_batched_with_their_attention_mask():
    data = Padded(_Sequences(5, 0), pad_id=0, side="left")
    _, batch = next(iterate_batches(data, 5))
    lengths = [len(data[i]["input_ids"]) for i in range(5)]
    assert batch["input_ids"].shape == (5, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    with pytest.raises(dg.DunegrassError, match="side must be"):
        Padded(_Sequences(2, 0), side="middle")


def test_sequences_of_different_lengths_without_padding_name_the_fix():
    with pytest.raises(dg.DunegrassError, match=r"batch from example 4 holds tensors of different lengths.*Padded"):
        list(iterate_batches(_Sequences(8, 0), 4, start=4))
    assert len(list(iterate_batches(Padded(_Sequences(8, 0)), 4))) == 2
    rows = [{"input_ids": list(range(n))} for n in (3, 5)]  # as a Hugging Face dataset without torch format
    with pytest.raises(dg.DunegrassError, match="batch from example 0 holds tensors of different lengths"):
        list(iterate_batches(rows, 2))


def test_padded_class_labels_stay_one_per_row():
    """A sequence classifier's rows carry one class index ("labels", or a Hugging Face dataset's "label"):
    it was padded like token labels (a raw padding error), and "label" was ignored (ids taken as labels)."""
    rows = [{"input_ids": [1, 2, 3], "label": 2}, {"input_ids": [4], "labels": torch.tensor(0)}]
    batch = Padded(rows, pad_id=9).collate_fn(rows)
    assert batch["labels"].tolist() == [2, 0] and batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]


@pytest.mark.parametrize("name", ["logra", "gradient"])
def test_scores_of_padded_sequences_do_not_depend_on_the_batch_size(device, name):
    """Without a collate that pads, such a dataset failed with a raw 'stack expects each tensor to be equal size'."""
    model = tiny_gpt2().to(device)
    task = dg.CausalLMTask()
    build = {
        "logra": lambda b: dg.LoGra(model, task, k_in=4, k_out=4, batch_size=b),
        "gradient": lambda b: dg.GradientInfluence(model, task, compressor="sjlt:32", batch_size=b),
    }[name]
    train, queries = Padded(_Sequences(20, 0)), Padded(_Sequences(3, 1))
    a = build(7).fit(train).score(queries).values
    b = build(3).fit(train).score(queries).values
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * a.abs().max().item())


def test_a_list_of_examples_is_a_dataset(tiny_classification):
    """(x, y) pairs or dicts in a list, as users often hold them, score as the stacked tensors do (the list was
    read as columns and refused)."""
    model, (x, y), (xq, yq) = tiny_classification
    task = dg.ClassificationTask()
    want = dg.GraSS(model, task, k=16).fit((x, y)).score((xq, yq)).values
    pairs = [(x[i], int(y[i])) for i in range(len(y))]
    dicts = [{"inputs": xq[i], "labels": yq[i]} for i in range(len(yq))]
    got = dg.GraSS(model, task, k=16).fit(pairs).score(dicts).values
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(dg.DunegrassError, match="the dataset is empty"):
        dg.GraSS(model, task, k=16).fit([])
