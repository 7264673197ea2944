"""``hclafter describe`` against a local stub chat-completions server (no network beyond 127.0.0.1)."""
from __future__ import annotations

import argparse
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hclafter.apps.cli import build_parser, command
from hclafter.apps.describe import (QUESTIONS, ChatClient, ChatError, DescribeError, build_prompt,
                                    client_from_settings, collect_descriptions, describe_classes, parse_reply,
                                    partial_path_for)
from hclafter.core.emotions import get_wheel
from hclafter.models.text import load_descriptions

KNOWN = ("amusement", "contentment", "awe", "excitement", "fear", "sadness", "disgust", "anger", "surprise", "joy")
SHARED = "A crowd gathers in the town square at dusk."
LONG = "3. " + "a very long caption about many things " * 12


def canned_reply(prompt: str) -> str:
    """Deterministic reply: numbering, bullets, quotes, a duplicate, a cross-class sentence, an over-long one."""
    cls = next(c for c in KNOWN if re.search(rf"\b{c}\b", prompt))
    qi = next(i for i, q in enumerate(QUESTIONS) if q.format(c=cls) in prompt)
    lines = ["Sure! Here are some captions:", "",
             f"1. A {cls} scene, view {qi}.",
             f'2) - "Bright {cls} colours in frame {qi}."',
             f"• a {cls} scene,  view {qi}",            # duplicate of the first (case, spacing, period)
             f"* A generic picture about {cls}."]        # same in every question: kept once
    if cls in ("joy", "fear"):
        lines.append(f"- {SHARED}")                       # produced for two classes: dropped from both
    if qi == 0:
        lines.append(LONG)                               # over CLIP's 77 tokens
    return "\n".join(lines)


def expected_sentences(cls: str) -> list[str]:
    out = []
    for qi in range(len(QUESTIONS)):
        out += [f"A {cls} scene, view {qi}.", f"Bright {cls} colours in frame {qi}."]
        if qi == 0:
            out.append(f"A generic picture about {cls}.")
    return out


class Stub:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.fail_next: list[int] = []        # statuses to return once each, before answering
        self.fail_after: int | None = None    # answer this many requests, then return 500 forever
        self.answered = 0

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.fail_next.clear()
            self.fail_after = None
            self.answered = 0

    @property
    def prompts(self) -> list[str]:
        return [r["body"]["messages"][-1]["content"] for r in self.requests]


