"""Class descriptions from an LLM: the ``hclafter describe`` command.

LaFTer trains its stage-1 classifier on sentences an LLM wrote about each class. This module asks
an OpenAI-compatible chat-completions endpoint LaFTer's kinds of questions, adapted to emotions
("Describe what an image that evokes {c} looks like", ...), each for several one-sentence visual
captions, and writes ``{class: [sentence, ...]}``, the JSON that ``text.descriptions`` /
:func:`hclafter.text.load_descriptions` reads.

Cleaning, applied to all replies at the end (the raw replies are what is saved while running):

* terminal escape sequences and control characters (NUL, ...) are removed; replies are split into
  lines; numbering (``1.``, ``2)``, ``(3)``), bullets (``-``, ``*``, ``•``),
  ``Caption:`` prefixes, markdown emphasis and surrounding quotes are stripped; blank lines and
  introductions ending in ``:`` are skipped;
* sentences longer than CLIP's context (``len(SimpleTokenizer().encode(s)) + 2 > 77``) are dropped;
* duplicates are compared case-insensitively (whitespace collapsed, trailing ``.``/``!`` ignored):
  within a class the first occurrence is kept; a sentence produced for two or more classes is
  dropped from **all** of them, since it says nothing about which class it belongs to (and the
  result does not depend on the class order).

Resume: after every (class, question) request the raw replies so far are saved atomically to
``OUT.partial.json``, keyed by class and by the exact prompt. Re-running the same command skips
the prompts already answered; the final file is written atomically and the sidecar removed.
Changing ``--per-question`` or the questions changes the prompts, so those are asked afresh.

Only the standard library talks HTTP; nothing here hard-codes a host.
"""
from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Protocol, Sequence

from tqdm.auto import tqdm

from ..core.emotions import WHEELS
from ..core.files import atomic_write_text

QUESTIONS: tuple[str, ...] = (
    "Describe what an image that evokes {c} looks like.",
    "How can you identify an image that evokes {c}?",
    "What does a photo expressing {c} show?",
    "Describe an image from the internet that evokes {c}.",
    "Write a caption of an image that evokes {c}.",
    "Describe the colours, light and scene of a picture that evokes {c}.",
)
INSTRUCTION = ("Answer with {count}, each a single sentence of at most 25 words that describes only what is "
               "visible in the picture. Write one caption per line, with no numbering, no introduction and no "
               "other text.")
CONTEXT_LENGTH = 77  # CLIP's text context, start and end tokens included
PARTIAL_FORMAT = "hclafter-describe-partial/1"
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

ENV_BASE_URL = ("HCLAFTER_LLM_BASE_URL", "OPENAI_BASE_URL")
ENV_MODEL = ("HCLAFTER_LLM_MODEL",)
ENV_API_KEY = ("HCLAFTER_LLM_API_KEY", "OPENAI_API_KEY")


class DescribeError(ValueError):
    """A configuration or input problem of ``describe``, with a message that names the fix."""


class ChatError(DescribeError):
    """A chat-completions request that failed (after its retries)."""


class Completer(Protocol):
    def complete(self, prompt: str) -> str: ...


# --------------------------------------------------------------------------------------------------
# HTTP client


