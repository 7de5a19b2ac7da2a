"""Whole runs on Ray: populations sharing the pool, a worker killed mid-run, a node lost mid-run, ``ray job submit``.

``test_ray_executor.py`` drives ``RayExecutor`` directly; these tests drive ``evomerge run`` end to end
and check the run directory. A fitness plugin (a module in a temporary directory on the PYTHONPATH
that Ray's processes inherit) reads flag files in a control folder, so a test steers what a worker
does — die once, hold an evaluation on a given node — through files, never through sleeps. Every
wait has a deadline and every subprocess a timeout.

* ``TestSharedLocalRay``: one small local Ray (2 CPUs) for the class; the executor uses the session
  the process already has.
* ``test_slow_cluster_run_survives_losing_a_node``: a two-node ``ray.cluster_utils.Cluster``; the run
  is a subprocess that joins it with ``--address``.
* ``test_slow_job_submit_runs_to_completion``: ``ray start --head`` with its own temp dir and ports,
  ``ray job submit``, then the head's processes are ended by their ids (never ``ray stop``, which
  would end every Ray on the machine).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import ray
import yaml

from evomerge.store import RunStore

PLUGIN = "evomerge_ray_runs_plugin"
VENV_BIN = Path(sys.executable).parent
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}

PLUGIN_SOURCE = '''
"""Fitness for the Ray run tests, steered by files in CONTROL (see tests/test_ray_runs.py)."""
import os
import time
from pathlib import Path

from evomerge.fitness.classification import classification_accuracy

CONTROL = Path({control!r})


def _claim(name):
    """True for exactly one caller across all processes: the one that creates the file."""
    try:
        os.close(os.open(CONTROL / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def fitness(model, tokenizer, examples):
    die_at = CONTROL / "die-at"
    if die_at.exists():  # the Nth call of the run (over every worker) kills its worker, once
        number = 0
        while not _claim(f"call-{{number}}"):
            number += 1
        if number == int(die_at.read_text()) and _claim("died"):
            os._exit(1)
    hold = CONTROL / "hold-node"
    if hold.exists():  # an evaluation on that node runs until the node is removed under it
        import ray

        if ray.get_runtime_context().get_node_id() == hold.read_text().strip():
            (CONTROL / "held").touch()
            end = time.monotonic() + 60.0
            while time.monotonic() < end:
                time.sleep(0.05)
            raise RuntimeError("the node holding this evaluation was not removed within 60s")
    delay = CONTROL / "delay"
    if delay.exists():  # a minimum time per evaluation, like a real model's, so the run outlasts a deadline
        time.sleep(float(delay.read_text()))
    return classification_accuracy(model, tokenizer, examples)
'''

M2N2 = {"name": "m2n2", "strategy": "m2n2", "options": {"archive": "seed_recipes", "split_grid": "elements", "archive_size": 4}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def recorded(run_dir: Path) -> int:
    """Evaluations recorded so far, read-only (0 while the run directory is still being created)."""
    try:
        store = RunStore(run_dir, readonly=True)
    except Exception:
        return 0
    try:
        return sum(sum(c.values()) for c in store.counts().values())
    except Exception:  # tables not created yet
        return 0
    finally:
        store.close()


def read_run(run_dir: Path) -> tuple[dict, list]:
    store = RunStore(run_dir, readonly=True)
    try:
        return store.run_info(), list(store.evaluations())
    finally:
        store.close()


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray-runs-plugin")
    (root / "control").mkdir()
    (root / f"{PLUGIN}.py").write_text(textwrap.dedent(PLUGIN_SOURCE.format(control=str(root / "control"))))
    return root


@pytest.fixture
def control(plugin_dir) -> Path:
    """The plugin's control folder, emptied for each test."""
    folder = plugin_dir / "control"
    for path in folder.iterdir():
        path.unlink()
    return folder


