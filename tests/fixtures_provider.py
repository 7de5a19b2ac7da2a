"""A model provider that misbehaves on cue: an OpenAI-compatible merge service on 127.0.0.1 that
answers each request as a script says — well, with a status real providers send, with garbage
under a 200, or at the socket (a body cut short, a reset, no answer, a trickle).

It is a stdlib ``http.server`` rather than an ASGI app because the socket-level faults need the
raw connection. Every request is logged (time, method, path) so tests count what the client sent
and how far apart; every wait in it ends when the provider stops, so a fault never outlives its test.
"""

from __future__ import annotations

import email.utils
import json
import socket
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest


KEY = "sk-fake-provider"
BOUND = 30.0
"""Longest a hanging or trickling answer lasts before the provider gives it up itself."""
TRICKLE_SECONDS = 0.02
"""Pause between the bytes of a trickled answer: each byte comes well within any read timeout."""

STATUS_FAULTS = {"429", "429-retry-after", "429-date", "429-quota", "500", "502", "503", "401", "403", "404", "400-context"}
GARBAGE = {"not-json", "no-choices", "empty-choices", "null-logprobs", "null-text", "html-200", "sse",
           "positive-logprob", "nan-logprob", "ragged-logprobs"}
SOCKET_FAULTS = {"truncated", "reset", "hang", "trickle"}
QUIRKS = {"ok", "no-usage", "extra-fields"}
"""Answers a client must take as they are."""
RETRY_AFTER = 1
"""Seconds a ``429-retry-after`` or ``429-date`` asks the client to wait."""


@dataclass
class Seen:
    at: float
    method: str
    path: str
    kind: str


@dataclass
class FakeProvider:
    """The provider's state, shared with its request threads. ``script`` holds the kinds of the
    next answers, in arrival order, for requests to the routes in ``faulty`` (default: completions);
    once it is spent every such request gets ``fallback`` ("ok", or a fault that persists)."""

    url: str = ""
    key: str = KEY
    models: tuple[str, ...] = ("fake-base", "a", "b")
    script: deque = field(default_factory=deque)
    fallback: str = "ok"
    faulty: tuple[str, ...] = ("/v1/completions",)
    seen: list[Seen] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    abandoned: threading.Event = field(default_factory=threading.Event)
    """Set once the client hangs up on a trickled answer before its last byte."""
    sessions: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail_next(self, *kinds: str) -> None:
        self.script.extend(kinds)

    def next_kind(self, method: str, path: str) -> str:
        with self.lock:
            faulty = any(path == p or path.endswith(p) for p in self.faulty)
            kind = (self.script.popleft() if self.script else self.fallback) if faulty else "ok"
            self.seen.append(Seen(time.monotonic(), method, path, kind))
            return kind

    def requests(self, path: str = "/v1/completions") -> list[Seen]:
        return [s for s in self.seen if s.path.endswith(path)]


