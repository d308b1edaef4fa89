"""The OpenAI-compatible back end against a tiny fake server on 127.0.0.1 (never the network).

The fake service "fine-tunes" a character unigram model on the uploaded answers (add-one smoothing;
files in the prompt/completion or the chat format, bodies shaped as the API documents them) and
returns echoed per-character log-probabilities (completions) or a greedy reply with ``top_logprobs``
(chat completions), so the expected losses are known exactly and attribution has a right answer.
"""

import json
import logging
import math
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
import torch

pytest.importorskip("openai")

from dunegrass.errors import DunegrassError  # noqa: E402
from dunegrass.methods.blackbox import BlackBoxDaunce, OpenAICompatibleBackend  # noqa: E402
from dunegrass.notices import DunegrassWarning  # noqa: E402

ALPHABET = "abcdefghij"
KEY = "sk-test-not-a-real-key"


def _logprob(counts: Counter, ch: str) -> float:
    return math.log((counts[ch] + 1) / (sum(counts.values()) + len(ALPHABET)))


def _answer(record: dict) -> str:
    """The text a training line teaches, in either file format."""
    if "messages" in record:
        (assistant,) = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        return assistant
    return record["completion"]


class _Fake(BaseHTTPRequestHandler):
    files: dict = {}
    jobs: dict = {}
    models: dict = {"base": Counter()}
    seen_keys: set = set()
    requests: list = []  # (path, body) of every POST
    throttle = 0  # answer this many of the next requests with 429 (a rate limit)
    fail_jobs = False  # jobs end as "failed" with an error message (and stay failed)
    drop_job_replies = 0  # create this many jobs but answer 500, as a request that timed out after the fact

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
        self.requests.append((self.path, body))
        if _Fake.throttle > 0:
            _Fake.throttle -= 1
            body = b'{"error": {"message": "Rate limit reached", "type": "requests"}}'
            self.send_response(429)
            self.send_header("Retry-After-Ms", "10")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return self.wfile.write(body)
        if self.path == "/v1/files":
            fid = f"file-{len(self.files)}"
            lines = [line for line in body.decode(errors="ignore").splitlines() if line.startswith("{")]
            self.files[fid] = [_answer(json.loads(line)) for line in lines]
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
            self.models[name] = Counter("".join(self.files[req["training_file"]]))
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
                "metadata": req.get("metadata"),
                "_name": name,
                "_suffix": req.get("suffix"),
            }
            if _Fake.drop_job_replies > 0:
                _Fake.drop_job_replies -= 1
                return self.send_error(500)
            return self._reply(_public(self.jobs[jid]))
        if self.path == "/v1/completions":
            counts = self.models[req["model"]]
            choices = []
            for i, text in enumerate(req["prompt"]):
                lps = [_logprob(counts, ch) for ch in text]
                lps[0] = None  # as the API does: the first token has no log-probability
                if req.get("max_tokens"):  # echo, then the generated tokens
                    text, lps = text + "z" * req["max_tokens"], lps + [-0.1] * req["max_tokens"]
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
        if self.path == "/v1/chat/completions":
            counts = self.models[req["model"]]
            ranked = sorted(ALPHABET, key=lambda ch: (-_logprob(counts, ch), ch))
            top = [{"token": ch, "bytes": list(ch.encode()), "logprob": _logprob(counts, ch)} for ch in ranked]
            position = {**top[0], "top_logprobs": top[: req["top_logprobs"]]}  # greedy: the likeliest letter
            message = {"role": "assistant", "content": ranked[0] * req["max_tokens"]}
            choice = {
                "index": 0,
                "message": message,
                "finish_reason": "length",
                "logprobs": {"content": [position] * req["max_tokens"], "refusal": None},
            }
            return self._reply(
                {"id": "chat", "object": "chat.completion", "created": 0, "model": req["model"], "choices": [choice]}
            )
        self.send_error(404)

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/v1/fine_tuning/jobs":  # list, filtered by metadata[key]=value as the API documents
            wanted = {k[len("metadata[") : -1]: v[0] for k, v in parse_qs(url.query).items() if k.startswith("meta")}
            found = [_public(j) for j in self.jobs.values() if wanted and (j["metadata"] or {}) == wanted]
            return self._reply({"object": "list", "data": found, "has_more": False})
        job = self.jobs[url.path.rsplit("/", 1)[1]]
        if _Fake.fail_jobs or job["status"] == "failed":
            error = {"code": "invalid_training_file", "message": "Training file has too few examples", "param": None}
            job.update(status="failed", error=error)
        else:
            job.update(status="succeeded", fine_tuned_model=job["_name"])
        return self._reply(_public(job))


def _public(job: dict) -> dict:
    return {k: v for k, v in job.items() if not k.startswith("_")}


