"""OpenAI's server-sent events (``stream: true``) as one ASGI response that owns the model.

A streamed answer is made while it is sent, so the model is held for as long as the stream
lasts; this response takes the service's model lock itself and lets go of it however the
stream ends (finished, refused, failed, or the client gone). The events come from a plain
iterator that runs on a worker thread one event at a time, so the event loop keeps answering
``/health`` and admitting requests meanwhile:

* the first event is made before anything is sent, so what the model refuses at once (an
  unknown model, a prompt its logits overflow on) is an ordinary JSON error with its status;
* then ``text/event-stream``: ``data: {json}`` per event and ``data: [DONE]`` at the end;
* a refusal later on (non-finite logits mid-generation) is sent as ``data: {"error": …}``, a
  bug as the same event with the generic message (the bug itself goes on to the log), and the
  stream ends there;
* a client that disconnects stops the generation before its next token: the iterator is
  closed, which leaves the model's context, and the lock and the request's admission slot
  (``gate.Gate``) are released;
* so does a client that stops reading: once its socket buffers are full a send waits, and a
  send that waits ``send_timeout`` seconds ends the stream and the connection (a non-streamed
  answer is sent after the model is released, so only a stream needs this).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable, Iterator

from starlette.responses import JSONResponse, Response

from evomerge.server.gate import INTERNAL_ERROR, Receive, Send, error_body
from evomerge.server.model_host import ServiceError

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 30.0
"""A stream whose client takes in nothing for this long is ended (it holds the model meanwhile)."""
HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


def event(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: a JSON object, or a bare word (``[DONE]``)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


class EventStream(Response):
    """An ASGI response streaming the events ``make()`` yields, under ``lock`` (a starlette
    ``Response`` so that FastAPI passes it through as the route's answer)."""

    def __init__(
        self, lock: asyncio.Lock, make: Callable[[], Iterator[dict[str, Any]]], send_timeout: float = SEND_TIMEOUT_S
    ) -> None:
        super().__init__(media_type="text/event-stream")
        self.lock = lock
        self.make = make
        self.send_timeout = send_timeout

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch(receive, gone))

        async def bounded_send(message: dict) -> None:
            try:
                await asyncio.wait_for(send(message), self.send_timeout)
            except asyncio.TimeoutError:
                raise _Stalled from None

        try:
            async with self.lock:
                events = self.make()
                try:
                    try:
                        ahead = await asyncio.to_thread(next, events, None)
                    except ServiceError as exc:
                        body = error_body(exc.status, exc.message, exc.code, exc.param)
                        await JSONResponse(body, exc.status, exc.headers)(scope, receive, bounded_send)
                        return
                    await bounded_send({"type": "http.response.start", "status": 200, "headers": HEADERS})
                    await self._send_all(events, ahead, gone, bounded_send)
                except _Stalled:  # returning unfinished makes the server close the connection
                    log.warning("ended a stream whose client read nothing for %g s", self.send_timeout)
                finally:
                    events.close()  # at a yield (or finished): leaves the model's context at once
        finally:
            watcher.cancel()

    async def _send_all(
        self, events: Iterator[dict[str, Any]], ahead: dict[str, Any] | None, gone: asyncio.Event, send: Send
    ) -> None:
        """Send ``ahead`` and the events after it, then ``[DONE]``; stop early if the client is gone."""
        while ahead is not None:
            if gone.is_set():
                return
            await send({"type": "http.response.body", "body": event(ahead), "more_body": True})
            try:
                ahead = await asyncio.to_thread(next, events, None)
            except ServiceError as exc:
                await _end(send, event(error_body(exc.status, exc.message, exc.code, exc.param)))
                return
            except Exception:
                await _end(send, event(error_body(500, INTERNAL_ERROR, "internal_error")))
                raise  # gate.Gate logs it
        await _end(send, event("[DONE]"))


class _Stalled(Exception):
    """The client has taken in nothing for ``send_timeout`` seconds."""


async def _end(send: Send, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _watch(receive: Receive, gone: asyncio.Event) -> None:
    """Set ``gone`` when the client disconnects (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()
