"""The Ray actor pool on one local Ray session: concurrency, plugin failures, worker deaths, timeouts.

A fitness plugin (written into a temporary directory on the actors' PYTHONPATH) reads a mode file
on every call, so a test steers what the next evaluation does — score, raise, kill its worker,
hang — through files, never through sleeps. Every test is bounded: each pool has a per-candidate
timeout and short start-up deadlines.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import ray

from evomerge.plan import RunPlan
from evomerge.workers.jobs import BlockGrams
from evomerge.records import Candidate, Evaluation
from evomerge.config import RunConfig, WorkersConfig, load_config
from evomerge.errors import ConfigError, PluginError, UserError
from evomerge.executors import InlineExecutor, RayExecutor, WorkerError, make_executor
from evomerge.executors.ray import check_fits, pool_size, worker_gpus
from evomerge.workers.whitebox import WhiteBoxWorker

PLUGIN = "evomerge_ray_test_plugin"
START_LIMIT = 60.0  # seconds an actor may take to be placed, and to load, in these tests
SAFETY_TIMEOUT = "60s"  # per-candidate timeout, so that no test can hang

PLUGIN_SOURCE = '''
"""Fitness for the Ray executor tests: the file CONTROL/mode says what the next call does."""
import os
import time
from pathlib import Path

from evomerge.fitness.classification import classification_accuracy

CONTROL = Path({control!r})


def _until(condition, limit=30.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return False


def fitness(model, tokenizer, examples):
    mode_file = CONTROL / "mode"
    mode = mode_file.read_text().strip() if mode_file.exists() else "ok"
    if mode == "raise":
        raise RuntimeError("plugin refused this candidate")
    if mode == "shape":
        return [0.5]
    if mode == "die":
        os._exit(1)
    if mode == "die-once":
        try:
            (CONTROL / "token").unlink()  # exactly one call claims the token, and dies
        except FileNotFoundError:
            pass
        else:
            os._exit(1)
    if mode == "hang":
        _until(lambda: False, limit=120.0)
    if mode == "barrier":  # returns only once two workers are inside at the same time
        (CONTROL / f"arrived-{{os.getpid()}}").touch()
        if not _until(lambda: len(list(CONTROL.glob("arrived-*"))) >= 2):
            raise RuntimeError("no second worker arrived: evaluations did not overlap")
    return classification_accuracy(model, tokenizer, examples)
'''


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray-plugin")
    control = root / "control"
    control.mkdir()
    (root / f"{PLUGIN}.py").write_text(textwrap.dedent(PLUGIN_SOURCE.format(control=str(control))))
    return root


@pytest.fixture(scope="module")
def ray_session(plugin_dir):
    """One small local Ray for the module; its processes inherit PYTHONPATH, so actors find the plugin."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(plugin_dir), os.environ.get("PYTHONPATH")])))
        mp.syspath_prepend(str(plugin_dir))
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture
def control(plugin_dir, ray_session):
    """Set the plugin's mode; starts each test from 'ok' with no leftover flags."""
    folder = plugin_dir / "control"
    for path in folder.iterdir():
        path.unlink()

    def set_mode(mode: str) -> Path:
        (folder / "mode").write_text(mode)
        return folder

    return set_mode


@pytest.fixture
def pool_config(digits_config, data_file):
    """A ray-executor config scored by the test plugin; keyword arguments go into ``workers:``."""

    def make(fitness: str = f"{PLUGIN}:fitness", **workers) -> RunConfig:
        settings = {"count": 1, "cpus_per_worker": 0.5, "timeout": SAFETY_TIMEOUT,
                    "schedule_timeout": START_LIMIT, "load_timeout": START_LIMIT, **workers}
        fitness_section = {"name": fitness, "data": {"source": str(data_file)}}
        return load_config(digits_config(executor="ray", workers=settings, fitness=fitness_section))

    return make


_REFERENCE: dict[str, WhiteBoxWorker] = {}  # built by the first test that asks: digits_config is per test


@pytest.fixture
def reference(pool_config) -> WhiteBoxWorker:
    """The same models in this process, with the built-in fitness: what every actor must reproduce."""
    if "worker" not in _REFERENCE:
        _REFERENCE["worker"] = WhiteBoxWorker(RunPlan.from_config(pool_config(fitness="classification_accuracy")), worker_id="reference")
    return _REFERENCE["worker"]


def start_pool(config: RunConfig) -> RayExecutor:
    return RayExecutor(config)


def candidate(reference: WhiteBoxWorker, number: int, weight: float) -> Candidate:
    return Candidate(f"cma:{number}", "cma", np.full(reference.space.dim, weight))


def collect(executor, n: int) -> list[Evaluation]:
    """Wait until ``n`` evaluations came back (each ``wait`` is bounded by the pool's timeouts)."""
    out: list[Evaluation] = []
    while len(out) < n:
        got = executor.wait()
        assert got, "wait() returned nothing while candidates were in flight"
        out += got
    return out


