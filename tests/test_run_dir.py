"""A run directory has one writer, a resume searches what its run started with, and the faults of
the disk under it (full, damaged, not a directory) are one line naming the path and what to do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge import runs
from evomerge.cli import main
from evomerge.config import load_config
from evomerge.errors import RunDirInUseError, UserError
from evomerge.store import RunStore, clear_run_dir

PAST_DEADLINE = ["--deadline", "2000-01-01T07:00"]  # a run stopped before its first candidate: resumable, instant
NO_DEADLINE = ["--deadline", "2999-01-01T07:00"]  # what its resume runs with


def run_info(run_dir: Path) -> dict:
    store = RunStore(run_dir, readonly=True)
    try:
        return store.run_info()
    finally:
        store.close()


def candidate_ids(run_dir: Path) -> list[str]:
    store = RunStore(run_dir, readonly=True)
    try:
        return [r.candidate_id for r in store.evaluations()]
    finally:
        store.close()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def edit_store(run_dir: Path, *statements: str) -> None:
    """Edit ``run.db`` by hand, as a user with the sqlite3 shell might."""
    import sqlite3

    db = sqlite3.connect(run_dir / "run.db")
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()


def stopped_run(digits_config, tmp_path: Path, capsys, **overrides) -> Path:
    run_dir = tmp_path / "r"
    assert main(["run", str(digits_config(**overrides)), "--run-dir", str(run_dir), *PAST_DEADLINE]) == 0
    capsys.readouterr()
    return run_dir


def edit_run_config(run_dir: Path, edit) -> None:
    data = yaml.safe_load((run_dir / "config.yaml").read_text())
    edit(data)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


# --- one writer ----------------------------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder_and_readers_need_no_lock(tmp_path, digits_config, capsys):
    run_dir = stopped_run(digits_config, tmp_path, capsys, budget={"evaluations": 6})
    before = run_info(run_dir)
    holder = RunStore(run_dir)  # another session's writer (flock is per open file: same process is enough)
    try:
        with pytest.raises(RunDirInUseError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            RunStore(run_dir)
        assert main(["resume", str(run_dir)]) == 2
        assert f"pid {os.getpid()}" in one_line_error(capsys)
        assert main(["status", str(run_dir)]) == 0  # readers never take the lock
    finally:
        holder.close()
    assert run_info(run_dir) == before  # the refused writer wrote nothing
    assert main(["resume", str(run_dir), *NO_DEADLINE]) == 0  # released: the next writer goes ahead
    assert len(candidate_ids(run_dir)) == 6


def test_two_runs_started_at_once_on_one_directory_leave_one_finished_run(tmp_path, digits_config, monkeypatch):
    """Both see no run.db; the one refused must not mark the other's run failed."""
    config_path = digits_config()
    run_dir = tmp_path / "r"
    outcomes: list[str] = []

    def start() -> None:
        try:
            runs.start_run(load_config(config_path), str(config_path), run_dir)
            outcomes.append("ran")
        except UserError as exc:
            outcomes.append(f"refused: {exc}")

    real = runs.make_executor

    def the_other_starts_meanwhile(config, *args):
        if not outcomes and not getattr(the_other_starts_meanwhile, "raced", False):
            the_other_starts_meanwhile.raced = True
            start()
        return real(config, *args)

    monkeypatch.setattr(runs, "make_executor", the_other_starts_meanwhile)
    start()
    assert sorted(o.split(":")[0] for o in outcomes) == ["ran", "refused"], outcomes
    info = run_info(run_dir)
    assert info["state"] == "finished" and info["summary"]["evaluations"] == 24
    assert len(candidate_ids(run_dir)) == 24


def test_a_killed_writer_leaves_no_lock_behind(tmp_path, digits_config, capsys):
    run_dir = stopped_run(digits_config, tmp_path, capsys)
    script = "import os, sys\nfrom evomerge.store import RunStore\nRunStore(sys.argv[1])\nos._exit(9)  # dies holding it\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, str(run_dir)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    RunStore(run_dir).close()  # the stale run.lock (with the dead pid inside) does not block