class ChatClient:
    """Minimal OpenAI-compatible chat-completions client (``POST {base_url}/chat/completions``).

    ``timeout`` bounds each request as a whole, connection to last byte. Connection errors,
    timeouts, HTTP 429 and 5xx are retried up to ``retries`` times with exponential backoff
    (``backoff * 2**attempt`` seconds, at most ``max_backoff``; a numeric ``Retry-After`` header
    is honoured within that cap). Other HTTP errors fail at once.
    """

    def __init__(self, base_url: str, model: str, api_key: Optional[str] = None, timeout: float = 60.0,
                 retries: int = 3, *, temperature: float = 0.7, n: int = 1, backoff: float = 1.0,
                 max_backoff: float = 30.0, sleep: Callable[[float], None] = time.sleep) -> None:
        base_url = (base_url or "").strip()
        if not re.match(r"^https?://[^/\s]+", base_url):
            raise DescribeError(f"--base-url must be an http(s) URL such as http://HOST:PORT/v1, got {base_url!r}")
        if not (model or "").strip():
            raise DescribeError("no model: pass --model or set HCLAFTER_LLM_MODEL")
        if retries < 0 or timeout <= 0 or n < 1:
            raise DescribeError(f"invalid client settings: retries={retries} (>= 0), timeout={timeout} (> 0), "
                                f"n={n} (>= 1)")
        self.base_url = base_url.rstrip("/")
        self.model = model.strip()
        self.api_key = api_key or None
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.temperature = float(temperature)
        self.n = int(n)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self._sleep = sleep

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def __repr__(self) -> str:  # never shows the key
        key = "'***'" if self.api_key else None
        return f"ChatClient(base_url={self.base_url!r}, model={self.model!r}, api_key={key})"

    def _delay(self, attempt: int, retry_after: Optional[str] = None) -> float:
        wait = self.backoff * 2 ** attempt
        try:
            wait = max(wait, float(retry_after)) if retry_after else wait
        except ValueError:
            pass
        return min(wait, self.max_backoff)

    def complete(self, prompt: str) -> str:
        """The reply's text (the choices' contents joined by newlines when ``n > 1``)."""
        body: dict = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                      "temperature": self.temperature}
        if self.n != 1:
            body["n"] = self.n
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "hclafter"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempts = self.retries + 1
        for attempt in range(attempts):
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                return self._parse(self._post(request))
            except _HTTPStatus as e:
                if e.code not in RETRY_STATUS:
                    hint = " (check --api-key / HCLAFTER_LLM_API_KEY)" if e.code in (401, 403) else ""
                    raise ChatError(f"{self.url}: HTTP {e.code} {e.reason}{hint}: {e.detail}") from None
                if attempt + 1 == attempts:
                    raise ChatError(f"{self.url}: HTTP {e.code} {e.reason} after {attempts} attempt(s): "
                                    f"{e.detail}") from None
                wait = self._delay(attempt, e.retry_after)
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets
                if attempt + 1 == attempts:
                    reason = getattr(e, "reason", None) or e
                    raise ChatError(f"cannot reach {self.url} after {attempts} attempt(s): {reason}") from None
                wait = self._delay(attempt)
            self._sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _post(self, request: urllib.request.Request) -> bytes:
        """The response body, read within ``timeout`` seconds in total (an error status raises
        _HTTPStatus with its body's start). Socket timeouts bound each read only, so a server that
        trickles bytes could hold one request for ever: a watchdog shuts the connection down."""
        deadline = _Deadline(self.timeout)
        try:
            with deadline:
                try:
                    with deadline.opener().open(request, timeout=self.timeout) as response:
                        payload = response.read()
                except urllib.error.HTTPError as e:
                    raise _HTTPStatus(e.code, e.reason, _http_detail(e),
                                      e.headers.get("Retry-After") if e.headers else None) from None
        except (OSError, http.client.HTTPException):
            if deadline.expired:
                raise TimeoutError(f"no complete response within {self.timeout:g} s (--timeout)") from None
            raise
        if deadline.expired:  # the shut-down connection may have ended a body without a length early
            raise TimeoutError(f"no complete response within {self.timeout:g} s (--timeout)")
        return payload

    def _parse(self, payload: bytes) -> str:
        try:
            choices = json.loads(payload.decode("utf-8"))["choices"]
            contents = [choice["message"].get("content") for choice in choices]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ChatError(f"{self.url}: not a chat-completions response: {payload[:200]!r}") from None
        if not contents:
            raise ChatError(f"{self.url}: the response has no choices: {payload[:200]!r}")
        texts = [c for c in contents if isinstance(c, str)]
        if not texts:  # a refusal, a tool call, or a reasoning model that spent its tokens thinking
            reasons = sorted({str(choice.get("finish_reason")) for choice in choices})
            raise ChatError(f"{self.url}: the model answered without text (message.content is null; finish_reason "
                            f"{', '.join(reasons)}); try another --model, or a larger max_tokens on the server")
        return "\n".join(texts)


class _HTTPStatus(Exception):
    """An error status with what the retry decision and the message need."""

    def __init__(self, code: int, reason: str, detail: str, retry_after: Optional[str]) -> None:
        super().__init__(code)
        self.code, self.reason, self.detail, self.retry_after = code, reason, detail, retry_after


