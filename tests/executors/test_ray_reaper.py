"""A local Ray session leaves nothing running when its driver ends, even by SIGKILL.

The fast test stands in fake session processes (one naming the session directory on its command
line, one renamed ``ray::…`` with a log open inside it, as Ray's agents are) for a real Ray; the
slow one kills a real driver that started Ray through the executor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from evomerge.executors.ray_reaper import session_processes

BOUND = 30.0


def until(condition, limit: float = BOUND) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


def alive(proc: subprocess.Popen) -> bool:
    return proc.poll() is None


def test_a_killed_driver_takes_its_session_processes_with_it_and_nothing_else(tmp_path):
    session = tmp_path / "session_2026-12-03_21-08-28_885469_1"
    (session / "logs").mkdir(parents=True)
    log = session / "logs" / "agent.log"
    log.touch()
    named = subprocess.Popen(["bash", "-c", f'exec -a "gcs_server --log_dir={session}/logs" sleep 60'])
    agent = subprocess.Popen(["bash", "-c", f'exec -a "ray::FakeAgent" sleep 60 3<"{log}"'])
    reader = subprocess.Popen(["bash", "-c", f'exec sleep 60 3<"{log}"'])  # a user reading the logs
    other = subprocess.Popen(["bash", "-c", f'exec -a "raylet --session-dir={session}_2" sleep 60'])  # another session
    driver = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from evomerge.executors.ray_reaper import Reaper
            Reaper({str(session)!r})
            print("ready", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert driver.stdout.readline().strip() == "ready"
        found = set(session_processes(str(session), set()))  # and the reaper, which names the session
        assert {named.pid, agent.pid} <= found and not {reader.pid, other.pid} & found
        driver.send_signal(signal.SIGKILL)
        assert until(lambda: not alive(named) and not alive(agent))
        assert alive(reader) and alive(other)
    finally:
        for proc in (named, agent, reader, other, driver):
            proc.kill()
            proc.wait()


RAY_DRIVER = """
import os, sys, time
import ray
from evomerge.config import load_config
from evomerge.executors import RayExecutor
executor = RayExecutor(load_config(sys.argv[1]), None, lambda text: print("phase:", text, flush=True))
print(ray._private.worker._global_node.get_session_dir_path(), flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_a_driver_that_starts_ray_says_so_quietly_and_leaves_nothing_when_killed(tmp_path, digits_config, data_file):
    """Phases for the progress line, no auth notice over it (Ray's default, token auth, on a
    clean HOME), and after a SIGKILL of the driver no process of its Ray session."""
    config = digits_config(
        executor="ray",
        workers={"count": 1, "cpus_per_worker": 0.5},
        fitness={"name": "classification_accuracy", "data": {"source": str(data_file)}},
    )
    path = os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": path}
    env.pop("RAY_AUTH_MODE", None)
    driver = subprocess.Popen(
        [sys.executable, "-c", RAY_DRIVER, str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        phases = [driver.stdout.readline().strip() for _ in range(2)]
        assert phases[0] == f"phase: starting Ray ({os.cpu_count()} CPUs)"
        assert phases[1].startswith("phase: loading models on 1 worker (memory tier device: ")  # the tier the check chose
        session = driver.stdout.readline().strip()
        if not session:  # the driver ended (stdout closed): its stderr says why
            pytest.fail(f"the driver could not start Ray:\n{driver.communicate(timeout=BOUND)[1][-3000:]}")
        started = session_processes(session, {driver.pid})
        assert len(started) >= 3  # gcs, raylet, agents, the worker
        driver.send_signal(signal.SIGKILL)
        _, err = driver.communicate(timeout=BOUND)
        assert "Token authentication" not in err and (tmp_path / ".ray" / "auth_token").exists()
        assert until(lambda: not session_processes(session, set())), session_processes(session, set())
    finally:
        driver.kill()
        driver.wait()