@pytest.fixture
def server(monkeypatch):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("DUNEGRASS_TEST_KEY", KEY)
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    _Fake.throttle, _Fake.fail_jobs, _Fake.drop_job_replies = 0, False, 0


def _echo(url, **kwargs):
    return OpenAICompatibleBackend(
        "base", base_url=url, protocol="echo", api_key_env="DUNEGRASS_TEST_KEY", poll_seconds=0.01, **kwargs
    )


def _chat(url, **kwargs):
    return OpenAICompatibleBackend(
        "base", base_url=url, protocol="chat", api_key_env="DUNEGRASS_TEST_KEY", poll_seconds=0.01, **kwargs
    )


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
    backend = _echo(server)
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
    backend = _echo(server)
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
    backend = OpenAICompatibleBackend(
        "base", base_url="http://127.0.0.1:9/v1", protocol="echo", api_key_env="DUNEGRASS_MISSING_KEY"
    )
    with pytest.raises(DunegrassError, match="DUNEGRASS_MISSING_KEY"):
        backend.fine_tune([{"prompt": "a", "completion": "b"}], torch.tensor([0]), seed=0)


def test_a_token_straddling_the_prompt_boundary_counts_for_the_completion():
    from types import SimpleNamespace as NS

    # "Q: " + "yes": the service tokenises "Q:", " yes" — the second token starts inside the prompt.
    logprobs = NS(tokens=["Q:", " yes"], token_logprobs=[None, -0.7], text_offset=[0, 2])
    response = NS(choices=[NS(index=0, logprobs=logprobs)])
    backend = OpenAICompatibleBackend("base-model", protocol="echo")
    backend._client = NS(completions=NS(create=lambda **kwargs: response))
    loss = backend.losses("ft:model", [{"prompt": "Q: ", "completion": "yes"}])
    torch.testing.assert_close(loss, torch.tensor([0.7], dtype=torch.float64))