@pytest.fixture(scope="module")
def plugin_env(plugin_dir):
    """RAY_* settings and the plugin on PYTHONPATH, for this process and every Ray process it starts."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in RAY_ENV.items():
            mp.setenv(key, value)
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(plugin_dir), os.environ.get("PYTHONPATH")])))
        mp.syspath_prepend(str(plugin_dir))
        yield


@pytest.fixture
def ray_config(digits_config, data_file):
    """A ray-executor digits config; ``fitness`` names the scoring function, the rest replace sections."""

    def make(budget: int, fitness: str = f"{PLUGIN}:fitness", **overrides) -> Path:
        sections = {
            "executor": "ray",
            "workers": {"count": 2, "cpus_per_worker": 1, "timeout": "60s"},
            "fitness": {"name": fitness, "data": {"source": str(data_file)}},
            "budget": {"evaluations": budget},
            **overrides,
        }
        return digits_config(**sections)

    return make


def assert_complete(run_dir: Path, budget: int) -> list:
    """The run finished its whole budget with no failed evaluation; returns its evaluations."""
    info, rows = read_run(run_dir)
    assert info["state"] == "finished", info
    assert len(rows) == budget
    assert [(r.candidate_id, r.error) for r in rows if r.status != "ok"] == []
    assert (run_dir / "config.yaml").exists()
    return rows


@pytest.fixture(scope="class")
def local_ray(plugin_env):
    """One small local Ray for a class of tests, shut down before the cluster tests start their own."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.usefixtures("local_ray")
class TestSharedLocalRay:
    """Runs in this process on one local Ray session of 2 CPUs, which the executor joins."""

    def test_two_populations_share_the_pool(self, ray_config, tmp_path):
        from evomerge.cli import main

        budget = 30
        config = ray_config(budget, fitness="classification_accuracy", populations=[{"name": "cma", "strategy": "cmaes"}, M2N2])
        run_dir = tmp_path / "shared"
        assert main(["run", str(config), "--run-dir", str(run_dir)]) == 0
        rows = assert_complete(run_dir, budget)
        assert {r.population for r in rows} == {"cma", "m2n2"}
        workers = {r.worker for r in rows} - {"cache"}  # a repeated genome is answered from the store
        assert len(workers) == 2 and all(w.startswith("ray-") for w in workers), workers
        assert ray.is_initialized()  # the run used this session and left it running

    def test_worker_killed_mid_evaluation_is_replaced_and_the_run_completes(self, ray_config, control, tmp_path, caplog):
        from evomerge.cli import main

        budget = 16
        (control / "die-at").write_text("5")
        run_dir = tmp_path / "killed"
        with caplog.at_level(logging.WARNING, logger="evomerge.executors"):
            assert main(["run", str(ray_config(budget)), "--run-dir", str(run_dir)]) == 0
        assert (control / "died").exists(), "no worker died: the test did not exercise a death"
        deaths = [m for r in caplog.records if (m := re.search(r"died running (\S+): ", r.getMessage()))]
        assert len(deaths) == 1, [r.getMessage() for r in caplog.records]
        rows = assert_complete(run_dir, budget)
        [retried] = [r for r in rows if r.candidate_id == deaths[0].group(1)]
        assert retried.status == "ok" and retried.fitness is not None


@pytest.mark.slow
def test_slow_cluster_run_survives_losing_a_node(ray_config, control, plugin_env, tmp_path):
    from ray.cluster_utils import Cluster

    budget, replace_timeout = 30, 5.0
    run_dir = tmp_path / "cluster-run"
    # The default wait for a replacement worker (120 s, room for an autoscaler) would outlast the
    # test; a short one shows within the test what a long run meets once the cluster lost capacity.
    config = ray_config(budget, workers={"count": 2, "cpus_per_worker": 1, "timeout": "60s", "replace_timeout": replace_timeout})
    (control / "delay").write_text("0.3")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": False,
            "dashboard_agent_listen_port": free_port(),
            "object_store_memory": 100 * 2**20,
        },
    )
    driver = None
    log_path = tmp_path / "driver.log"
    try:
        worker_node = cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
        cluster.wait_for_nodes(timeout=60)
        argv = ["run", str(config), "--run-dir", str(run_dir), "--address", cluster.address]
        with open(log_path, "wb") as log:
            driver = subprocess.Popen([sys.executable, "-m", "evomerge.cli", *argv], stdout=log, stderr=subprocess.STDOUT)

        def driver_log() -> str:
            return log_path.read_text(errors="replace")[-6000:]

        def alive_with(condition):
            assert driver.poll() is None, f"the run ended early (rc {driver.returncode}):\n{driver_log()}"
            return condition()

        wait_for(lambda: alive_with(lambda: recorded(run_dir) >= 4), 120, "4 evaluations before the node is lost")
        (control / "hold-node").write_text(worker_node.node_id)
        wait_for(lambda: alive_with((control / "held").exists), 60, "an evaluation running on the worker node")
        before = recorded(run_dir)
        cluster.remove_node(worker_node, allow_graceful=True)
        removed = time.time()
        try:
            rc = driver.wait(timeout=180)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the run hung after the node was removed:\n{driver_log()}") from None
        output = driver_log()
        assert rc == 0, f"the run failed after losing the node (rc {rc}, {before} of {budget} recorded then):\n{output}"
        deaths = re.findall(r"died running (\S+): ", output)
        assert len(deaths) == 1, output
        rows = assert_complete(run_dir, budget)
        [retried] = [r for r in rows if r.candidate_id == deaths[0]]
        assert retried.status == "ok"
        info, _ = read_run(run_dir)
        assert info["updated"] - removed > replace_timeout + 1, "the run ended before the placement deadline: inconclusive"
        assert "going on with 1 workers" in output
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
        cluster.shutdown()
        if cluster.head_node is not None:
            cluster.remove_node(cluster.head_node, allow_graceful=False)


