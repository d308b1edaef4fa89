"""The OpenAI-compatible back end against a tiny fake server on 127.0.0.1 (never the network).

The fake service "fine-tunes" a character unigram model on the uploaded completions (add-one
smoothing) and returns echoed per-character log-probabilities, so the expected losses are known
exactly and attribution has a right answer.
"""

import json
import math
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

pytest.importorskip("openai")

from dunegrass.errors import DunegrassError  # noqa: E402
from dunegrass.methods.blackbox import BlackBoxDaunce, OpenAICompatibleBackend  # noqa: E402

ALPHABET = "abcdefghij"
KEY = "sk-test-not-a-real-key"


def _logprob(counts: Counter, ch: str) -> float:
    return math.log((counts[ch] + 1) / (sum(counts.values()) + len(ALPHABET)))


class _Fake(BaseHTTPRequestHandler):
    files: dict = {}
    jobs: dict = {}
    models: dict = {"base": Counter()}
    seen_keys: set = set()

    def log_message(self, *args):
        pass

    def _reply(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.seen_keys.add(self.headers.get("Authorization"))
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/files":
            fid = f"file-{len(self.files)}"
            lines = [line for line in body.decode(errors="ignore").splitlines() if line.startswith('{"prompt"')]
            self.files[fid] = [json.loads(line) for line in lines]
            return self._reply(
                {
                    "id": fid,
                    "object": "file",
                    "bytes": len(body),
                    "created_at": 0,
                    "filename": "daunce-member.jsonl",
                    "purpose": "fine-tune",
                    "status": "processed",
                }
            )
        req = json.loads(body)
        if self.path == "/v1/fine_tuning/jobs":
            jid = f"ftjob-{len(self.jobs)}"
            name = f"ft:base:{jid}"
            self.models[name] = Counter("".join(ex["completion"] for ex in self.files[req["training_file"]]))
            self.jobs[jid] = {
                "id": jid,
                "object": "fine_tuning.job",
                "status": "running",
                "model": req["model"],
                "fine_tuned_model": None,
                "created_at": 0,
                "training_file": req["training_file"],
                "organization_id": "org",
                "result_files": [],
                "seed": req.get("seed", 0),
                "hyperparameters": {"n_epochs": 1},
                "_name": name,
            }
            return self._reply({k: v for k, v in self.jobs[jid].items() if k != "_name"})
        if self.path == "/v1/completions":
            counts = self.models[req["model"]]
            choices = []
            for i, text in enumerate(req["prompt"]):
                lps = [_logprob(counts, ch) for ch in text]
                lps[0] = None  # as the API does: the first token has no log-probability
                choices.append(
                    {
                        "index": i,
                        "text": text,
                        "finish_reason": "length",
                        "logprobs": {
                            "tokens": list(text),
                            "token_logprobs": lps,
                            "text_offset": list(range(len(text))),
                            "top_logprobs": None,
                        },
                    }
                )
            return self._reply(
                {"id": "cmpl", "object": "text_completion", "created": 0, "model": req["model"], "choices": choices}
            )
        self.send_error(404)

    def do_GET(self):
        jid = self.path.rsplit("/", 1)[1]
        job = self.jobs[jid]
        job.update(status="succeeded", fine_tuned_model=job["_name"])
        return self._reply({k: v for k, v in job.items() if k != "_name"})


@pytest.fixture
def server(monkeypatch):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("DUNEGRASS_TEST_KEY", KEY)
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def _examples(n, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        # Each example leans on two letters, so examples that share letters help each other.
        a, b = torch.randint(0, len(ALPHABET), (2,), generator=gen).tolist()
        completion = "".join(ALPHABET[c] for c in torch.randint(0, 10, (12,), generator=gen).tolist()) + (
            ALPHABET[a] * 6 + ALPHABET[b] * 6
        )
        out.append({"prompt": "Q: ", "completion": completion})
    return out


def test_openai_backend_fine_tunes_and_reads_completion_logprobs(server, tmp_path):
    backend = OpenAICompatibleBackend("base", base_url=server, api_key_env="DUNEGRASS_TEST_KEY", poll_seconds=0.01)
    train = _examples(30, 0)
    handle = backend.fine_tune(train, torch.tensor([0, 1, 2]), seed=5)
    counts = Counter("".join(train[i]["completion"] for i in range(3)))
    got = backend.losses(handle, train[:4])
    want = torch.tensor(
        [-sum(_logprob(counts, ch) for ch in ex["completion"]) for ex in train[:4]], dtype=torch.float64
    )
    torch.testing.assert_close(got, want)  # prompt tokens are not counted
    assert _Fake.seen_keys == {f"Bearer {KEY}"}

    daunce = BlackBoxDaunce(backend, num_models=24, subsample_ratio=0.5, seed=1)
    scores = daunce.fit(train, cache_dir=tmp_path).score(train[:5])
    assert (scores.top(1)[0][:, 0] == torch.arange(5)).all()  # each example is its own top proponent
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes()


def test_a_run_killed_while_waiting_reattaches_to_its_job(server, tmp_path, monkeypatch):
    backend = OpenAICompatibleBackend("base", base_url=server, api_key_env="DUNEGRASS_TEST_KEY", poll_seconds=0.01)
    train, started = _examples(12, 1), len(_Fake.jobs)
    wait = backend.wait_job
    monkeypatch.setattr(backend, "wait_job", lambda job: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        BlackBoxDaunce(backend, num_models=3, seed=2).fit(train, cache_dir=tmp_path)
    assert len(_Fake.jobs) == started + 1  # the first member's job was started, then the run died
    monkeypatch.setattr(backend, "wait_job", wait)
    resumed = BlackBoxDaunce(backend, num_models=3, seed=2).fit(train, cache_dir=tmp_path)
    assert len(_Fake.jobs) == started + 3  # re-attached to the first job: three jobs for three members
    fresh = BlackBoxDaunce(backend, num_models=3, seed=2).fit(train)
    torch.testing.assert_close(resumed.signals()[0], fresh.signals()[0])


def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("DUNEGRASS_MISSING_KEY", raising=False)
    backend = OpenAICompatibleBackend("base", base_url="http://127.0.0.1:9/v1", api_key_env="DUNEGRASS_MISSING_KEY")
    with pytest.raises(DunegrassError, match="DUNEGRASS_MISSING_KEY"):
        backend.fine_tune([{"prompt": "a", "completion": "b"}], torch.tensor([0]), seed=0)


def test_a_token_straddling_the_prompt_boundary_counts_for_the_completion():
    from types import SimpleNamespace as NS

    # "Q: " + "yes": the service tokenises "Q:", " yes" — the second token starts inside the prompt.
    logprobs = NS(tokens=["Q:", " yes"], token_logprobs=[None, -0.7], text_offset=[0, 2])
    response = NS(choices=[NS(index=0, logprobs=logprobs)])
    backend = OpenAICompatibleBackend("base-model")
    backend._client = NS(completions=NS(create=lambda **kwargs: response))
    loss = backend.losses("ft:model", [{"prompt": "Q: ", "completion": "yes"}])
    torch.testing.assert_close(loss, torch.tensor([0.7], dtype=torch.float64))
