"""Ends a local Ray session's processes when the process that started it ends, however it ends.

``ray.init`` on this machine starts the GCS, a raylet and its agents. ``ray.shutdown`` stops them,
but a driver killed with SIGKILL (or by the OOM killer) never gets to call it: the GCS and the
raylet notice and exit, while ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent`` (Ray 2.60)
live on, reparented to init, and ignore SIGTERM. So the executor that starts Ray also starts this
small watcher in a session of its own (a Ctrl-C to the terminal does not reach it). It holds the
read end of a pipe whose only write end the driver holds: end of file means the driver has closed
it (after ``ray.shutdown``) or died. The watcher then finds the processes of that Ray session —
those whose command line names the session directory, and Ray's renamed processes (``ray::…``:
agents, workers) that have a file open inside it, as they keep their logs there — and ends them:
SIGTERM, then SIGKILL after a few seconds. Only that session's processes: other Ray sessions on
the machine, the driver itself and anything else reading the logs are left alone.

Run as a script (``python ray_reaper.py SESSION_DIR DRIVER_PID``, the pipe on stdin): standard library only,
so it starts in a fraction of a second and imports nothing of evomerge.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

GRACE_SECONDS = 3.0
"""How long the session's processes have to exit after SIGTERM before they are killed."""


def session_processes(session_dir: str, spare: set[int]) -> list[int]:
    """The processes of the Ray session in ``session_dir``, except those in ``spare``."""
    inside = re.compile(re.escape(session_dir.rstrip("/")) + r"(?![\w.-])")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spare | {os.getpid()}:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ours = inside.search(cmdline) is not None
            if not ours and cmdline.startswith("ray::"):
                ours = any(inside.search(os.readlink(fd)) for fd in (entry / "fd").iterdir())
        except OSError:  # gone meanwhile, or another user's
            continue
        if ours:
            found.append(int(entry.name))
    return found


def end_session(session_dir: str, spare: set[int]) -> None:
    """SIGTERM the session's processes, then SIGKILL those still there after ``GRACE_SECONDS``."""
    pids = session_processes(session_dir, spare)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while pids and time.monotonic() < deadline:
        time.sleep(0.1)
        pids = [pid for pid in pids if _alive(pid)]
    for pid in pids:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


class Reaper:
    """The watcher of one Ray session, seen from the driver: ``close`` after ``ray.shutdown``."""

    def __init__(self, session_dir: str) -> None:
        read, self._write = os.pipe()  # both non-inheritable: Ray's processes never hold the write end
        try:
            self._process = subprocess.Popen(
                [sys.executable, __file__, session_dir, str(os.getpid())],
                stdin=read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            os.close(read)

    def close(self, timeout: float = 2 * GRACE_SECONDS + 5) -> None:
        """Let the watcher end what is left of the session, and wait for it (bounded)."""
        if self._write < 0:
            return
        os.close(self._write)
        self._write = -1
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()


def main(session_dir: str, driver: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while sys.stdin.buffer.read(1 << 16):  # nothing is ever written: this returns at end of file
        pass
    end_session(session_dir, {driver})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
