"""``dunegrass example DIR``: a runnable example for the commands, made offline in a few seconds.

DIR gets a tiny GPT-2 (random weights) with a word-level tokenizer and a chat template, saved as
``save_pretrained`` saves any Hugging Face model (``model/``), prompt/completion training data
(``train.jsonl``), queries that repeat some of the training examples (``queries.jsonl``) and a config
(``run.toml``). Then::

    cd DIR && dunegrass fit run.toml && dunegrass score run.toml --queries queries.jsonl
"""

from __future__ import annotations

import json
import os

from ..errors import DunegrassError
from ..hf import quiet_progress_bars, require_transformers, tiny_gpt2

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "birds sing in the morning",
    "the sun rose over the hills",
    "fish swim in the cold river",
    "a child reads a long book",
    "rain falls on the old roof",
    "the wind moves the tall trees",
    "stars shine in the dark sky",
    "the baker makes fresh bread",
    "a train crossed the wide plain",
    "snow covers the quiet town",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} | {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
CONFIG = """# dunegrass fit run.toml; dunegrass score run.toml --queries queries.jsonl
model = "model"
data = "train.jsonl"
method = "logra"
name = "words"
cache_dir = "runs"

[method_options]
k_in = 8
k_out = 8
"""


FILES = ("model", "train.jsonl", "queries.jsonl", "run.toml")


def pairs() -> list[dict]:
    """Prompt/completion pairs: a sentence's first two words ask, the rest answers."""
    return [{"prompt": " ".join(s.split()[:2]), "completion": " ".join(s.split()[2:])} for s in SENTENCES]


def save_tiny_lm(path: str, texts: list[str], chat: bool = True, seed: int = 1) -> None:
    """A word-level tokenizer trained on ``texts`` and a tiny GPT-2 with random weights, saved to ``path``."""
    require_transformers()
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = [*texts, "user assistant : |"]
    tok.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    with quiet_progress_bars():  # "Writing model shards" for a file of a few kB
        tiny_gpt2(vocab_size=len(fast), n_positions=96, n_embd=32, seed=seed).save_pretrained(path)


def write_example(directory: str) -> None:
    """The example's model, data and config under ``directory``; refuses to overwrite any of them."""
    there = [name for name in FILES if os.path.exists(os.path.join(directory, name))]
    if there:
        raise DunegrassError(
            f"{directory} already holds {', '.join(there)}, which the example would overwrite; name a new directory"
        )
    os.makedirs(directory, exist_ok=True)
    rows = pairs()
    save_tiny_lm(os.path.join(directory, "model"), SENTENCES)
    with open(os.path.join(directory, "train.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(directory, "queries.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(rows[i]) + "\n" for i in (3, 7))
    with open(os.path.join(directory, "run.toml"), "w", encoding="utf-8") as f:
        f.write(CONFIG)
    print(
        f"wrote a tiny GPT-2 and its tokenizer ({directory}/model), train.jsonl (12 examples), queries.jsonl "
        f"(2 that repeat training examples 3 and 7) and run.toml; next:\n"
        f"  cd {directory} && dunegrass fit run.toml && dunegrass score run.toml --queries queries.jsonl"
    )