def _letters(n, seed):
    """One-letter answers: the chat protocol's case (a label, a choice)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        {"system": "Answer with one letter.", "prompt": f"Q{i}?", "completion": ALPHABET[int(c)]}
        for i, c in enumerate(torch.randint(0, len(ALPHABET), (n,), generator=gen))
    ]


def test_chat_protocol_uploads_chat_files_and_reads_answers_from_top_logprobs(server, caplog, capsys):
    caplog.set_level(logging.DEBUG)  # nothing secret in any logger, even at DEBUG
    backend = _chat(server, top_logprobs=3)
    train = _letters(12, 0)
    before = len(_Fake.requests)
    handle = backend.fine_tune(train, torch.tensor([0, 1, 2, 3]), seed=5)
    upload = [body for path, body in _Fake.requests[before:] if path == "/v1/files"][0].decode()
    record = json.loads([line for line in upload.splitlines() if line.startswith("{")][0])
    assert record == {
        "messages": [
            {"role": "system", "content": "Answer with one letter."},
            {"role": "user", "content": "Q0?"},
            {"role": "assistant", "content": train[0]["completion"]},
        ]
    }
    counts = Counter(train[i]["completion"] for i in range(4))
    ranked = sorted(ALPHABET, key=lambda ch: (-_logprob(counts, ch), ch))
    greedy, second, outside = ranked[0], ranked[1], ranked[6]
    top3 = [_logprob(counts, ch) for ch in ranked[:3]]
    floor = min(min(top3), math.log(1 - sum(math.exp(v) for v in top3)))
    answers = [greedy, second, outside, greedy * 3, greedy + second + "xy"]
    with pytest.warns(DunegrassWarning, match="2 of 5 answers"):
        got = backend.losses(handle, [{"prompt": "Q", "completion": a} for a in answers])
    lp = {ch: _logprob(counts, ch) for ch in ALPHABET}
    want = [-lp[greedy], -lp[second], -floor, -3 * lp[greedy], -lp[greedy] - lp[second]]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    # the third answer was below the returned alternatives; the last one's tail ("xy") went unscored
    assert backend.stats == {"requests": 5, "answers": 5, "floored": 1, "tail_unscored": 1}
    assert KEY not in caplog.text and KEY not in "".join(capsys.readouterr())


def test_chat_protocol_refuses_long_answers_before_any_job(server, tmp_path):
    backend = _chat(server)
    train = _letters(6, 1) + [{"prompt": "Explain.", "completion": "a long answer of many words"}]
    before = len(_Fake.requests)
    with pytest.raises(DunegrassError, match="protocol='echo'"):
        BlackBoxDaunce(backend, num_models=2).fit(train, cache_dir=tmp_path)
    assert len(_Fake.requests) == before  # nothing uploaded, no job started
    handle = backend.fine_tune(_letters(6, 1), torch.tensor([0, 1]), seed=0)
    counts = Counter(ex["completion"] for ex in _letters(6, 1)[:2])
    greedy = sorted(ALPHABET, key=lambda ch: (-_logprob(counts, ch), ch))[0]
    with pytest.warns(DunegrassWarning, match="1 of 1"):  # one word, but more tokens than the reply has
        got = backend.losses(handle, [{"prompt": "Q", "completion": greedy * 6}])
    torch.testing.assert_close(got, torch.tensor([-4 * _logprob(counts, greedy)], dtype=torch.float64))
    assert backend.stats["tail_unscored"] == 1 and backend.protocol.exact == [False]


def test_black_box_daunce_through_the_chat_protocol_finds_the_examples_with_the_querys_answer(server, tmp_path):
    backend = _chat(server)
    train, queries = _letters(30, 2), _letters(6, 3)
    daunce = BlackBoxDaunce(backend, num_models=24, subsample_ratio=0.5, seed=1)
    top = daunce.fit(train, cache_dir=tmp_path).score(queries).top(1)[0][:, 0]
    assert [train[int(i)]["completion"] for i in top] == [q["completion"] for q in queries]
    suffixes = {job["_suffix"] for job in _Fake.jobs.values()}
    run = daunce.store.hash[:8]
    assert {f"dg-{run}-m{k}" for k in range(24)} <= suffixes  # every job names its run and member


def test_a_paid_service_shows_the_plan_and_needs_confirm(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(OpenAICompatibleBackend, "paid", property(lambda self: True))
    backend = _echo(server, hyperparameters={"n_epochs": 2})
    train, jobs = _examples(40, 4), len(_Fake.jobs)
    daunce = BlackBoxDaunce(backend, num_models=4, subsample_ratio=0.5)
    plan = daunce.plan(train, queries=train[:5])
    # 20 examples a member; echo: 16 texts a request (40 → 3 requests, 5 queries → 1) for each of 4 members
    assert plan["jobs"] == 4 and plan["training_examples"] == 80 and plan["scoring_requests"] == 4 * 3 + 4 * 1
    assert plan["training_tokens_approx"] == 2 * sum(math.ceil(27 / 4) for _ in range(80))  # 27 chars, 2 epochs
    with pytest.raises(DunegrassError, match="confirm=True"):
        daunce.fit(train, cache_dir=tmp_path)
    assert len(_Fake.jobs) == jobs and "4 fine-tuning jobs" in capsys.readouterr().err
    BlackBoxDaunce(backend, num_models=4, subsample_ratio=0.5, confirm=True).fit(train, cache_dir=tmp_path)
    assert len(_Fake.jobs) == jobs + 4
    BlackBoxDaunce(backend, num_models=4, subsample_ratio=0.5).fit(train, cache_dir=tmp_path)  # nothing to start
    assert len(_Fake.jobs) == jobs + 4
    monkeypatch.setattr("dunegrass.methods.blackbox.daunce.CONFIRM_REQUESTS", 3)
    with pytest.raises(DunegrassError, match="this score would start 0 fine-tuning jobs"):  # 4 members × 1 request
        BlackBoxDaunce(backend, num_models=4, subsample_ratio=0.5).fit(train, cache_dir=tmp_path).score(train[:3])


def test_rate_limits_are_retried_and_a_failed_job_says_why(server):
    backend = _echo(server)
    before = len(_Fake.requests)
    _Fake.throttle = 3
    handle = backend.fine_tune(_examples(4, 5), torch.tensor([0, 1]), seed=0)
    assert handle.startswith("ft:base:") and len(_Fake.requests) - before == 2 + 3  # file, job, 3 retried
    _Fake.fail_jobs = True
    with pytest.raises(DunegrassError, match="too few examples"):
        backend.fine_tune(_examples(4, 5), torch.tensor([0, 1]), seed=0)


def test_a_failed_member_is_started_again_by_the_next_fit(server, tmp_path):
    backend, train, jobs = _echo(server), _examples(10, 6), len(_Fake.jobs)
    _Fake.fail_jobs = True
    with pytest.raises(DunegrassError, match="too few examples"):
        BlackBoxDaunce(backend, num_models=3).fit(train, cache_dir=tmp_path)
    _Fake.fail_jobs = False  # the failed job stays failed; the member gets a new one
    resumed = BlackBoxDaunce(backend, num_models=3).fit(train, cache_dir=tmp_path)
    assert len(_Fake.jobs) == jobs + 1 + 3
    fresh = BlackBoxDaunce(backend, num_models=3).fit(train)
    torch.testing.assert_close(resumed.signals()[0], fresh.signals()[0])


def test_a_job_created_by_a_request_that_failed_is_found_not_paid_for_twice(server, tmp_path):
    backend, train, jobs = _echo(server), _examples(10, 7), len(_Fake.jobs)
    _Fake.drop_job_replies = 1  # the service creates the job, the reply is lost
    BlackBoxDaunce(backend, num_models=2).fit(train, cache_dir=tmp_path)
    assert len(_Fake.jobs) == jobs + 2  # the first member's job was found by its metadata, not created again


def test_the_chat_walk_takes_the_longest_token_and_compares_bytes():
    from types import SimpleNamespace as NS

    from dunegrass.methods.blackbox.protocols import ChatProtocol

    def pos(token, logprob, alts=(), raw=None):
        top = [NS(token=t, logprob=v, bytes=None) for t, v in alts]
        return NS(token=token, logprob=logprob, bytes=raw, top_logprobs=top)

    chat = ChatProtocol()
    # greedy "B" then "ob"; the alternative "Bob" at the first position is the answer's token
    assert chat._answer_loss("Bob", [pos("B", -0.5, [("Bob", -1.0)]), pos("ob", -3.0)], 0) == 1.0
    assert chat.stats["tail_unscored"] == 0 and chat.stats["floored"] == 0
    # "日" split over two tokens whose texts are escaped; their bytes are what counts
    raw = "日".encode()
    content = [pos("\\xe6\\x97", -0.25, raw=list(raw[:2])), pos("\\xa5", -0.5, raw=list(raw[2:]))]
    assert chat._answer_loss("日", content, 0) == 0.75
    # the reply ends (end of turn) before the answer does: the scored part, counted as cut short
    assert chat._answer_loss("Yes sir", [pos("Yes", -0.1)], 0) == 0.1 and chat.stats["tail_unscored"] == 1


def test_the_echo_protocol_has_no_place_for_a_system_prompt(server):
    train = _examples(5, 8)
    train[3] = {**train[3], "system": "Be brief."}
    with pytest.raises(DunegrassError, match="example 3 has a system prompt"):
        BlackBoxDaunce(_echo(server), num_models=2).fit(train)


def test_the_protocol_is_chosen_explicitly():
    with pytest.raises(DunegrassError, match="'echo' or 'chat'"):
        OpenAICompatibleBackend("gpt-4.1-mini-2025-04-14")
    assert OpenAICompatibleBackend("davinci-002", protocol="echo").config()["protocol"] == "echo"
    assert OpenAICompatibleBackend("gpt-4.1-mini-2025-04-14", protocol="chat").paid
    assert not OpenAICompatibleBackend("m", base_url="http://127.0.0.1:8000/v1", protocol="echo").paid


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_the_command_line_runs_black_box_daunce_and_asks_before_paying(server, tmp_path, monkeypatch, capsys):
    from dunegrass.runs import commands

    train, queries = _letters(30, 2), _letters(6, 3)
    args = [
        "--model", "base", "--method", "daunce-api", "--data", _write_jsonl(tmp_path / "train.jsonl", train),
        "--queries", _write_jsonl(tmp_path / "queries.jsonl", queries), "--cache_dir", str(tmp_path / "runs"),
        "--name", "api", "--api.base_url", server, "--api.protocol", "chat", "--api.api_key_env", "DUNEGRASS_TEST_KEY",
        "--daunce.num_models", "24", "--daunce.subsample_ratio", "0.5", "--daunce.seed", "1", "--top_k", "1",
        "--api.poll_seconds", "0.01",
    ]  # fmt: skip
    monkeypatch.setattr(OpenAICompatibleBackend, "paid", property(lambda self: True))
    jobs = len(_Fake.jobs)
    assert commands.main("score", args) == 1  # 24 paid jobs and no --yes: the plan, and nothing started
    err = capsys.readouterr().err
    assert "this fit starts 24 fine-tuning jobs" in err and "--yes" in err and len(_Fake.jobs) == jobs
    assert commands.main("score", [*args, "--yes"]) == 0
    assert len(_Fake.jobs) == jobs + 24
    rows = [json.loads(line) for line in (tmp_path / "runs" / "api" / "top.jsonl").read_text().splitlines()]
    tops = [r for r in rows if r["list"] == "top"]
    assert [r["train_text"].split(" → ")[1] for r in tops] == [q["completion"] for q in queries]
    assert all(r["stderr"] is not None for r in tops)
    for path in (tmp_path / "runs").rglob("*"):  # nothing secret written: not the key, not its value
        assert not path.is_file() or KEY.encode() not in path.read_bytes()


def test_the_command_line_reports_a_service_error_in_one_line(monkeypatch, capsys):
    import openai

    from dunegrass.runs import commands

    def unreachable(cfg):
        raise openai.APIConnectionError(request=None)

    monkeypatch.setattr(commands, "fit", unreachable)
    assert commands.main("fit", ["--model", "m", "--method", "daunce-api", "--data", "d.jsonl"]) == 1
    err = capsys.readouterr().err
    assert "the fine-tuning service failed: APIConnectionError" in err and "Traceback" not in err
