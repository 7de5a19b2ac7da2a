"""``evomerge report RUN_DIR --serve``: the report on 127.0.0.1, fresh on every visit.

A page request renders the report again when the run has written anything since the last
rendering (an evaluation, a state change, an expert's baseline), so a browser left open on it —
the page reloads itself every few seconds while the run goes — follows an overnight search.
Each rendering is also written to the report file. It is a local viewer, not a web service:
it binds the loopback interface only and answers just the page. The standard library's
``http.server`` serves it; nothing here touches the search.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from evomerge.errors import UserError
from evomerge.report.document import render_report
from evomerge.store import RunStore

HOST = "127.0.0.1"
PAGE_PATHS = ("/", "/report.html")


class PortInUseError(UserError):
    """The port asked for cannot be bound (in use, or privileged)."""


def run_version(run_dir: Path) -> tuple:
    """What changes whenever the run records something the report shows."""
    store = RunStore(run_dir, readonly=True)
    try:
        info = store.run_info()
        return info["updated"], info["state"], sum(sum(c.values()) for c in store.counts().values()), len(store.baselines())
    finally:
        store.close()


class ReportServer:
    """Serves the report of ``run_dir`` on ``127.0.0.1:port`` (0: any free port) and keeps ``out`` current."""

    def __init__(self, run_dir: Path, out: Path, port: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.out = Path(out)
        self._lock = threading.Lock()
        self._version: tuple | None = None
        self._page = b""
        self.renders = 0
        try:
            self._httpd = ThreadingHTTPServer((HOST, port), self._handler())
        except OSError as exc:
            raise PortInUseError(f"cannot serve on {HOST}:{port} ({exc.strerror}); choose another --port") from None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._httpd.server_address[1]}/"

    def page(self) -> bytes:
        """The report, rendered again only if the run changed since the last rendering."""
        with self._lock:
            version = run_version(self.run_dir)
            if version != self._version:
                report = render_report(self.run_dir, live=True)
                report.write(self.out)
                self._page, self._version = report.html.encode("utf-8"), version
                self.renders += 1
            return self._page

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server hook's name)
                if self.path.split("?", 1)[0] not in PAGE_PATHS:
                    self.send_error(404, "the report is at /")
                    return
                body = server.page()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
                """Quiet: a page reloading every few seconds would flood the terminal."""

        return Handler

    def start(self) -> "ReportServer":
        """Render once (so a broken run directory fails here, with its message), then serve in a thread."""
        self.page()
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="evomerge-report", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