def test_clearing_a_run_directory_another_writer_holds_is_refused_and_wipes_nothing(tmp_path, digits_config, capsys):
    """What ``evomerge demo`` does before each fresh search: it must not wipe a run still writing."""
    run_dir = stopped_run(digits_config, tmp_path, capsys)
    (run_dir / "exports").mkdir()
    holder = RunStore(run_dir)
    try:
        with pytest.raises(RunDirInUseError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            clear_run_dir(run_dir)
        assert {"run.db", "config.yaml", "exports"} <= {p.name for p in run_dir.iterdir()}
    finally:
        holder.close()
    clear_run_dir(run_dir)
    assert [p.name for p in run_dir.iterdir()] == ["run.lock"]
    RunStore(run_dir, create=True).close()  # free for a fresh run


# --- a resume searches what the run started with -------------------------------------------------
def test_resume_refuses_a_config_edited_to_search_something_else(tmp_path, digits_config, digit_models, capsys):
    run_dir = stopped_run(digits_config, tmp_path, capsys)
    before = run_info(run_dir)
    edit_run_config(run_dir, lambda d: d["models"]["experts"].append({"path": str(digit_models["base"])}))
    assert main(["resume", str(run_dir)]) == 2
    err = one_line_error(capsys)
    assert "config.yaml: models.experts changed since the run started (2 → 3 experts)" in err
    edit_run_config(run_dir, lambda d: (d["models"]["experts"].pop(), d["merge"].update(method="ties")))
    assert main(["resume", str(run_dir)]) == 2
    assert "merge.method changed since the run started (task_arithmetic → ties)" in one_line_error(capsys)
    assert run_info(run_dir) == before and candidate_ids(run_dir) == []


def test_resume_takes_harmless_edits(tmp_path, digits_config, capsys):
    run_dir = stopped_run(digits_config, tmp_path, capsys)

    def edit(d: dict) -> None:
        d["budget"] = {"evaluations": 6}
        d["checkpoint_every"] = 2
        d["workers"] = {"count": 1}
        d["models"]["device"] = "cpu"

    edit_run_config(run_dir, edit)
    assert main(["resume", str(run_dir), *NO_DEADLINE]) == 0
    assert len(candidate_ids(run_dir)) == 6


def test_a_run_directory_written_before_its_start_was_recorded_still_resumes(tmp_path, digits_config, digit_models, capsys):
    import sqlite3

    run_dir = stopped_run(digits_config, tmp_path, capsys, budget={"evaluations": 4})
    db = sqlite3.connect(run_dir / "run.db")
    with db:
        db.execute("DROP TABLE started_config")  # as an older evomerge left it
    db.close()
    assert main(["resume", str(run_dir), *NO_DEADLINE]) == 0
    assert len(candidate_ids(run_dir)) == 4
    store = RunStore(run_dir, readonly=True)
    assert store.started_config_yaml() == (run_dir / "config.yaml").read_text()  # recorded from then on
    store.close()


def test_export_and_status_use_the_config_the_run_started_with(tmp_path, digits_config, digit_models, capsys):
    run_dir = tmp_path / "r"
    assert main(["run", str(digits_config(budget={"evaluations": 4})), "--run-dir", str(run_dir)]) == 0

    def edit(d: dict) -> None:
        d["models"]["experts"].append({"path": str(digit_models["base"])})
        d["merge"]["method"] = "linear"

    edit_run_config(run_dir, edit)
    assert main(["status", str(run_dir)]) == 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    recipe = yaml.safe_load((tmp_path / "merged" / "recipe.yaml").read_text())
    assert recipe["recipe"]["method"] == "task_arithmetic" and len(recipe["experts"]) == 2


# --- the disk under the run ----------------------------------------------------------------------
def test_a_full_disk_is_one_line_and_the_run_resumes_exactly(tmp_path, digits_config, monkeypatch, capsys):
    config = digits_config(budget={"evaluations": 12}, checkpoint_every=4)
    assert main(["run", str(config), "--run-dir", str(tmp_path / "reference")]) == 0
    reference = candidate_ids(tmp_path / "reference")

    real = RunStore.add_evaluation

    def fill_the_disk_after_seven(self, ev):
        if self._db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 7:
            pages = self._db.execute("PRAGMA page_count").fetchone()[0]
            self._db.execute(f"PRAGMA max_page_count = {pages}")  # no room for another page
        return real(self, ev)

    monkeypatch.setattr(RunStore, "add_evaluation", fill_the_disk_after_seven)
    run_dir = tmp_path / "full"
    assert main(["run", str(config), "--run-dir", str(run_dir)]) == 2
    err = one_line_error(capsys)
    assert str(run_dir) in err and "disk is full" in err and "free" in err and "resume" in err
    recorded = candidate_ids(run_dir)
    assert 7 <= len(recorded) < 12 and recorded == reference[: len(recorded)]  # nothing recorded was lost
    monkeypatch.setattr(RunStore, "add_evaluation", real)
    assert main(["resume", str(run_dir)]) == 0
    assert candidate_ids(run_dir) == reference  # every evaluation once, as an uninterrupted run


@pytest.mark.parametrize("command", ["resume", "status", "export", "report"])
def test_a_run_db_that_is_not_a_database_is_one_line(tmp_path, capsys, command):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "run.db").write_bytes(b"this is not an SQLite file\n" * 200)
    extra = ["--out", str(tmp_path / "out")] if command == "export" else []
    assert main([command, str(run_dir), *extra]) == 2
    assert f"{run_dir / 'run.db'} is not an evomerge run store" in one_line_error(capsys)


