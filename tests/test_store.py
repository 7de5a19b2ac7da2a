"""The run store passes the shipped conformance suite (evomerge.testing.store_suite), keeps one
writer per run directory, and names a full disk instead of failing on its own rollback."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.errors import DiskError, RunDirInUseError
from evomerge.records import Candidate, Evaluation
from evomerge.store import RunStore
from evomerge.testing.store_suite import RunStoreSuite


class TestRunStore(RunStoreSuite):
    pass


def _new_store(tmp_path) -> RunStore:
    store = RunStore(tmp_path / "run", create=True)
    store.init_run("full", "name: full\n", {"evaluations": 10})
    store.add_population("p", "random", 10, {"dim": 3})
    return store


def test_one_writer_at_a_time_and_readers_without_the_lock(tmp_path):
    store = _new_store(tmp_path)
    try:
        with pytest.raises(RunDirInUseError, match="is in use by pid"):
            RunStore(store.run_dir)
        reader = RunStore(store.run_dir, readonly=True)
        assert reader.run_info()["name"] == "full"
        reader.close()
    finally:
        store.close()
    RunStore(store.run_dir).close()  # released with the store


def test_a_full_disk_is_named_and_what_was_recorded_stays(tmp_path):
    store = _new_store(tmp_path)
    try:
        first = Candidate("p:0", "p", np.zeros(3))
        store.add_candidate(first, asked_after=0)
        store.add_evaluation(Evaluation(first.id, "ok", 0.5, np.ones(4)))
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")
        big = Candidate("p:1", "p", np.zeros(3))
        store.add_candidate(big, asked_after=1)
        with pytest.raises(DiskError, match=f"{store.run_dir}: the disk is full .* free some space, then evomerge resume"):
            store.add_evaluation(Evaluation(big.id, "ok", 0.6, np.random.default_rng(0).uniform(size=200_000)))
        assert [r.candidate_id for r in store.evaluations()] == ["p:0"]
        store.set_state("failed")  # the store is usable: no transaction was left open
    finally:
        store.close()


def _dead_pid() -> int:
    """A pid that no longer exists: a child that has exited and been reaped."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_a_run_whose_writer_was_killed_reads_as_killed_and_a_live_one_as_running(tmp_path):
    import socket

    store = _new_store(tmp_path)
    store.set_state("interrupted", {"stop_reason": "signal SIGTERM"})
    store.set_state("running")  # resumed: the last session's ending is no longer how the run stands
    reader = RunStore(store.run_dir, readonly=True)
    try:
        assert reader.run_info()["state"] == "running" and reader.run_info()["summary"] is None
        store.close()
        # SIGKILL: the state stays running, and run.lock names a process that is gone
        (store.run_dir / "run.lock").write_text(f"pid {_dead_pid()} on {socket.gethostname()}\n")
        info = reader.run_info()
        assert info["state"] == "killed"
        assert f"evomerge resume {store.run_dir}" in info["summary"]["stop_reason"]
        (store.run_dir / "run.lock").write_text(f"pid {_dead_pid()} on another-host\n")
        assert reader.run_info()["state"] == "running"  # another host's process: not ours to judge
    finally:
        reader.close()
    resumed = RunStore(store.run_dir)  # a resume takes the directory: it reads as it is recorded
    try:
        assert resumed.run_info()["state"] == "running"
    finally:
        resumed.close()


def test_a_run_killed_before_it_recorded_anything_says_how_to_start_it_again(tmp_path, capsys):
    """SIGKILL while Ray started: run.db has its tables and no run; every reader says what to do."""
    from evomerge.analysis import load_run
    from evomerge.cli import main
    from evomerge.errors import RunDirError

    store = RunStore(tmp_path / "run", create=True)
    store._db.close()  # as a killed process leaves it: no init_run, no discard
    store._lock.release()
    for command in (["status"], ["report"], ["export", "--out", str(tmp_path / "merged")]):
        assert main([command[0], str(store.run_dir), *command[1:]]) == 2
        assert f"the run was never started (stopped before it recorded anything); start it again with evomerge run CONFIG --run-dir {store.run_dir}" in capsys.readouterr().err
    with pytest.raises(RunDirError, match="never started"):
        load_run(store.run_dir)
