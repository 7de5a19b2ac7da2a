"""Connection limits for the service's uvicorn: hostile clients cannot hold sockets forever.

uvicorn (0.55, h11) closes an idle keep-alive connection only after it has answered a request on
it: a client that connects and says nothing, or sends a request head a byte at a time (slowloris),
keeps its socket, and a few hundred such clients exhaust the process's file descriptors. Its
``limit_concurrency`` answers 503 to new *requests* but closes no connection. So the service runs
uvicorn's own h11 protocol with two additions:

* a *head timeout*: a connection must deliver a complete request head within ``head_timeout``
  seconds of opening, and of each response, or it is closed (this also bounds keep-alive idling);
* a *connection limit*: when ``max_connections`` are open, a new connection closes the one that
  has waited longest for a request head (an idle or slow one; nginx reuses idle keep-alive
  connections the same way) or, when every connection has a request in progress, is closed itself.

The connection limit is at most half the process's file descriptor limit, and the listen backlog
is small: asyncio accepts up to ``backlog`` connections at a time before their protocols run (and
close the connections they evict), so the other half is headroom that keeps ``accept`` from
failing with EMFILE. Slow request bodies are bounded by the application (``gate.Gate``), which
reads them.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Any

HEAD_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5
MAX_CONNECTIONS = 512
BACKLOG = 32


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may hold (seconds) and how many may be open; tests set small ones."""

    head_timeout: float = HEAD_TIMEOUT_S
    keep_alive: int = KEEP_ALIVE_S
    """uvicorn's ``timeout_keep_alive``: an idle connection after a response closes sooner."""
    max_connections: int = MAX_CONNECTIONS
    """Capped by ``open_file_limit``: at most what the process's file descriptor limit allows."""


def open_file_limit() -> int:
    """Connections this process may hold: half its soft ``RLIMIT_NOFILE`` (see above)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, soft // 2) if soft != resource.RLIM_INFINITY else MAX_CONNECTIONS


def guarded_protocol(limits: ConnectionLimits) -> type:
    """uvicorn's h11 protocol class with ``limits``' head timeout and connection limit."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    max_connections = min(limits.max_connections, open_file_limit())

    class GuardedH11Protocol(H11Protocol):
        waiting_since: float | None = None
        """When this connection began waiting for a request head (``None``: a request is in progress)."""
        head_timer: Any = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                waiting = [c for c in self.connections if c is not self and getattr(c, "waiting_since", None) is not None]
                if not waiting:
                    transport.close()
                    return
                min(waiting, key=lambda c: c.waiting_since).close_waiting()
            self._wait_for_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.waiting_since is not None and self.conn.their_state is not h11.IDLE:
                self._stop_waiting()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start a pipelined request already buffered
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._wait_for_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        def _wait_for_head(self) -> None:
            self._stop_waiting()
            self.waiting_since = time.monotonic()
            self.head_timer = self.loop.call_later(limits.head_timeout, self.close_waiting)

        def _stop_waiting(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            self.head_timer = self.waiting_since = None

        def close_waiting(self) -> None:
            """Close this connection, which has no request in progress."""
            self._stop_waiting()
            self.connections.discard(self)
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def server_config(app: Any, host: str, port: int, limits: ConnectionLimits = ConnectionLimits()) -> Any:
    """The ``uvicorn.Config`` the service runs ``app`` under."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(limits),
        timeout_keep_alive=limits.keep_alive,
        backlog=BACKLOG,
        log_level="warning",
        access_log=False,
    )