def _descendants(roots: set[int]) -> set[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found = set(roots)
    while True:
        more = {pid for pid, parent in parents.items() if parent in found} - found
        if not more:
            return found
        found |= more


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stop_head(temp_dir: str, gcs_port: int, timeout: float = 30.0) -> None:
    """End the head started with ``--temp-dir temp_dir --port gcs_port``, like ``ray stop --force`` but
    only this head: SIGKILL, by id, to the processes that name its temp dir (GCS, raylet, dashboard,
    monitors) or its GCS port (the Ray client server), and to their children (agents, workers, the job)."""
    mine = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(temp_dir.encode() in a or (a.startswith(b"--address=") and a.endswith(b":%d" % gcs_port)) for a in args):
            mine.add(int(cmdline.parent.name))
    pids = _descendants(mine) - {os.getpid(), os.getppid()}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not any(_alive(pid) for pid in pids), timeout, "the Ray head's processes to end")


JOB_PLUGIN = '''
"""A fitness plugin that exists only in the job's working dir: importable where Ray ships it."""
from evomerge.fitness.classification import classification_accuracy


def fitness(model, tokenizer, examples):
    return classification_accuracy(model, tokenizer, examples)
'''


@pytest.mark.slow
def test_slow_job_submit_runs_to_completion(ray_config, tmp_path):
    """README's recipe: ``ray start --head`` in the activated venv, then ``ray job submit --working-dir . -- evomerge run``.

    The config's model and data paths are absolute and ``--run-dir`` is absolute: the job runs in Ray's
    unpacked copy of the working dir, which leaves out what .gitignore names and is discarded later."""
    try:
        import aiohttp  # noqa: F401
        import ray.dashboard  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the job server needs ray[default] (pip install -e '.[cluster]'): {exc}")
    budget = 8
    job_dir = tmp_path / "job"  # the --working-dir: a config and a fitness plugin, shipped to the cluster by Ray
    (job_dir / "configs").mkdir(parents=True)
    (job_dir / "configs" / "run.yaml").write_text(ray_config(budget, fitness="job_fitness:fitness").read_text())
    (job_dir / "job_fitness.py").write_text(JOB_PLUGIN)
    run_dir = tmp_path / "job-run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENV, PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")  # as after `source .venv/bin/activate`
    ray_cli = str(VENV_BIN / "ray")
    gcs, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="evr-", dir="/tmp")  # short: Ray's socket paths live under it
    head = [
        ray_cli, "start", "--head", "--num-cpus", "2", "--disable-usage-stats", "--include-dashboard=true",
        "--port", str(gcs), "--dashboard-port", str(dashboard),
        "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
        "--temp-dir", temp_dir,
    ]  # fmt: skip
    try:
        started = subprocess.run(head, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        submit = [
            ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(job_dir),
            "--", "evomerge", "run", "configs/run.yaml", "--run-dir", str(run_dir), "--executor", "ray",
        ]  # fmt: skip
        job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
        output = (job.stdout + job.stderr)[-6000:]
        assert job.returncode == 0 and "succeeded" in output, output
        rows = assert_complete(run_dir, budget)
        assert all(r.worker.startswith("ray-") or r.worker == "cache" for r in rows)
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["executor"] == "ray"
    finally:
        _stop_head(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)