def test_a_run_dir_that_is_or_lies_under_a_file_is_one_line_from_validate_and_run(tmp_path, digits_config, capsys):
    path = tmp_path / "somefile"
    path.write_text("notes\n")
    for run_dir in (path, path / "sub" / "run"):
        assert main(["validate", str(digits_config(run_dir=str(run_dir)))]) == 2
        assert f"run_dir: {path} is a file, not a directory" in one_line_error(capsys)
        assert main(["run", str(digits_config()), "--run-dir", str(run_dir)]) == 2
        assert f"{path} is a file, not a directory" in one_line_error(capsys)
    assert path.read_text() == "notes\n"


def test_a_run_log_the_disk_cannot_take_is_one_warning(tmp_path, capsys):
    import errno
    import logging

    class FullDisk:
        def write(self, text: str) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self) -> None:
            pass

    with runs.run_log(tmp_path):
        handler = next(h for h in logging.getLogger("evomerge").handlers if isinstance(h, logging.FileHandler))
        handler.stream.close()
        handler.stream = FullDisk()
        for i in range(3):
            logging.getLogger("evomerge.controller").info("evaluation %d", i)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: cannot write {tmp_path / 'run.log'}") and "No space" in err, err


@pytest.mark.parametrize(
    "damage, command",
    [
        ("DROP TABLE events", "report"),
        ("UPDATE runs SET summary_json = '{not json'", "status"),
        ("UPDATE evaluations SET metrics_json = '[' WHERE seq = 2", "status"),
        ("UPDATE evaluations SET per_example = x'0102'", "report"),
        ("UPDATE evaluations SET status = 'weird'", "report"),
        ("UPDATE candidates SET genome = x'0102'", "export"),
        ("DROP TABLE candidates", "status"),
    ],
    ids=["table-dropped", "summary", "metrics", "scores", "status", "genome", "candidates-dropped"],
)
def test_a_damaged_run_store_is_one_line(tmp_path, digits_config, capsys, damage, command):
    """Rows edited by hand or tables dropped: the command names run.db as damaged, no traceback."""
    run_dir = tmp_path / "r"
    assert main(["run", str(digits_config(budget={"evaluations": 4})), "--run-dir", str(run_dir)]) == 0
    capsys.readouterr()
    edit_store(run_dir, damage)
    extra = {"export": ["--out", str(tmp_path / "out")], "report": ["--out", str(tmp_path / "report")]}.get(command, [])
    assert main([command, str(run_dir), *extra]) == 2
    err = one_line_error(capsys)
    assert f"{run_dir / 'run.db'} is damaged" in err and "restore it from a backup" in err, err


def test_a_run_store_with_evaluations_deleted_by_hand_is_refused_on_resume(tmp_path, digits_config, capsys):
    """Replay meets candidates the store says were asked after evaluations it no longer holds:
    one line naming both possible causes, not a resume from an inconsistent store."""
    run_dir = tmp_path / "r"
    config = digits_config(budget={"evaluations": 24}, populations=[{"name": "c", "strategy": "cmaes"}])
    assert main(["run", str(config), "--run-dir", str(run_dir)]) == 0
    capsys.readouterr()
    edit_store(run_dir, "UPDATE runs SET state = 'interrupted'", "DELETE FROM evaluations WHERE seq > 4", "DELETE FROM checkpoints")
    assert main(["resume", str(run_dir)]) == 2
    err = one_line_error(capsys)
    assert "cannot resume" in err and "not deterministic" in err and "run.db was edited or damaged" in err, err
