"""What a request must pass before the application reads it, in the order that costs least.

The ``Gate`` wraps the service's ASGI application. For every route but the open ones
(``/health``) it answers, before a byte of the body is read:

1. 401 without the bearer token (so a client without it learns nothing from how a body parses);
2. 413 when ``Content-Length`` declares more than ``max_bytes``;
3. 429 with ``Retry-After`` when ``max_pending`` requests are already admitted and unanswered.

It then reads the body itself, counting bytes as they arrive whatever the framing (chunked bodies
declare no length): 413 once over ``max_bytes``, 408 when the body is not complete within
``body_timeout`` seconds (a client trickling it would otherwise hold its admission forever). Both
close the connection. The application gets the body whole.

An exception the application lets through is logged with its traceback and answered 500 in the
OpenAI error shape, without echoing the request.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any, Awaitable, Callable

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
}
INTERNAL_ERROR = "The server failed to answer this request; the error is in its log."

Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]


def error_body(status: int, message: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param, "code": code}}


class _Refused(Exception):
    def __init__(self, status: int, message: str, code: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


class Gate:
    """ASGI middleware: authentication, size and admission limits, then the body, then ``app``."""

    def __init__(
        self,
        app: Any,
        token: str,
        max_bytes: int,
        max_pending: int,
        body_timeout: float,
        open_paths: frozenset[str] = frozenset({"/health"}),
    ) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.max_bytes = max_bytes
        self.max_pending = max_pending
        self.body_timeout = body_timeout
        self.open_paths = open_paths
        self.pending = 0

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self._run(scope, receive, send)
            return
        headers = dict(scope["headers"])
        try:
            self._admit(headers)
        except _Refused as refusal:
            await _answer(scope, send, refusal)
            return
        self.pending += 1
        try:
            try:
                body = await self._body(receive)
            except _Refused as refusal:
                await _answer(scope, send, refusal)
                return
            await self._run(scope, _replay(body, receive), send)
        finally:
            self.pending -= 1

    def _admit(self, headers: dict[bytes, bytes]) -> None:
        if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            raise _Refused(401, "Missing or invalid bearer token.", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise self._too_large()
        if self.pending >= self.max_pending:
            raise _Refused(
                429, f"The server is busy ({self.pending} requests in progress); retry later.", "rate_limit_exceeded",
                {"Retry-After": "1"},
            )

    def _too_large(self) -> _Refused:
        return _Refused(413, f"The request body exceeds {self.max_bytes} bytes.", "request_too_large", {"Connection": "close"})

    async def _body(self, receive: Receive) -> bytes:
        try:
            return await asyncio.wait_for(self._read(receive), self.body_timeout)
        except asyncio.TimeoutError:
            raise _Refused(
                408, f"The request body did not arrive within {self.body_timeout:g} s.", "request_timeout", {"Connection": "close"}
            ) from None

    async def _read(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Refused(400, "The client disconnected.", "client_disconnected", {"Connection": "close"})
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _run(self, scope: dict, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            if not started and scope["type"] == "http":
                await _answer(scope, send, _Refused(500, INTERNAL_ERROR, "internal_error", {}))


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for an application that reads the already read ``body``, then waits for a disconnect."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _answer(scope: dict, send: Send, refusal: _Refused) -> None:
    from starlette.responses import JSONResponse

    response = JSONResponse(error_body(refusal.status, refusal.message, refusal.code), refusal.status, refusal.headers)
    await response(scope, _no_body, send)


async def _no_body() -> dict:
    return {"type": "http.disconnect"}