def completion(model: str, prompt: str, kind: str) -> dict:
    """A ``/v1/completions`` answer echoing ``prompt`` one character a token, each after the first
    at log-probability -1 (so a continuation's mean is exactly -1), spoiled as ``kind`` says."""
    tokens = list(prompt)
    logprobs = {
        "tokens": tokens,
        "token_logprobs": [None] + [-1.0] * (len(tokens) - 1),
        "top_logprobs": [None] + [{t: -1.0} for t in tokens[1:]],
        "text_offset": list(range(len(tokens))),
    }
    choice = {"index": 0, "text": prompt, "finish_reason": "length", "logprobs": logprobs}
    answer = {"id": "cmpl-fake", "object": "text_completion", "model": model, "choices": [choice],
              "usage": {"prompt_tokens": len(tokens), "completion_tokens": 0, "total_tokens": len(tokens)}}
    if kind == "no-choices":
        del answer["choices"]
    elif kind == "empty-choices":
        answer["choices"] = []
    elif kind == "null-logprobs":
        choice["logprobs"] = None
    elif kind == "null-text":
        choice["text"] = None
    elif kind == "positive-logprob":
        logprobs["token_logprobs"] = [None] + [1.5] * (len(tokens) - 1)
    elif kind == "nan-logprob":
        logprobs["token_logprobs"] = [None] + [float("nan")] * (len(tokens) - 1)
    elif kind == "ragged-logprobs":
        logprobs["token_logprobs"] = logprobs["token_logprobs"][: len(tokens) // 2]
    elif kind == "no-usage":
        del answer["usage"]
    elif kind == "extra-fields":
        answer.update(system_fingerprint="fp_x", service_tier="default", prompt_logprobs=None)
        choice.update(stop_reason=None, content_filter_results={"hate": {"filtered": False}})
        answer["usage"]["prompt_tokens_details"] = {"cached_tokens": 0}
    return answer


def error_body(message: str, code: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test reads ``FakeProvider.seen`` instead."""

    def do_GET(self) -> None:
        self._serve("GET", None)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._serve("POST", json.loads(self.rfile.read(length) or b"null"))

    def _serve(self, method: str, payload: dict | None) -> None:
        provider = self.server.provider
        kind = provider.next_kind(method, self.path)
        if self.headers.get("Authorization") != f"Bearer {provider.key}":
            return self._json(401, error_body("Incorrect API key provided: sk-***.", "invalid_api_key"))
        if kind in STATUS_FAULTS:
            return self._status(kind, payload or {})
        if kind in SOCKET_FAULTS:
            return self._socket_fault(kind, payload or {})
        if kind == "html-200":  # a proxy's error page, or a website where the API should be
            return self._raw(200, "text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>")
        if self.path == "/v1/models":
            return self._json(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in provider.models]})
        if self.path == "/v1/sessions":
            with provider.lock:
                provider.sessions += 1
                return self._json(200, {"session_id": f"s{provider.sessions}"})
        if self.path.endswith("/materialize"):
            return self._json(200, {"model": f"merge-{payload['tag']}"})
        if self.path == "/v1/completions":
            return self._completion(kind, payload)
        self._json(404, error_body(f"no route {self.path}"))

    def _completion(self, kind: str, payload: dict) -> None:
        if kind == "not-json":
            return self._raw(200, "application/json", b'{"id": "cmpl-fake", "choices": [{"text": "')
        answer = completion(payload["model"], payload["prompt"], kind)
        if kind == "sse":
            body = f"data: {json.dumps(answer)}\n\ndata: [DONE]\n\n".encode()
            return self._raw(200, "text/event-stream", body)
        self._json(200, answer)

    def _status(self, kind: str, payload: dict) -> None:
        status = int(kind[:3])
        headers = {}
        if kind == "429-retry-after":
            headers["Retry-After"] = str(RETRY_AFTER)
        if kind == "429-date":  # whole seconds, as the header has them: at least RETRY_AFTER from now
            headers["Retry-After"] = email.utils.formatdate(time.time() + RETRY_AFTER + 1, usegmt=True)
        if kind == "429-quota":  # OpenAI's spent credit: a 429 that waiting does not lift
            return self._json(429, error_body("You exceeded your current quota, please check your plan and billing details.",
                                              "insufficient_quota", "insufficient_quota"))
        messages = {
            401: error_body("Incorrect API key provided: sk-***.", "invalid_api_key"),
            403: error_body("You are not allowed to use this API key here.", "forbidden", "permission_error"),
            404: error_body(f"The model `{payload.get('model')}` does not exist or you do not have access to it.",
                            "model_not_found"),
            400: error_body("This model's maximum context length is 16 tokens. However, you requested 40 tokens.",
                            "context_length_exceeded"),
            429: error_body("Rate limit reached for requests.", "rate_limit_exceeded", "requests"),
        }
        self._json(status, messages.get(status, error_body(f"injected {status}", None, "server_error")), headers)

    def _socket_fault(self, kind: str, payload: dict) -> None:
        self.close_connection = True
        body = json.dumps(completion(payload.get("model", ""), payload.get("prompt", ""), "ok")).encode()
        if kind == "hang":
            self.server.provider.stopping.wait(BOUND)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if kind == "trickle":
            return self._trickle(body)
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        if kind == "reset":  # RST instead of FIN: the client reads "connection reset"
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def _trickle(self, body: bytes) -> None:
        provider = self.server.provider
        try:
            for i in range(len(body)):
                if provider.stopping.wait(TRICKLE_SECONDS):
                    return
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
        except OSError:  # the client hung up
            provider.abandoned.set()

    def _json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        self._raw(status, "application/json", json.dumps(body).encode(), headers)

    def _raw(self, status: int, content_type: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    provider: FakeProvider

    def handle_error(self, request: object, client_address: object) -> None:
        """A client hanging up on a kept-alive connection is no error here (its traceback on
        stderr would mix with the one line the CLI tests read there); anything else is."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    """A ``FakeProvider`` serving on a free loopback port for one test, stopped after it."""
    state = FakeProvider()
    server = _Server(("127.0.0.1", 0), _Handler)
    server.provider = state
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
