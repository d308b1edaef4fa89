"""The losses each black-box scoring protocol should read, computed in torch from the model's own weights.

``echo``: −log p(completion | prompt) over the tokens of ``prompt + completion`` that end after the
prompt, the text tokenised as a whole (as the server tokenises it), the first token unscored.
``chat``: −log p(answer | chat template of system and user, with the assistant's turn opened), every
token of the answer.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def echo_losses(model, tokenizer, examples: list[dict]) -> torch.Tensor:
    out = []
    for ex in examples:
        text = ex["prompt"] + ex["completion"]
        enc = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
        ids, ends = enc["input_ids"], enc["offset_mapping"][0, :, 1]
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        counted = ends[1:] > len(ex["prompt"])
        out.append(-logp[counted].sum())
    return torch.stack(out)


@torch.no_grad()
def chat_losses(model, tokenizer, examples: list[dict]) -> torch.Tensor:
    out = []
    for ex in examples:
        messages = ([{"role": "system", "content": ex["system"]}] if ex.get("system") else []) + [
            {"role": "user", "content": ex["prompt"]}
        ]
        prefix = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        start = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tokenizer(prefix + ex["completion"], add_special_tokens=False)["input_ids"]])
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        out.append(-logp[start - 1 :].sum())
    return torch.stack(out)
