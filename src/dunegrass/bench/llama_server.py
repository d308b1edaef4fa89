"""llama.cpp's OpenAI-compatible server (``llama-cpp-python[server]``) serving SmolLM2-135M-Instruct's GGUF
file on the loopback interface: a real service for the black-box protocols, started and stopped here.

    with llama_server() as url:   # "http://127.0.0.1:<port>/v1"
        ...

``--logits_all true`` makes it return prompt log-probabilities (the echo protocol). Its completions
endpoint takes one prompt a request, so the echo protocol runs with ``batch_size=1`` against it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

from ..errors import DunegrassError
from .smollm2 import gguf_file

INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install "llama-cpp-python[server]"  # builds in about 8 minutes'


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("uvicorn") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(n_ctx: int = 1024, startup_seconds: float = 120.0) -> Iterator[str]:
    """Start the server on a free loopback port, yield its ``/v1`` URL, stop it on exit."""
    if not available():
        raise DunegrassError(f"llama.cpp's server is not installed: {INSTALL}")
    folder, name = gguf_file()
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", os.path.join(folder, name)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--logits_all", "true"]
    cmd += ["--model_alias", "smollm2", "--n_threads", str(max(1, (os.cpu_count() or 1)))]
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + startup_seconds
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise DunegrassError(f"llama.cpp's server exited while starting:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as resp:
                    json.load(resp)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise DunegrassError(f"llama.cpp's server did not answer within {startup_seconds:.0f} s") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