class _Deadline:
    """Shuts a request's connections down ``seconds`` after it starts (``with deadline:``), which
    ends any read in progress; ``expired`` then says why the request failed."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)

    def opener(self) -> urllib.request.OpenerDirector:
        """A urllib opener whose connections this deadline shuts down."""
        deadline = self

        def tracked(handler: type) -> type:
            class Tracked(handler):
                def do_open(self, http_class, req, **kwargs):
                    class Connection(http_class):
                        def connect(self) -> None:
                            super().connect()
                            deadline.track(self.sock)

                    return super().do_open(Connection, req, **kwargs)

            return Tracked

        return urllib.request.build_opener(tracked(urllib.request.HTTPHandler), tracked(urllib.request.HTTPSHandler))


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


def _http_detail(error: urllib.error.HTTPError) -> str:
    try:
        text = error.read().decode("utf-8", "replace").strip()
    except Exception:
        return ""
    return re.sub(r"\s+", " ", text)[:300]


def _first_env(names: Sequence[str], env: Mapping[str, str]) -> Optional[str]:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


def client_from_settings(base_url: Optional[str] = None, model: Optional[str] = None, api_key: Optional[str] = None,
                         *, env: Optional[Mapping[str, str]] = None, **kwargs) -> ChatClient:
    """A :class:`ChatClient` from explicit values, else the environment (flags win)."""
    env = os.environ if env is None else env
    base_url = base_url or _first_env(ENV_BASE_URL, env)
    model = model or _first_env(ENV_MODEL, env)
    api_key = api_key or _first_env(ENV_API_KEY, env)
    if not base_url:
        raise DescribeError("no LLM endpoint: pass --base-url or set HCLAFTER_LLM_BASE_URL (or OPENAI_BASE_URL) "
                            "to an OpenAI-compatible API root such as http://HOST:PORT/v1")
    if not model:
        raise DescribeError("no model: pass --model or set HCLAFTER_LLM_MODEL")
    return ChatClient(base_url, model, api_key, **kwargs)


# --------------------------------------------------------------------------------------------------
# Prompts, parsing and cleaning


def build_prompt(question: str, class_name: str, per_question: int) -> str:
    count = "one short caption" if per_question == 1 else f"{per_question} different short captions"
    return question.format(c=class_name.replace("_", " ")) + " " + INSTRUCTION.format(count=count)


# Terminal escape sequences (CSI, OSC, two-byte) and the other C0/C1 control characters (NUL, ...):
# they would travel into the descriptions file and the text encoder.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_LEADER = re.compile(r"^\s*(?:[-*•·‣▪–—>+]+|\(?\d{1,3}[.):\]](?!\d)|#\d{1,3}[.:)]?)\s*")
_LABEL = re.compile(r"^(?:caption|sentence|description)\s*\d*\s*[:.)-]\s*", re.IGNORECASE)
_QUOTES = "\"'“”‘’«»`"


def parse_reply(text: str) -> list[str]:
    """One caption per non-empty line, without control characters, numbering, bullets, labels or
    surrounding quotes."""
    sentences = []
    for line in _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n")).splitlines():
        s = line.strip()
        previous = None
        while s != previous:
            previous = s
            s = _LEADER.sub("", s, count=1)
            s = _LABEL.sub("", s, count=1)
            s = s.strip().strip("*_").strip()
            core = s.rstrip(".")
            if len(core) >= 2 and core[0] in _QUOTES and core[-1] in _QUOTES:
                inner = core.strip(_QUOTES).strip()
                s = inner + "." if s.endswith(".") and inner and inner[-1] not in ".!?" else inner
        s = re.sub(r"\s+", " ", s)
        if not s or s.endswith(":") or not re.search(r"[A-Za-z]", s):
            continue
        sentences.append(s)
    return sentences


def sentence_key(sentence: str) -> str:
    """Duplicate key: case-insensitive, whitespace collapsed, trailing ``.``/``!`` ignored."""
    return re.sub(r"\s+", " ", sentence).strip().casefold().rstrip(".! ")


@functools.lru_cache(maxsize=1)
def _clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def clip_token_count(text: str) -> int:
    """CLIP tokens of ``text`` including the start and end tokens."""
    return len(_clip_tokenizer().encode(text)) + 2


@dataclass
class DescribeStats:
    """What cleaning did: sentences kept per class and the three kinds of drops."""

    kept: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0       # repeats within a class
    shared: int = 0           # removed because the same sentence was produced for other classes too
    too_long: int = 0         # over CLIP's context

    def summary(self) -> str:
        lines = [f"{name:<16}{n:>5} sentences" for name, n in self.kept.items()]
        lines.append(f"dropped: {self.duplicates} duplicate(s) within a class, {self.shared} shared by several "
                     f"classes, {self.too_long} over the {CONTEXT_LENGTH}-token context")
        return "\n".join(lines)


def collect_descriptions(replies: Mapping[str, Sequence[str]],
                         count_tokens: Callable[[str], int] = clip_token_count,
                         context_length: int = CONTEXT_LENGTH) -> tuple[dict[str, list[str]], DescribeStats]:
    """Parse and clean the raw replies ``{class: [reply, ...]}`` into descriptions (class order kept)."""
    stats = DescribeStats()
    per_class: dict[str, list[tuple[str, str]]] = {}
    owners: dict[str, set[str]] = {}
    for name, texts in replies.items():
        seen: set[str] = set()
        kept: list[tuple[str, str]] = []
        for text in texts:
            for sentence in parse_reply(text):
                if count_tokens(sentence) > context_length:
                    stats.too_long += 1
                    continue
                key = sentence_key(sentence)
                if key in seen:
                    stats.duplicates += 1
                    continue
                seen.add(key)
                kept.append((key, sentence))
                owners.setdefault(key, set()).add(name)
        per_class[name] = kept
    out: dict[str, list[str]] = {}
    for name, kept in per_class.items():
        out[name] = [s for key, s in kept if len(owners[key]) == 1]
        stats.shared += len(kept) - len(out[name])
        stats.kept[name] = len(out[name])
    return out, stats


# --------------------------------------------------------------------------------------------------
# The run, with resume


def partial_path_for(out_path: str | os.PathLike) -> Path:
    out = Path(out_path)
    return out.with_name(out.name + ".partial.json")


def _write_json_atomic(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _load_partial(path: Path, model: Optional[str]) -> dict:
    if not path.is_file():
        return {"format": PARTIAL_FORMAT, "model": model, "answers": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DescribeError(f"{path}: unreadable progress file ({e}); delete it to start over") from None
    if (not isinstance(state, dict) or state.get("format") != PARTIAL_FORMAT
            or not isinstance(state.get("answers"), dict)):
        raise DescribeError(f"{path}: not an hclafter describe progress file; delete it to start over")
    if model is not None and state.get("model") not in (None, model):
        raise DescribeError(f"{path} holds answers from model {state['model']!r}, not {model!r}; rerun with "
                            f"--model {state['model']} or delete it to start over")
    state["model"] = state.get("model") or model
    return state


def check_class_names(class_names: Sequence[str]) -> list[str]:
    names = [str(c).strip() for c in class_names]
    if not names or not all(names):
        raise DescribeError(f"class names must be non-empty, got {list(class_names)!r}")
    lowered = [c.lower() for c in names]
    repeated = sorted({c for c in lowered if lowered.count(c) > 1})
    if repeated:
        raise DescribeError(f"class names repeat (case-insensitive): {repeated}")
    return names


def describe_classes(class_names: Sequence[str], out_path: str | os.PathLike, client: Completer,
                     per_question: int = 10, questions: Sequence[str] = QUESTIONS, progress: bool = True, *,
                     count_tokens: Callable[[str], int] = clip_token_count,
                     context_length: int = CONTEXT_LENGTH) -> dict[str, list[str]]:
    """Ask every question for every class, clean the replies and write ``{class: [sentence, ...]}``.

    Resumable through ``OUT.partial.json`` (see the module docstring). Returns the written
    descriptions; with ``progress`` a tqdm bar runs and a summary is printed at the end.
    """
    names = check_class_names(class_names)
    if per_question < 1:
        raise DescribeError(f"--per-question must be >= 1, got {per_question}")
    if not questions or any("{c}" not in q for q in questions):
        raise DescribeError("each question needs a '{c}' placeholder for the class name")
    out = Path(out_path).expanduser()
    partial = partial_path_for(out)
    state = _load_partial(partial, getattr(client, "model", None))
    answers: dict[str, dict[str, str]] = state["answers"]
    jobs = [(name, build_prompt(q, name, per_question)) for name in names for q in questions]
    todo = [(name, prompt) for name, prompt in jobs if prompt not in answers.get(name, {})]
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="describe", unit="req", leave=False,
              disable=not progress) as bar:
        for name, prompt in todo:
            bar.set_postfix_str(name)
            reply = client.complete(prompt)
            answers.setdefault(name, {})[prompt] = reply
            _write_json_atomic(partial, state)
            bar.update()
    replies = {name: [answers[name][prompt] for n, prompt in jobs if n == name] for name in names}
    descriptions, stats = collect_descriptions(replies, count_tokens, context_length)
    empty = [name for name, sentences in descriptions.items() if not sentences]
    if empty:
        raise DescribeError(f"no usable sentences for {empty} ({stats.summary().splitlines()[-1]}); the raw replies "
                            f"are in {partial}; try a larger --per-question or another model")
    _write_json_atomic(out, descriptions)
    partial.unlink(missing_ok=True)
    if progress:
        print(stats.summary())
    return descriptions


# --------------------------------------------------------------------------------------------------
# CLI


def _split_classes(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise DescribeError(f"--classes needs comma-separated class names, got {text!r}")
    return names


def cmd_describe(args: argparse.Namespace) -> int:
    if args.label_space is not None and args.label_space not in WHEELS:
        raise DescribeError(f"--label-space {args.label_space!r} is not one of {', '.join(WHEELS)}")
    names = _split_classes(args.classes) if args.classes else list(WHEELS[args.label_space].classes)
    client = client_from_settings(args.base_url, args.model, args.api_key, timeout=args.timeout,
                                  retries=args.retries, temperature=args.temperature)
    descriptions = describe_classes(names, args.out, client, per_question=args.per_question,
                                    progress=not args.quiet)
    total = sum(len(s) for s in descriptions.values())
    print(f"wrote {total} sentences for {len(descriptions)} classes to {args.out}")
    return 0
