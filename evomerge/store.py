"""The run store: one SQLite database (WAL) in the run directory.

Everything needed to report on or resume a run lives here: the resolved config, every candidate and
evaluation (per-example scores as compressed float32 blobs), strategy checkpoints, events, and the
black-box service's answers (written with the evaluation that brought them, never by a worker).
WAL mode lets ``evomerge status`` read while the run writes. Only this module speaks SQL.

A run directory has one writer: a store opened for writing holds ``run.lock`` (``flock``) until it
is closed, and a second writer is refused before it writes anything. The operating system releases
the lock however the process ends, so a killed run never blocks the next resume. Readers take no
lock. A full or failing disk, a ``run.db`` that is not a database, or one whose tables or rows were
damaged (dropped, edited by hand) is a ``UserError`` naming the path: what was committed stays, so
the run resumes once the disk is fixed.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import inspect
import json
import math
import os
import shutil
import socket
import sqlite3
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np

from evomerge.config import CONFIG_NAME
from evomerge.records import Candidate, Evaluation, Status, genome_hash
from evomerge.errors import DiskError, RunDirError, RunDirInUseError, UserError, first_line

DB_NAME = "run.db"
LOCK_NAME = "run.lock"
SCHEMA_VERSION = 5
"""3: ``api_responses`` (black-box answers by request); 4: ``started_config`` (the config the run
started with); 5: ``evaluations.fidelity`` (the fraction of the fitness examples scored: racing).
Each is added to older run directories when they are opened for writing; an evaluation recorded
before 5 reads as fully scored (fidelity 1.0)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL,
    schema_version INTEGER NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    budget_json TEXT NOT NULL,
    summary_json TEXT,
    active_seconds REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS populations (
    name TEXT PRIMARY KEY,
    strategy TEXT NOT NULL,
    budget INTEGER,
    space_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS candidates (
    id TEXT PRIMARY KEY,
    population TEXT NOT NULL REFERENCES populations(name),
    genome BLOB NOT NULL,
    genome_hash TEXT NOT NULL,
    parent_ids TEXT NOT NULL,
    created REAL NOT NULL,
    asked_after INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS candidates_hash ON candidates(genome_hash);
CREATE TABLE IF NOT EXISTS evaluations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    candidate_id TEXT NOT NULL UNIQUE REFERENCES candidates(id),
    status TEXT NOT NULL,
    fitness REAL,
    per_example BLOB,
    n_examples INTEGER,
    metrics_json TEXT NOT NULL,
    worker TEXT NOT NULL,
    started REAL NOT NULL,
    duration REAL NOT NULL,
    error TEXT,
    recorded REAL NOT NULL,
    fidelity REAL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    population TEXT PRIMARY KEY REFERENCES populations(name),
    state BLOB NOT NULL,
    evaluations_seq INTEGER NOT NULL,
    saved REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_responses (
    key TEXT PRIMARY KEY,
    response_json TEXT NOT NULL,
    recorded REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS started_config (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    config_yaml TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS baselines (
    name TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    fitness REAL,
    per_example BLOB,
    error TEXT,
    recorded REAL NOT NULL,
    metrics_json TEXT
);
"""


def _pack_scores(scores: np.ndarray | None) -> bytes | None:
    return None if scores is None else zlib.compress(np.asarray(scores, dtype=np.float32).tobytes())


def _unpack_scores(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(zlib.decompress(blob), dtype=np.float32)


KILLED_REASON = (
    "its process ended without recording it (SIGKILL, out of memory, or the machine went down);"
    " evomerge resume {run_dir} continues the run"
)
"""Why a run read as ``killed`` stopped: recorded as running, but no process writes it any more.
Only readers see this state; the store keeps ``running``, which a resume continues."""

_BUSY = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_INTERRUPT}
"""SQLite's answers that say "not now", not "damaged": a reader meeting the writer's transaction."""


def _disk_fault(run_dir: Path, exc: BaseException, reading: bool = False) -> UserError | None:
    """What the user can do about a failed read or write under ``run_dir``; None when it is no
    fault of the disk (a bug, or an error its caller handles). ``reading`` a recorded value, any
    other database, JSON or decompression error is a damaged store: a table dropped, a row edited
    by hand into bad JSON, scores or a status this code never writes."""

    def kept(action: str) -> str:
        return f"every recorded evaluation is kept: {action}, then evomerge resume {run_dir}"

    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF  # the primary code of an extended one
    if isinstance(exc, sqlite3.Error):
        if code == sqlite3.SQLITE_FULL:
            return DiskError(f"{run_dir}: the disk is full ({exc}); {kept('free some space')}")
        if code == sqlite3.SQLITE_IOERR:
            return DiskError(f"{run_dir}: disk I/O error on {DB_NAME} ({exc}); {kept('check the disk')}")
        if code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
            return RunDirError(
                f"{run_dir / DB_NAME} is not an evomerge run store ({exc}); restore it from a backup, or start a new run elsewhere"
            )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskError(f"{run_dir}: the disk is full ({exc.strerror}: {exc.filename}); {kept('free some space')}")
    if isinstance(exc, OSError) and exc.errno == errno.EIO:
        return DiskError(f"{run_dir}: disk I/O error ({exc.strerror}: {exc.filename}); {kept('check the disk')}")
    if isinstance(exc, OSError) and exc.errno == errno.ENOTDIR:
        return RunDirError(f"{run_dir}: part of the path is a file, not a directory; choose another run directory")
    if isinstance(exc, OSError) and exc.errno == errno.ENOENT:  # mkdir where nothing may be made (/proc)
        return RunDirError(f"{run_dir}: cannot create {exc.filename} ({exc.strerror}); choose another run directory")
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return RunDirError(f"{run_dir}: cannot write there ({exc.strerror}: {exc.filename}); a run needs a writable run directory")
    if reading and isinstance(exc, (sqlite3.DatabaseError, ValueError, zlib.error)) and code not in _BUSY:
        return RunDirError(
            f"{run_dir / DB_NAME} is damaged ({first_line(exc)}); restore it from a backup, or start a new run elsewhere"
        )
    return None


@contextmanager
def disk_faults(run_dir: Path, *, reading: bool = False) -> Iterator[None]:
    """Faults of the disk under ``run_dir`` (full, failing, a damaged database) as one-line
    ``UserError``s, and while ``reading`` recorded values a damaged store too (``_disk_fault``);
    every other error passes unchanged."""
    try:
        yield
    except (sqlite3.Error, OSError, ValueError, zlib.error) as exc:
        fault = _disk_fault(run_dir, exc, reading)
        if fault is None:
            raise
        raise fault from exc


_Read = TypeVar("_Read", bound=Callable[..., Any])


def _reads(method: _Read) -> _Read:
    """A read of the store, in ``disk_faults(reading=True)``: every recorded value passes
    through one of these, so a damaged ``run.db`` is one line naming it (exit 2), never a
    traceback from sqlite3, json or zlib. Generators are covered while they run."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def generate(self: "RunStore", *args: Any, **kwargs: Any) -> Iterator[Any]:
            with disk_faults(self.run_dir, reading=True):
                yield from method(self, *args, **kwargs)

        return generate  # type: ignore[return-value]

    @functools.wraps(method)
    def read(self: "RunStore", *args: Any, **kwargs: Any) -> Any:
        with disk_faults(self.run_dir, reading=True):
            return method(self, *args, **kwargs)

    return read  # type: ignore[return-value]


class RunDirLock:
    """The one writer of a run directory: an exclusive ``flock`` on ``run.lock``, which records
    who holds it (pid and host) for the message a second writer gets.

    The lock lives on an open file, not in the file's existence, so a writer that dies (even by
    SIGKILL) releases it with its process, and the file a dead pid left behind blocks nobody. The
    file is never removed: removing it would let two writers lock two different files.
    """

    def __init__(self, run_dir: Path) -> None:
        path = Path(run_dir) / LOCK_NAME
        with disk_faults(run_dir):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirInUseError(
                f"{run_dir} is in use by {holder} (an evomerge run or resume); wait for it to end, or stop it first"
            ) from None
        try:
            with disk_faults(run_dir):
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd

    @staticmethod
    def holder_gone(run_dir: Path) -> bool:
        """Whether no process writes ``run_dir`` now, as far as a reader can tell without taking
        the lock (a reader holding it, even briefly, could refuse a resume starting that moment):
        a writer that ends empties ``run.lock``, and one killed leaves its pid, which no longer
        exists. A holder on another host, or one this process may not signal, counts as alive."""
        try:
            holder = (Path(run_dir) / LOCK_NAME).read_text(errors="replace").split()
        except OSError:
            return False
        if not holder:
            return True
        if len(holder) != 4 or holder[0] != "pid" or not holder[1].isdigit() or holder[3] != socket.gethostname():
            return False
        try:
            os.kill(int(holder[1]), 0)
        except ProcessLookupError:
            return True
        except OSError:  # EPERM: it exists, under another user
            return False
        return False

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)  # while still holding it: nobody reads a stale holder
            finally:
                os.close(fd)  # closing the file releases the lock


def clear_run_dir(run_dir: Path) -> None:
    """Empty a run directory for a fresh run in it (the demo owns its directory), under its lock:
    a run or resume still writing there is refused with ``RunDirInUseError``, not wiped. The lock
    file stays, as everywhere (see ``RunDirLock``)."""
    run_dir = Path(run_dir)
    lock = RunDirLock(run_dir)
    try:
        with disk_faults(run_dir):
            for entry in run_dir.iterdir():
                if entry.name == LOCK_NAME:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    finally:
        lock.release()


def _not_a_run_dir(path: Path) -> str:
    """Why ``path`` holds no run, in the words that say what to give instead (a config file is
    the likeliest mistake: ``evomerge status my-run.yaml``)."""
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml", ".json"):
        return f"{path} is a config file; give the run directory instead (the config's run_dir, or run's --run-dir)"
    if not path.exists():
        return f"{path}: no such run directory"
    return f"{path}: not an evomerge run directory (no {DB_NAME})"


class RunStore:
    """Access to one run directory's database. Cheap to open; safe to open read-only elsewhere.

    Opened for writing, the store is the run directory's one writer (``RunDirLock``) until
    ``close``; ``create`` starts a new run there, refused if the directory already holds one.
    """

    def __init__(self, run_dir: Path, *, create: bool = False, readonly: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.db_path = self.run_dir / DB_NAME
        if create and self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunDirError(f"{self.run_dir} is a file, not a directory; choose another --run-dir")
        if not create and not self.db_path.exists():
            raise RunDirError(_not_a_run_dir(self.run_dir))
        self._new_db = create and not self.db_path.exists()  # what ``discard`` may remove
        if create:
            with disk_faults(self.run_dir):
                self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = None if readonly else RunDirLock(self.run_dir)  # before anything is written
        try:
            with disk_faults(self.run_dir):
                self._db = sqlite3.connect(
                    f"file:{self.db_path}?mode=ro" if readonly else f"file:{self.db_path}",
                    uri=True,
                    timeout=30.0,
                    isolation_level=None,
                )
                try:
                    self._open(create, readonly)
                except BaseException:
                    self._db.close()
                    raise
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    def _open(self, create: bool, readonly: bool) -> None:
        self._db.row_factory = sqlite3.Row
        has_schema = self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'runs'").fetchone() is not None
        if readonly and not has_schema:
            raise RunDirError(f"{self.run_dir}: the run is still being created; try again in a moment")
        if create and has_schema and self._holds_run():
            raise RunDirError(
                f"{self.run_dir} already holds a run: continue it with evomerge resume {self.run_dir},"
                " or choose another --run-dir, or remove it"
            )
        if not readonly:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # One transaction, so a reader never sees half a schema; new tables and columns only: an
            # older run directory gains them here.
            with self._write():
                for statement in _SCHEMA.split(";"):  # not executescript: it commits whatever is open
                    if statement.strip():
                        self._db.execute(statement)
                if not self._has_fidelity():  # a run directory from before schema 5
                    self._db.execute("ALTER TABLE evaluations ADD COLUMN fidelity REAL")
                if not self._has_column("baselines", "metrics_json"):  # from before the baselines' metrics
                    self._db.execute("ALTER TABLE baselines ADD COLUMN metrics_json TEXT")
                self._db.execute("UPDATE runs SET schema_version = ? WHERE schema_version < ?", (SCHEMA_VERSION, SCHEMA_VERSION))
        self._fidelity_column = self._has_fidelity()

    def close(self) -> None:
        self._db.close()
        if self._lock is not None:
            self._lock.release()

    def discard(self) -> None:
        """Close a store whose run never started (refused before ``init_run``): the database this
        store created goes, so the directory reads as free, not as a run to resume. Removed while
        the lock is held; the lock file stays (see ``RunDirLock``)."""
        self._db.close()
        try:
            if self._new_db:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{self.db_path}{suffix}").unlink(missing_ok=True)
        finally:
            if self._lock is not None:
                self._lock.release()

    def _has_fidelity(self) -> bool:
        return self._has_column("evaluations", "fidelity")

    def _has_column(self, table: str, column: str) -> bool:
        return any(r["name"] == column for r in self._db.execute(f"PRAGMA table_info({table})"))

    def _fully_scored(self) -> str:
        """The SQL condition for evaluations scored on every fitness example (no condition on a
        run directory from before racing, opened read-only: all of its evaluations were)."""
        return " AND COALESCE(e.fidelity, 1.0) >= 1.0" if self._fidelity_column else ""

    def _holds_run(self) -> bool:
        return self._db.execute("SELECT 1 FROM runs").fetchone() is not None

    # --- writing ---------------------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[None]:
        """One transaction: all of it is recorded or none. SQLite may already have rolled back
        (a full disk does), so a rollback is asked for only while a transaction is open: asking
        anyway would hide the real error behind "no transaction is active"."""
        with disk_faults(self.run_dir):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _tx(self, sql: str, args: tuple = ()) -> None:
        with self._write():
            self._db.execute(sql, args)

    def init_run(self, name: str, config_yaml: str, budget: dict[str, Any]) -> None:
        """Start the run: ``config.yaml`` for the user to read (and edit what a resume may
        change), and the same config kept in the store as the one the run started with."""
        if self._holds_run():
            raise RunDirError(f"{self.run_dir} already holds a run: continue it with evomerge resume {self.run_dir}, or choose another --run-dir")
        now = time.time()
        with disk_faults(self.run_dir):
            (self.run_dir / CONFIG_NAME).write_text(config_yaml)
        with self._write():
            self._db.execute(
                "INSERT INTO runs (id, name, schema_version, state, created, updated, budget_json) VALUES (1, ?, ?, 'running', ?, ?, ?)",
                (name, SCHEMA_VERSION, now, now, json.dumps(budget)),
            )
            self._db.execute("INSERT INTO started_config (id, config_yaml) VALUES (1, ?)", (config_yaml,))
        self._new_db = False  # a run now: ``discard`` no longer applies

    def record_started_config(self, config_yaml: str) -> None:
        """For a run directory written before the started config was kept: take ``config_yaml``
        (its config.yaml as found) as the config the run started with."""
        self._tx("INSERT OR IGNORE INTO started_config (id, config_yaml) VALUES (1, ?)", (config_yaml,))

    def add_population(self, name: str, strategy: str, budget: int | None, space: dict[str, Any]) -> None:
        self._tx(
            "INSERT INTO populations (name, strategy, budget, space_json) VALUES (?, ?, ?, ?)",
            (name, strategy, budget, json.dumps(space)),
        )

    def add_candidate(self, cand: Candidate, asked_after: int) -> None:
        """Record a candidate before it is scored; ``asked_after`` is the evaluation count when it
        was asked, which places the ask between the tells when a resumed run replays the log."""
        self._tx(
            "INSERT OR IGNORE INTO candidates (id, population, genome, genome_hash, parent_ids, created, asked_after)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                cand.id,
                cand.population,
                np.ascontiguousarray(cand.genome, dtype=np.float64).tobytes(),
                genome_hash(cand.genome),
                json.dumps(list(cand.parent_ids)),
                cand.created,
                asked_after,
            ),
        )

    def add_evaluation(self, ev: Evaluation) -> int:
        """Record an evaluation and the service answers it brought, in one transaction; returns its
        sequence number (the count of evaluations so far)."""
        fitness = ev.fitness if np.isfinite(ev.fitness) else None
        with self._write():
            cur = self._db.execute(
                "INSERT INTO evaluations (candidate_id, status, fitness, per_example, n_examples, metrics_json, worker, started, duration, error, recorded, fidelity)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    ev.candidate_id,
                    ev.status,
                    fitness,
                    _pack_scores(ev.per_example),
                    None if ev.per_example is None else len(ev.per_example),
                    json.dumps(ev.metrics),
                    ev.worker,
                    ev.started,
                    ev.duration,
                    ev.error,
                    time.time(),
                    ev.fidelity,
                ),
            )
            self._save_responses(ev.responses)
            self._db.execute("UPDATE runs SET updated = ?", (time.time(),))
        return int(cur.lastrowid)

    def save_checkpoints(self, states: dict[str, bytes], evaluations_seq: int, active_seconds: float) -> None:
        """Every population's state as of evaluation ``evaluations_seq``, in one transaction, so a
        resumed run never mixes states from different moments; ``active_seconds`` is the run's
        searching time so far (what ``max_time`` limits across resumes)."""
        now = time.time()
        with self._write():
            self._db.execute("UPDATE runs SET active_seconds = ?, updated = ?", (active_seconds, now))
            for population, state in states.items():
                self._db.execute(
                    "INSERT INTO checkpoints (population, state, evaluations_seq, saved) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT(population) DO UPDATE SET state = excluded.state,"
                    " evaluations_seq = excluded.evaluations_seq, saved = excluded.saved",
                    (population, state, evaluations_seq, now),
                )

    def set_state(self, state: str, summary: dict[str, Any] | None = None) -> None:
        self._tx(
            "UPDATE runs SET state = ?, updated = ?, summary_json = COALESCE(?, summary_json)",
            (state, time.time(), None if summary is None else json.dumps(summary)),
        )

    def add_baseline(self, expert: str, ev: Evaluation) -> None:
        """An expert (or the base) scored alone on the fitness data, with its metrics (per-task
        means: what the report compares the best merge with), and the service answers it brought."""
        fitness = ev.fitness if np.isfinite(ev.fitness) else None
        with self._write():
            self._db.execute(
                "INSERT OR REPLACE INTO baselines (name, status, fitness, per_example, error, recorded, metrics_json)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (expert, ev.status, fitness, _pack_scores(ev.per_example), ev.error, time.time(), json.dumps(ev.metrics)),
            )
            self._save_responses(ev.responses)

    def _save_responses(self, responses: dict[str, Any]) -> None:
        """Inside a transaction: black-box answers by cache key; the first answer to a key stays."""
        if responses:
            now = time.time()
            self._db.executemany(
                "INSERT OR IGNORE INTO api_responses (key, response_json, recorded) VALUES (?, ?, ?)",
                [(key, json.dumps(answer), now) for key, answer in responses.items()],
            )

    def log_event(self, kind: str, message: str) -> None:
        self._tx("INSERT INTO events (time, kind, message) VALUES (?, ?, ?)", (time.time(), kind, message))

    # --- reading ---------------------------------------------------------------------------
    @_reads
    def run_info(self) -> dict[str, Any]:
        """The run's record; read-only, a run recorded as running whose process is gone reads as
        ``killed`` (``KILLED_REASON``), so status and report never show a dead run as going."""
        row = self._db.execute("SELECT * FROM runs").fetchone()
        if row is None:
            raise RunDirError(
                f"{self.run_dir}: the run was never started (stopped before it recorded anything);"
                f" start it again with evomerge run CONFIG --run-dir {self.run_dir}"
            )
        info = dict(row)
        info["budget"] = json.loads(info.pop("budget_json"))
        summary = info.pop("summary_json")
        info["summary"] = json.loads(summary) if summary else None
        if info["state"] == "running":  # an earlier session's ending (a resumed run's) is not how it stands now
            info["summary"] = None
            if self._lock is None and RunDirLock.holder_gone(self.run_dir):
                info["state"], info["summary"] = "killed", {"stop_reason": KILLED_REASON.format(run_dir=self.run_dir)}
        return info

    def config_yaml(self) -> str:
        path = self.run_dir / CONFIG_NAME
        if not path.exists():
            raise RunDirError(f"{self.run_dir}: missing {CONFIG_NAME}")
        return path.read_text()

    @_reads
    def started_config_yaml(self) -> str | None:
        """The resolved config the run started with; None in a run directory written before it
        was kept (its config.yaml is then the only copy)."""
        if not self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'started_config'").fetchone():
            return None  # an older run directory opened read-only
        row = self._db.execute("SELECT config_yaml FROM started_config").fetchone()
        return None if row is None else row["config_yaml"]

    @_reads
    def populations(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM populations ORDER BY rowid").fetchall()
        return [{**dict(r), "space": json.loads(r["space_json"])} for r in rows]

    @_reads
    def counts(self) -> dict[str, dict[str, int]]:
        """Evaluations per population and status."""
        out: dict[str, dict[str, int]] = {}
        for r in self._db.execute(
            "SELECT c.population, e.status, COUNT(*) n FROM evaluations e JOIN candidates c ON c.id = e.candidate_id GROUP BY 1, 2"
        ):
            out.setdefault(r["population"], {})[r["status"]] = r["n"]
        return out

    @_reads
    def stopped_early(self) -> int:
        """Successful evaluations that racing stopped before every fitness example was scored."""
        if not self._fidelity_column:
            return 0
        return self._db.execute("SELECT COUNT(*) FROM evaluations WHERE status = 'ok' AND fidelity < 1.0").fetchone()[0]

    @_reads
    def evaluations(self, population: str | None = None, with_scores: bool = False) -> Iterator[Evaluation]:
        sql = (
            "SELECT e.*, c.population, c.genome FROM evaluations e JOIN candidates c ON c.id = e.candidate_id"
            + (" WHERE c.population = ?" if population else "")
            + " ORDER BY e.seq"
        )
        for r in self._db.execute(sql, (population,) if population else ()):
            yield self._row(r, with_scores)

    @_reads
    def best(self, population: str | None = None) -> Evaluation | None:
        """The best fully scored evaluation (of a population): a raced one stopped early is never it."""
        sql = (
            "SELECT e.*, c.population, c.genome FROM evaluations e JOIN candidates c ON c.id = e.candidate_id"
            " WHERE e.status = 'ok' AND e.fitness IS NOT NULL"
            + self._fully_scored()
            + (" AND c.population = ?" if population else "")
            + " ORDER BY e.fitness DESC, e.seq ASC LIMIT 1"
        )
        r = self._db.execute(sql, (population,) if population else ()).fetchone()
        return None if r is None else self._row(r, True)

    @_reads
    def evaluation(self, candidate_id: str) -> Evaluation | None:
        """The evaluation of one candidate, with its scores; None if it was never scored."""
        r = self._db.execute(
            "SELECT e.*, c.population, c.genome FROM evaluations e JOIN candidates c ON c.id = e.candidate_id"
            " WHERE e.candidate_id = ?",
            (candidate_id,),
        ).fetchone()
        return None if r is None else self._row(r, True)

    @_reads
    def top(self, population: str, n: int, max_seq: int) -> list[Evaluation]:
        """A population's ``n`` best fully scored evaluations among the first ``max_seq`` recorded."""
        rows = self._db.execute(
            "SELECT e.*, c.population, c.genome FROM evaluations e JOIN candidates c ON c.id = e.candidate_id"
            " WHERE c.population = ? AND e.status = 'ok' AND e.fitness IS NOT NULL AND e.seq <= ?"
            + self._fully_scored()
            + " ORDER BY e.fitness DESC, e.seq ASC LIMIT ?",
            (population, max_seq, n),
        ).fetchall()
        return [self._row(r, True) for r in rows]

    @_reads
    def scored_genome(self, digest: str, populations: list[str]) -> Evaluation | None:
        """The first successful evaluation of a genome with this hash in these populations."""
        marks = ", ".join("?" * len(populations))
        r = self._db.execute(
            "SELECT e.*, c.population, c.genome FROM evaluations e JOIN candidates c ON c.id = e.candidate_id"
            f" WHERE c.genome_hash = ? AND e.status = 'ok' AND c.population IN ({marks}) ORDER BY e.seq LIMIT 1",
            (digest, *populations),
        ).fetchone()
        return None if r is None else self._row(r, True)

    @_reads
    def checkpoints(self) -> tuple[dict[str, bytes], int]:
        """The populations' latest states and the evaluation count they were taken at (0: none)."""
        rows = self._db.execute("SELECT population, state, evaluations_seq FROM checkpoints").fetchall()
        if not rows:
            return {}, 0
        seqs = {r["evaluations_seq"] for r in rows}
        if len(seqs) != 1:
            raise RunDirError(f"{self.run_dir}: checkpoints from different moments; the run store is damaged")
        return {r["population"]: r["state"] for r in rows}, seqs.pop()

    @_reads
    def replay_log(self, after_seq: int) -> Iterator[tuple[str, Any]]:
        """What happened after evaluation ``after_seq``, in order: ``("ask", (population, id, genome_hash))``
        and ``("tell", Evaluation)``. A candidate asked when ``k`` evaluations were recorded
        comes before evaluation ``k + 1``; candidates asked at the same count keep their order."""
        asks = self._db.execute(
            "SELECT population, id, genome_hash, asked_after FROM candidates WHERE asked_after >= ? ORDER BY rowid",
            (after_seq,),
        ).fetchall()
        tells = self._db.execute(
            "SELECT e.*, c.population, c.genome FROM evaluations e JOIN candidates c ON c.id = e.candidate_id"
            " WHERE e.seq > ? ORDER BY e.seq",
            (after_seq,),
        )
        pending = iter(asks)
        ask = next(pending, None)
        for r in tells:
            while ask is not None and ask["asked_after"] < r["seq"]:
                yield "ask", (ask["population"], ask["id"], ask["genome_hash"])
                ask = next(pending, None)
            yield "tell", self._row(r, True)
        while ask is not None:
            yield "ask", (ask["population"], ask["id"], ask["genome_hash"])
            ask = next(pending, None)

    @_reads
    def evaluation_counts(self) -> dict[str, tuple[int, int]]:
        """Per population: (candidates asked, evaluations recorded)."""
        asked = dict(self._db.execute("SELECT population, COUNT(*) FROM candidates GROUP BY population").fetchall())
        done = dict(
            self._db.execute(
                "SELECT c.population, COUNT(*) FROM evaluations e JOIN candidates c ON c.id = e.candidate_id GROUP BY 1"
            ).fetchall()
        )
        return {p: (asked.get(p, 0), done.get(p, 0)) for p in set(asked) | set(done)}

    @_reads
    def baselines(self) -> list[dict[str, Any]]:
        """The base and the experts scored alone, in the order recorded (none in runs that did not
        score them); ``role`` is ``base`` or ``expert``, and ``metrics`` is empty for run directories
        from before they were kept."""
        try:
            rows = self._db.execute("SELECT * FROM baselines ORDER BY rowid").fetchall()
        except sqlite3.OperationalError:  # a run directory written before baselines were recorded
            return []
        baselines = []
        for r in rows:
            metrics = json.loads(dict(r).get("metrics_json") or "{}")
            role = metrics.get("baseline", "expert")
            baselines.append({**dict(r), "per_example": _unpack_scores(r["per_example"]), "metrics": metrics, "role": role})
        return baselines

    @_reads
    def api_responses(self) -> dict[str, Any]:
        """Every black-box answer the run recorded, by cache key (``evomerge.service.response_cache``):
        what a resumed run's workers start from, so an answer is never paid for twice."""
        return {key: json.loads(text) for key, text in self._db.execute("SELECT key, response_json FROM api_responses")}

    @_reads
    def api_usage(self) -> dict[str, float]:
        """Usage summed over every evaluation: API requests, tokens (prompt + completion) and cost,
        and the fitness examples workers scored (``examples``: what racing saves)."""
        row = self._db.execute(
            "SELECT COALESCE(SUM(json_extract(metrics_json, '$.usage.requests')), 0),"
            " COALESCE(SUM(json_extract(metrics_json, '$.usage.prompt_tokens'))"
            " + SUM(json_extract(metrics_json, '$.usage.completion_tokens')), 0),"
            " COALESCE(SUM(json_extract(metrics_json, '$.usage.cost')), 0),"
            " COALESCE(SUM(json_extract(metrics_json, '$.examples_scored')), 0) FROM evaluations"
        ).fetchone()
        return {"requests": row[0], "tokens": row[1], "cost": row[2], "examples": row[3]}

    @_reads
    def events(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._db.execute("SELECT * FROM events ORDER BY seq")]

    @staticmethod
    def _row(r: sqlite3.Row, with_scores: bool) -> Evaluation:
        """An evaluation as recorded: a failure's fitness is -inf again, scores float64 again."""
        scores = _unpack_scores(r["per_example"]) if with_scores else None
        return Evaluation(
            candidate_id=r["candidate_id"],
            status=Status(r["status"]),
            fitness=-math.inf if r["fitness"] is None else r["fitness"],
            per_example=None if scores is None else scores.astype(np.float64),
            metrics=json.loads(r["metrics_json"]),
            worker=r["worker"],
            started=r["started"],
            duration=r["duration"],
            error=r["error"],
            population=r["population"],
            seq=r["seq"],
            genome=np.frombuffer(r["genome"], dtype=np.float64).copy(),
            fidelity=1.0 if "fidelity" not in r.keys() or r["fidelity"] is None else r["fidelity"],
        )