@pytest.fixture
def stub():
    state = Stub()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _send(self, status: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if state.fail_next:
                    status = state.fail_next.pop(0)
                elif state.fail_after is not None and state.answered >= state.fail_after:
                    status = 500
                else:
                    status = 200
                    state.answered += 1
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": "not found"})
            if status != 200:
                return self._send(status, {"error": {"message": f"stub status {status}"}})
            content = canned_reply(body["messages"][-1]["content"])
            self._send(200, {"object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                          "finish_reason": "stop"}]})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def make_client(stub, **kwargs) -> ChatClient:
    kwargs = {"api_key": "sk-test", "timeout": 5.0, "retries": 2, "backoff": 0.001, **kwargs}
    return ChatClient(stub.url, "stub-model", **kwargs)


CLASSES = ["joy", "fear", "awe"]


def test_parse_reply_strips_numbering_bullets_and_quotes():
    text = ('Here are three captions:\n\n1. A child laughs.\n2) - "Bright colours fill the frame."\n'
            '(3) \u201cA quiet lake.\u201d\n\u2022 **Bold caption**\nCaption 5: A dog runs.\n'
            '3 children play in a park.\n- \n10. 1990s street at night')
    assert parse_reply(text) == ["A child laughs.", "Bright colours fill the frame.", "A quiet lake.",
                                 "Bold caption", "A dog runs.", "3 children play in a park.", "1990s street at night"]


def test_describe_writes_clean_deduplicated_descriptions(stub, tmp_path, capsys):
    out = tmp_path / "desc.json"
    result = describe_classes(CLASSES, out, make_client(stub), per_question=4, progress=True)
    written = json.loads(out.read_text())
    assert written == result
    assert list(written) == CLASSES
    for cls in CLASSES:
        assert written[cls] == expected_sentences(cls)
    assert not any(SHARED.lower() in s.lower() for sentences in written.values() for s in sentences)
    assert not partial_path_for(out).exists()
    # one request per (class, question), each with the model, the bearer token and the count asked for
    assert len(stub.requests) == len(CLASSES) * len(QUESTIONS)
    assert {r["path"] for r in stub.requests} == {"/v1/chat/completions"}
    assert {r["auth"] for r in stub.requests} == {"Bearer sk-test"}
    assert {r["body"]["model"] for r in stub.requests} == {"stub-model"}
    assert all("n" not in r["body"] and "temperature" in r["body"] for r in stub.requests)
    assert sorted(stub.prompts) == sorted(build_prompt(q, c, 4) for c in CLASSES for q in QUESTIONS)
    assert "4 different short captions" in stub.prompts[0]
    # the summary counts the drops: 6 + 5 repeats per class (+5 more of the shared sentence in joy and in fear),
    # the shared sentence removed from two classes, one over-long sentence per class
    summary = capsys.readouterr().out
    assert "43 duplicate(s)" in summary and "2 shared" in summary and "3 over the 77-token" in summary


def test_collect_counts_and_drops_shared_from_all_classes():
    replies = {c: [canned_reply(build_prompt(q, c, 3)) for q in QUESTIONS] for c in CLASSES}
    descriptions, stats = collect_descriptions(replies, count_tokens=lambda s: len(s.split()) + 2)
    assert descriptions == {c: expected_sentences(c) for c in CLASSES}
    assert (stats.duplicates, stats.shared, stats.too_long) == (3 * 11 + 2 * 5, 2, 3)
    assert stats.kept == {c: 13 for c in CLASSES}


def test_no_auth_header_without_key_and_n_sent_when_asked(stub):
    ChatClient(stub.url, "m", timeout=5.0, n=2).complete(build_prompt(QUESTIONS[0], "awe", 2))
    assert stub.requests[-1]["auth"] is None
    assert stub.requests[-1]["body"]["n"] == 2


@pytest.mark.parametrize("status", [500, 429, 503])
def test_retries_transient_errors(stub, status):
    sleeps = []
    client = make_client(stub, sleep=sleeps.append)
    stub.fail_next = [status]
    reply = client.complete(build_prompt(QUESTIONS[1], "joy", 2))
    assert "A joy scene, view 1." in reply
    assert len(stub.requests) == 2 and len(sleeps) == 1


def test_gives_up_after_bounded_retries_and_not_on_client_errors(stub):
    sleeps = []
    client = make_client(stub, retries=2, sleep=sleeps.append)
    stub.fail_next = [500, 500, 500, 500]
    with pytest.raises(ChatError, match="HTTP 500.*after 3 attempt"):
        client.complete("awe")
    assert len(stub.requests) == 3 and sleeps == [0.001, 0.002]
    stub.reset()
    stub.fail_next = [401]
    with pytest.raises(ChatError, match="HTTP 401.*--api-key"):
        client.complete("awe")
    assert len(stub.requests) == 1


def test_connection_errors_are_retried_then_reported():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps = []
    client = ChatClient(f"http://127.0.0.1:{port}/v1", "m", timeout=2.0, retries=2, backoff=0.001, sleep=sleeps.append)
    with pytest.raises(ChatError, match="cannot reach .* after 3 attempt"):
        client.complete("hello")
    assert len(sleeps) == 2


def test_interrupted_run_resumes_without_repeating_requests(stub, tmp_path):
    reference = tmp_path / "reference.json"
    describe_classes(CLASSES, reference, make_client(stub), per_question=3, progress=False)
    total = len(CLASSES) * len(QUESTIONS)
    assert len(stub.requests) == total

    stub.reset()
    out = tmp_path / "resumed.json"
    k = 7
    stub.fail_after = k
    with pytest.raises(ChatError):
        describe_classes(CLASSES, out, make_client(stub, retries=1), per_question=3, progress=False)
    assert not out.exists()
    partial = json.loads(partial_path_for(out).read_text())
    done = [p for answers in partial["answers"].values() for p in answers]
    assert len(done) == k and partial["model"] == "stub-model"
    assert stub.prompts[:k] == done

    stub.reset()
    describe_classes(CLASSES, out, make_client(stub), per_question=3, progress=False)
    assert len(stub.requests) == total - k
    assert not set(stub.prompts) & set(done)
    assert out.read_bytes() == reference.read_bytes()
    assert not partial_path_for(out).exists()


def test_resume_refuses_another_model(stub, tmp_path):
    out = tmp_path / "d.json"
    stub.fail_after = 2
    with pytest.raises(ChatError):
        describe_classes(CLASSES, out, make_client(stub, retries=0), per_question=2, progress=False)
    with pytest.raises(DescribeError, match="model 'stub-model', not 'other'"):
        describe_classes(CLASSES, out, ChatClient(stub.url, "other"), per_question=2, progress=False)


def test_missing_settings_name_flag_and_environment(monkeypatch):
    for name in ("HCLAFTER_LLM_BASE_URL", "OPENAI_BASE_URL", "HCLAFTER_LLM_MODEL", "HCLAFTER_LLM_API_KEY",
                 "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DescribeError, match="--base-url.*HCLAFTER_LLM_BASE_URL.*OPENAI_BASE_URL"):
        client_from_settings(model="m")
    with pytest.raises(DescribeError, match="--model.*HCLAFTER_LLM_MODEL"):
        client_from_settings(base_url="http://127.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("HCLAFTER_LLM_MODEL", "env-model")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    client = client_from_settings()
    assert (client.base_url, client.model, client.api_key) == ("http://127.0.0.1:9/v1", "env-model", "sk-openai")
    monkeypatch.setenv("HCLAFTER_LLM_BASE_URL", "http://127.0.0.1:8/v1/")
    monkeypatch.setenv("HCLAFTER_LLM_API_KEY", "sk-hcl")
    client = client_from_settings(model="flag-model")
    assert (client.url, client.model, client.api_key) == ("http://127.0.0.1:8/v1/chat/completions", "flag-model",
                                                          "sk-hcl")
    assert "sk-hcl" not in repr(client)
    with pytest.raises(DescribeError, match="http"):
        ChatClient("localhost:8000", "m")


def _parser() -> argparse.ArgumentParser:
    return build_parser()


def test_cli_end_to_end_with_label_space(stub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HCLAFTER_LLM_BASE_URL", stub.url)
    monkeypatch.setenv("HCLAFTER_LLM_MODEL", "env-model")
    monkeypatch.delenv("HCLAFTER_LLM_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    out = tmp_path / "ekman6.json"
    args = _parser().parse_args(["describe", "--label-space", "ekman6", "--out", str(out), "--per-question", "5",
                                 "--quiet"])
    assert command(args)(args) == 0
    wheel = get_wheel("ekman6")
    assert len(stub.requests) == wheel.num_classes * len(QUESTIONS)
    assert {r["auth"] for r in stub.requests} == {"Bearer sk-env"}
    assert {r["body"]["model"] for r in stub.requests} == {"env-model"}
    loaded = load_descriptions(wheel, str(out))
    assert loaded == {c: expected_sentences(c) for c in wheel.classes}
    assert "wrote" in capsys.readouterr().out


def test_cli_flags_classes_and_errors(stub, tmp_path, monkeypatch):
    for name in ("HCLAFTER_LLM_BASE_URL", "OPENAI_BASE_URL", "HCLAFTER_LLM_MODEL"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "d.json"
    parser = _parser()
    args = parser.parse_args(["describe", "--classes", "joy, awe", "--out", str(out), "--base-url", stub.url,
                              "--model", "flag-model", "--api-key", "sk-flag", "--quiet"])
    assert command(args)(args) == 0
    assert list(json.loads(out.read_text())) == ["joy", "awe"]
    assert {r["auth"] for r in stub.requests} == {"Bearer sk-flag"}
    args = parser.parse_args(["describe", "--classes", "joy", "--out", str(out), "--model", "m"])
    with pytest.raises(DescribeError, match="--base-url"):
        command(args)(args)
    args = parser.parse_args(["describe", "--classes", "joy,Joy", "--out", str(out), "--base-url", stub.url,
                              "--model", "m"])
    with pytest.raises(DescribeError, match="repeat"):
        command(args)(args)
    with pytest.raises(SystemExit):  # --classes and --label-space are exclusive, one is required
        parser.parse_args(["describe", "--out", str(out)])