def test_workers_section_defaults_durations_and_errors(digits_config):
    config = load_config(digits_config())
    assert config.executor == "inline"
    assert config.workers == WorkersConfig()
    assert (config.workers.count, config.workers.cpus_per_worker, config.workers.max_retries) == (None, 1.0, 2)
    config = load_config(digits_config(executor="ray", workers={"timeout": "1m30s", "address": "auto"}))
    assert (config.workers.timeout, config.workers.address) == (90.0, "auto")
    for workers, message in [
        ({"cpus": 2}, "workers.cpus: unknown key"),
        ({"count": 0}, "workers.count: Input should be greater than or equal to 1"),
        ({"timeout": "soon"}, "workers.timeout: 'soon' is not a duration"),
        ({"cpus_per_worker": 0}, "workers.cpus_per_worker: Input should be greater than 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(digits_config(workers=workers))
    with pytest.raises(ConfigError, match="executor: Input should be 'ray' or 'inline'"):
        load_config(digits_config(executor="threads"))


def test_pool_size_fills_the_cluster_and_refuses_what_cannot_fit():
    assert pool_size(WorkersConfig(), {"CPU": 8.0}) == 8
    assert pool_size(WorkersConfig(cpus_per_worker=0.5), {"CPU": 2.0}) == 4
    assert pool_size(WorkersConfig(cpus_per_worker=3), {"CPU": 8.0}) == 2
    assert pool_size(WorkersConfig(gpus_per_worker=0.5), {"CPU": 16.0, "GPU": 2.0}) == 4
    assert pool_size(WorkersConfig(count=3), {"CPU": 1.0}) == 3
    with pytest.raises(WorkerError, match="each worker needs 1 GPU but the Ray cluster has 0.*gpus_per_worker to 0"):
        pool_size(WorkersConfig(gpus_per_worker=1), {"CPU": 4.0})
    check_fits(WorkersConfig(), 2, {"CPU": 2.0})
    with pytest.raises(WorkerError, match="3 workers of 1 CPU each need 3 CPU, but this machine has 2"):
        check_fits(WorkersConfig(), 3, {"CPU": 2.0})
    with pytest.raises(WorkerError, match="need 2 GPU, but this machine has 1"):
        check_fits(WorkersConfig(gpus_per_worker=1), 2, {"CPU": 4.0, "GPU": 1.0})


def test_a_worker_spanning_devices_is_given_that_many_gpus():
    assert worker_gpus(WorkersConfig(gpus_per_worker=0.5)) == 0.5
    assert worker_gpus(WorkersConfig(), devices=4) == 4.0
    assert pool_size(WorkersConfig(), {"CPU": 16.0, "GPU": 8.0}, devices=4) == 2
    with pytest.raises(WorkerError, match="each worker needs 4 GPU but the Ray cluster has 2; lower models.devices"):
        pool_size(WorkersConfig(), {"CPU": 16.0, "GPU": 2.0}, devices=4)
    with pytest.raises(WorkerError, match="need 6 GPU, but this machine has 4; lower workers.count or models.devices"):
        check_fits(WorkersConfig(), 3, {"CPU": 16.0, "GPU": 4.0}, devices=2)


def test_make_executor_follows_config(digits_config):
    inline = make_executor(load_config(digits_config()))
    assert isinstance(inline, InlineExecutor)
    inline.shutdown()


def test_two_workers_score_concurrently_like_a_local_worker(pool_config, control, reference):
    config = pool_config(count=2)
    executor = make_executor(config)
    try:
        assert isinstance(executor, RayExecutor) and executor.capacity == 2
        edges, grams = executor.run_once(BlockGrams("rows"))  # through an actor, before any candidate
        expected_edges, expected_grams = reference.run(BlockGrams("rows"))
        np.testing.assert_array_equal(edges, expected_edges)
        np.testing.assert_allclose(grams, expected_grams)

        control("barrier")  # each evaluation waits until the other one is running too
        cands = [candidate(reference, 0, 0.3), candidate(reference, 1, 0.7)]
        for cand in cands:
            executor.submit(cand)
        assert executor.in_flight == 2
        results = {ev.candidate_id: ev for ev in collect(executor, 2)}
        assert executor.in_flight == 0
    finally:
        executor.shutdown()
    assert {ev.status for ev in results.values()} == {"ok"}, [ev.error for ev in results.values()]
    assert len({ev.worker for ev in results.values()}) == 2
    assert all(ev.worker.startswith("ray-") for ev in results.values())
    for cand in cands:
        local = reference.evaluate(cand)
        remote = results[cand.id]
        assert remote.fitness == local.fitness
        np.testing.assert_array_equal(remote.per_example, local.per_example)
        remote.per_example[0] = 0.0  # writable: a copy, not a view into Ray's object store


def test_plugin_exception_fails_the_candidate_and_wrong_shape_stops(pool_config, control, reference):
    executor = start_pool(pool_config())
    try:
        control("raise")
        executor.submit(candidate(reference, 0, 0.5))
        [failed] = collect(executor, 1)
        assert failed.status == "failed" and failed.fitness == -np.inf
        assert failed.error == "RuntimeError: plugin refused this candidate"
        assert failed.worker.startswith("ray-")

        control("ok")
        executor.submit(candidate(reference, 1, 0.5))
        [ok] = collect(executor, 1)
        assert ok.status == "ok" and ok.worker == failed.worker  # the same actor lives on

        control("shape")
        executor.submit(candidate(reference, 2, 0.5))
        with pytest.raises(PluginError, match=r"returned scores of shape \(1,\), expected \(400,\)") as err:
            executor.wait()
        assert type(err.value) is PluginError  # unwrapped from Ray's RayTaskError
    finally:
        executor.shutdown()


def test_plugin_that_cannot_import_stops_the_pool_at_start(pool_config, ray_session):
    with pytest.raises(PluginError, match="cannot import no_such_plugin_module"):
        start_pool(pool_config(fitness="no_such_plugin_module:fitness"))


def _oom_instead_of_death(real_get):
    """``ray.get`` as Ray answers for an actor its memory monitor killed: OutOfMemoryError, not
    ActorDiedError (a 1 B-parameter run on a machine short of memory stopped with that traceback)."""

    def get(*args, **kwargs):
        try:
            return real_get(*args, **kwargs)
        except ray.exceptions.ActorDiedError:
            raise ray.exceptions.OutOfMemoryError("1 worker(s) were killed due to the node running low on memory")

    return get


@pytest.mark.parametrize("killed_for_memory", [False, True], ids=["died", "killed-by-rays-memory-monitor"])
def test_dead_worker_is_replaced_and_its_candidate_retried(pool_config, control, reference, monkeypatch, killed_for_memory):
    executor = start_pool(pool_config(count=2))
    try:
        folder = control("die-once")
        (folder / "token").touch()
        if killed_for_memory:
            monkeypatch.setattr(ray, "get", _oom_instead_of_death(ray.get))
        cand = candidate(reference, 0, 0.4)
        executor.submit(cand)
        [ev] = collect(executor, 1)
        assert not (folder / "token").exists()  # one worker did die on it
        assert executor.capacity == 2 and executor.in_flight == 0
    finally:
        monkeypatch.undo()
        executor.shutdown()
    assert ev.status == "ok", ev.error
    assert ev.fitness == reference.evaluate(cand).fitness


def test_worker_killer_fails_after_max_retries_and_deaths_in_a_row_stop_the_run(pool_config, control, reference):
    executor = start_pool(pool_config(max_retries=1, max_worker_failures=3))
    try:
        control("die")
        executor.submit(candidate(reference, 0, 0.5))
        [ev] = collect(executor, 1)
        assert ev.status == "failed"
        assert ev.error.startswith("its worker died 2 times (workers.max_retries is 1); last: ActorDiedError")
        assert executor.capacity == 1 and executor.in_flight == 0

        executor.submit(candidate(reference, 1, 0.5))  # the third worker dies too: three deaths in a row
        with pytest.raises(WorkerError, match=r"workers keep dying: 3 deaths in a row .* last: ActorDiedError") as err:
            collect(executor, 1)
        assert isinstance(err.value, UserError)  # the CLI prints it and exits 2
    finally:
        executor.shutdown()


def test_timeout_fails_the_candidate_and_the_pool_keeps_its_capacity(pool_config, control, reference):
    executor = start_pool(pool_config(timeout="3s"))
    try:
        control("hang")
        executor.submit(candidate(reference, 0, 0.5))
        [ev] = collect(executor, 1)
        assert ev.status == "failed" and ev.error == "timed out after 3s"
        assert 3.0 <= ev.duration < 30.0

        control("ok")
        assert executor.capacity == 1 and executor.in_flight == 0
        executor.submit(candidate(reference, 1, 0.5))
        [ok] = collect(executor, 1)
        assert ok.status == "ok" and ok.worker != ev.worker  # a fresh actor took the hung one's place
    finally:
        executor.shutdown()


def test_cancel_kills_the_worker_of_a_hung_candidate_and_records_it_cancelled(pool_config, control, reference):
    executor = start_pool(pool_config())
    try:
        control("hang")
        executor.submit(candidate(reference, 0, 0.5))
        assert executor.wait(timeout=0.2) == [] and executor.in_flight == 1  # a bounded wait comes back empty
        [ev] = executor.cancel("cancelled: the run was stopped")
        assert (ev.candidate_id, ev.status, ev.error) == ("cma:0", "cancelled", "cancelled: the run was stopped")
        assert executor.in_flight == 0

        control("ok")
        executor.submit(candidate(reference, 1, 0.5))
        [ok] = collect(executor, 1)
        assert ok.status == "ok" and ok.worker != ev.worker  # a fresh actor took the cancelled one's place
    finally:
        executor.shutdown()


def test_workers_the_cluster_cannot_place_stop_with_a_clear_error(pool_config, ray_session):
    config = pool_config(fitness="classification_accuracy", count=1, cpus_per_worker=3, schedule_timeout="2s")
    with pytest.raises(WorkerError, match=r"only 0 of 1 workers could start within 2s: the cluster lacks CPUs/GPUs"):
        RayExecutor(config)  # the session has 2 CPUs
