"""Black-box training examples: a prompt, the answer the model is trained to give, an optional system prompt."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.utils.data import Dataset

from ...errors import DunegrassError


class PromptCompletions(Dataset):
    """A list of ``{"prompt": str, "completion": str}`` examples (``"system": str`` optional, used by the
    chat protocol; "" when absent) as a map-style dataset."""

    def __init__(self, examples: list[Mapping[str, str]]):
        for i, ex in enumerate(examples):
            if (
                not isinstance(ex, Mapping)
                or not isinstance(ex.get("prompt"), str)
                or not isinstance(ex.get("completion"), str)
                or not isinstance(ex.get("system", ""), str)
            ):
                raise DunegrassError(
                    f"example {i} must be a dict with string 'prompt' and 'completion' (and optionally 'system')"
                )
        # Every example has the same keys (a missing system prompt is ""), so batches of them collate.
        self.examples = [
            {"system": ex.get("system", ""), "prompt": ex["prompt"], "completion": ex["completion"]} for ex in examples
        ]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, str]:
        return self.examples[i]


def as_examples(data: Any) -> PromptCompletions:
    return data if isinstance(data, PromptCompletions) else PromptCompletions(list(data))
