"""Black-box runs end to end against the reference service on loopback: Evo-Merging (two-stage)
and M2N2 over per-adapter α/β beat the uniform composition on held-out examples of the target
skill; runtime LoRA; request budgets; cached answers; a service killed and restarted mid-run;
the API key nowhere in the run directory."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from evomerge.plan import RunPlan
from evomerge.records import Candidate
from evomerge.config import config_from_dict
from evomerge.errors import RunDirError
from evomerge.models.zoo.tiny_lm import skill_examples
from evomerge.runs import start_run
from evomerge.store import RunStore
from evomerge.workers.blackbox import BlackBoxWorker, ServiceUnreachable
from evomerge.workers.jobs import SeedResponses

KEY_ENV = "EVOMERGE_TEST_API_KEY"
EXPERTS = ["addition", "reversal", "subtraction"]
USAGE_KEYS = {"requests", "prompt_tokens", "completion_tokens", "cost"}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "target": r["target"]}) + "\n" for r in rows))
    return path


@pytest.fixture
def make_config(tmp_path, monkeypatch, auth):
    """A black-box config over the three skill adapters, scoring addition; overrides by section.
    The service's bearer token doubles as the run's API key."""
    key = auth["Authorization"].removeprefix("Bearer ")
    monkeypatch.setenv(KEY_ENV, key)
    train = write_rows(tmp_path / "train.jsonl", skill_examples("addition", 16, seed=11))
    test = write_rows(tmp_path / "test.jsonl", skill_examples("addition", 32, seed=12))

    def make(url: str, **overrides):
        data = {
            "name": "blackbox",
            "seed": 0,
            "run_dir": str(tmp_path / "run"),
            "executor": "inline",
            "models": {"base": "tiny-base", "experts": list(EXPERTS)},
            "merge": {"method": "lora_compose", "granularity": "per_model"},
            "populations": [{"name": "random", "strategy": "random"}],
            "fitness": {
                "name": "negative_cross_entropy",
                "data": {"source": str(train)},
                "test_data": {"source": str(test)},
            },
            "budget": {"evaluations": 6},
            "checkpoint_every": 5,
            "api": {"level": "merge_service", "base_url": url, "api_key_env": KEY_ENV, "concurrency": 8,
                    "price": {"prompt_token": 0.001, "completion_token": 0.002}},
        }
        for section, value in overrides.items():
            data[section] = {**data.get(section, {}), **value} if isinstance(value, dict) else value
        return config_from_dict(data, "test-config", tmp_path)

    return make, key


def held_out(config, genome) -> float:
    worker = BlackBoxWorker(RunPlan.from_config(config), "held-out")
    try:
        ev = worker.score_on(config.fitness.test_data, Candidate("held-out", config.populations[0].name, genome))
    finally:
        worker.close()
    assert ev.status == "ok", ev.error
    return ev.fitness


def test_evo_merging_and_m2n2_beat_the_uniform_composition(service, make_config):
    make, key = make_config
    config = make(service, populations=[
        {"name": "evo", "strategy": "evo_merging", "share": 7,
         "options": {"popsize": 6, "stage1_budget": 12, "stage2_budget": 30, "stage2_sigma": 0.3}},
        {"name": "m2n2", "strategy": "m2n2", "share": 5, "options": {"archive_size": 6}},
    ], budget={"evaluations": 72})
    summary = start_run(config, "test-config")
    assert summary["evaluations"] == 72

    store = RunStore(config.run_path(), readonly=True)
    rows = list(store.evaluations())
    bests = {name: store.best(name) for name in ("evo", "m2n2")}
    recorded = store.api_responses()
    store.close()
    assert all(r.status == "ok" for r in rows), [r.error for r in rows if r.status != "ok"]
    for r in rows:
        assert set(r.metrics["usage"]) == USAGE_KEYS
        assert r.metrics["usage"]["requests"] >= 16 or r.metrics.get("cached_from")
        assert r.metrics["usage"]["cost"] == pytest.approx(0.001 * r.metrics["usage"]["prompt_tokens"]
                                                           + 0.002 * r.metrics["usage"]["completion_tokens"])

    space = RunPlan.from_config(config).space([])
    uniform = held_out(config, space.encode({"alpha": 1.0, "beta": 1 / len(EXPERTS)}))
    for name, best in bests.items():
        assert held_out(config, best.genome) > uniform, name

    worker = BlackBoxWorker(RunPlan.from_config(config), "again")  # a repeated candidate: the controller recorded every answer
    worker.run(SeedResponses(recorded))
    again = worker.evaluate(Candidate("evo:again", "evo", bests["evo"].genome))
    worker.close()
    assert again.fitness == pytest.approx(bests["evo"].fitness, abs=1e-6)
    assert again.metrics["usage"]["requests"] == 0 and again.metrics["cached_responses"] == 16

    for path in config.run_path().rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


def test_the_base_alone_is_the_served_base_beside_each_expert(service, make_config):
    make, _ = make_config
    config = make(service)
    worker = BlackBoxWorker(RunPlan.from_config(config), "references")
    base, *experts = worker.expert_baselines()  # merge_service: every β 0 is the base itself
    worker.close()
    assert [(b.candidate_id, b.metrics["baseline"]) for b in (base, *experts)] == [
        ("tiny-base", "base"), *((e, "expert") for e in EXPERTS)
    ]
    plain = make(service, merge={"method": "linear", "granularity": "per_model"}, api={"level": "openai"},
                 models={"experts": ["tiny-base", "addition"]})
    worker = BlackBoxWorker(RunPlan.from_config(plain), "plain")
    served = worker.evaluate(Candidate("plain", plain.populations[0].name, worker.space.encode({"weight": [1.0, 0.0]})))
    worker.close()
    assert base.fitness == pytest.approx(served.fitness, abs=1e-4)
    assert base.fitness < experts[0].fitness  # the addition adapter knows the skill scored, the base does not


def test_runtime_lora_level_loads_each_merge_and_unloads_it(service, make_config, tiny_models):
    make, _ = make_config
    adapters = tiny_models["adapters"]
    config = make(service, models={"base": "tiny-base", "experts": [str(adapters / e) for e in EXPERTS]},
                  api={"level": "runtime_lora", "adapter_dir": str(adapters / "runtime")}, budget={"evaluations": 3})
    summary = start_run(config, "test-config")
    store = RunStore(config.run_path(), readonly=True)
    rows = list(store.evaluations())
    store.close()
    assert summary["evaluations"] == 3 and all(r.status == "ok" for r in rows), [r.error for r in rows]
    assert list((adapters / "runtime").iterdir()) == []  # every merge was unloaded and removed

    merged = make(service, run_dir=str(config.run_path()) + "-merge-service")  # the same merges, merged server-side
    worker = BlackBoxWorker(RunPlan.from_config(merged), "compare")
    ev = worker.evaluate(Candidate("x", rows[0].population, rows[0].genome))
    worker.close()
    assert ev.fitness == pytest.approx(rows[0].fitness, abs=1e-4)


def test_a_request_budget_stops_the_run_cleanly(service, make_config):
    make, _ = make_config
    config = make(service, budget={"evaluations": 50, "requests": 40})
    summary = start_run(config, "test-config")
    assert summary["stop_reason"].startswith("requests budget reached")
    store = RunStore(config.run_path(), readonly=True)
    used = store.api_usage()
    state = store.run_info()["state"]
    store.close()
    assert 40 <= used["requests"] < 40 + 16 and summary["evaluations"] == 3
    assert state == "finished"


def test_report_and_export_of_a_black_box_run(service, make_config, tmp_path, capsys):
    """The report places the recipe on the experts without any model on this machine; export,
    which would need them, says so in one line."""
    from evomerge.cli import main
    from evomerge.report import render_report

    make, _ = make_config
    config = make(service, budget={"evaluations": 3})
    start_run(config, "test-config")
    report = render_report(config.run_path())
    assert {"progress", "recipe", "usage"} <= set(report.plots)
    assert main(["export", str(config.run_path()), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "is a black-box run, merged by its service" in err and "`evomerge report" in err and "Traceback" not in err


def test_racing_screens_black_box_candidates_and_survivors_score_as_without_it(service, make_config):
    """Stopped candidates pay for their stages' requests only; a survivor's last call asks only for
    the examples its stages left, and it scores exactly what a run without racing scores."""
    make, _ = make_config
    racing = {"stages": [0.25, 0.5], "z": 2.0, "top_k": 1, "seed": 0, "scores": None}  # cross-entropy: unbounded
    config = make(service, fitness={"racing": racing}, budget={"evaluations": 10})
    assert start_run(config, "test-config")["evaluations"] == 10
    store = RunStore(config.run_path(), readonly=True)
    rows = list(store.evaluations(with_scores=True))
    store.close()
    assert all(r.status == "ok" for r in rows), [r.error for r in rows]
    first, stopped = rows[0], [r for r in rows if r.fidelity < 1.0]
    full = [r for r in rows if r.fidelity == 1.0]
    one_call = first.metrics["usage"]["requests"]  # no threshold yet: one call, a request per example and the setup
    assert first.fidelity == 1.0 and first.metrics["examples_scored"] == 16
    # Screened or not, a fully scored candidate asked for each example once; a survivor of both
    # stages made three calls, each setting the merge up on the service again.
    assert all(r.metrics["examples_scored"] == 16 for r in full)
    survivors = [r for r in full if r.metrics["usage"]["requests"] == one_call + 2]
    assert survivors and len(survivors) + sum(r.metrics["usage"]["requests"] == one_call for r in full) == len(full)
    assert stopped and all(r.metrics["examples_scored"] in (4, 8) for r in stopped)
    assert all(r.metrics["usage"]["requests"] < one_call for r in stopped)
    plain = BlackBoxWorker(RunPlan.from_config(make(service, run_dir=str(config.run_path()) + "-plain")), "plain")
    try:
        for r in survivors:
            again = plain.evaluate(Candidate(r.candidate_id, r.population, r.genome))
            assert again.fitness == pytest.approx(r.fitness, abs=1e-6) and again.fidelity == 1.0
            np.testing.assert_allclose(again.per_example, r.per_example, atol=1e-6)
    finally:
        plain.close()


def test_an_unreachable_service_is_a_user_error_naming_the_setting(make_config):
    make, _ = make_config
    config = make("http://127.0.0.1:9", api={"max_retries": 0})
    with pytest.raises(ServiceUnreachable, match="api.base_url"):
        start_run(config, "test-config")


@pytest.mark.slow
def test_a_service_killed_and_restarted_mid_run_loses_nothing(tiny_models, start_service, make_config):
    make, _ = make_config
    with start_service(tiny_models["base"], tiny_models["adapters"]) as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        config = make(url, budget={"evaluations": 20}, api={"max_retries": 80, "backoff": 0.2, "max_backoff": 1.0})
        outcome: dict = {}
        runner = threading.Thread(target=lambda: outcome.update(summary=start_run(config, "test-config")))
        runner.start()
        _wait_for_evaluations(config.run_path(), 3, runner)
        proc.kill()
        proc.wait()
        with start_service(tiny_models["base"], tiny_models["adapters"], port=port):
            runner.join(timeout=300)
    assert not runner.is_alive()
    store = RunStore(config.run_path(), readonly=True)
    rows = list(store.evaluations())
    store.close()
    assert outcome["summary"]["evaluations"] == 20 == len(rows)
    assert all(r.status == "ok" for r in rows), [r.error for r in rows if r.status != "ok"]
    assert sum(r.metrics["api_retries"] for r in rows) > 0  # the outage was ridden out by retrying


def test_a_service_that_stays_down_stops_the_run_resumably(tiny_models, start_service, make_config):
    from evomerge.workers.blackbox import OUTAGE_CANDIDATES

    make, _ = make_config
    errors: list[Exception] = []
    with start_service(tiny_models["base"], tiny_models["adapters"]) as (url, proc):
        config = make(url, budget={"evaluations": 50}, api={"max_retries": 1, "backoff": 0.05, "max_backoff": 0.1})

        def run() -> None:
            try:
                start_run(config, "test-config")
            except ServiceUnreachable as exc:
                errors.append(exc)

        runner = threading.Thread(target=run)
        runner.start()
        _wait_for_evaluations(config.run_path(), 2, runner)
        proc.kill()
        proc.wait()
        runner.join(timeout=120)
    assert not runner.is_alive()
    assert errors and "stopped answering" in str(errors[0]) and "resume" in str(errors[0])
    store = RunStore(config.run_path(), readonly=True)
    state = store.run_info()["state"]
    failed = [r for r in store.evaluations() if r.status == "failed"]
    store.close()
    assert state == "failed"  # evomerge resume continues it
    assert len(failed) == OUTAGE_CANDIDATES  # each recorded with the requests it paid for


def _wait_for_evaluations(run_dir: Path, n: int, runner: threading.Thread) -> None:
    """Until the run has recorded ``n`` evaluations (bounded; the run must still be going)."""
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and runner.is_alive():
        if (run_dir / "run.db").exists():
            try:
                store = RunStore(run_dir, readonly=True)
            except RunDirError:  # created a moment ago: its schema is not committed yet
                time.sleep(0.05)
                continue
            try:
                if store.evaluation_counts().get("random", (0, 0))[1] >= n:
                    return
            finally:
                store.close()
        time.sleep(0.05)
    raise AssertionError(f"the run did not record {n} evaluations while the service was up")


def test_plain_served_models_are_mixed_at_the_output_and_each_asked_once(service, make_config):
    make, _ = make_config
    config = make(service, merge={"method": "linear", "granularity": "per_model"}, api={"level": "openai"},
                  budget={"evaluations": 4})
    start_run(config, "test-config")
    store = RunStore(config.run_path(), readonly=True)
    rows = list(store.evaluations())
    baselines = {b["name"]: b["fitness"] for b in store.baselines()}
    store.close()
    assert all(r.status == "ok" for r in rows), [r.error for r in rows]
    assert all(r.metrics["usage"]["requests"] == 0 for r in rows)  # the experts alone asked everything once
    assert max(baselines, key=baselines.get) == "addition"
    worker = BlackBoxWorker(RunPlan.from_config(config), "one-hot")
    space = worker.space
    population = config.populations[0].name
    alone = worker.evaluate(Candidate("alone", population, space.encode({"weight": [1.0, 0.0, 0.0]})))
    mixed = worker.evaluate(Candidate("mixed", population, space.encode({"weight": [0.5, 0.5, 0.0]})))
    worker.close()
    assert alone.fitness == pytest.approx(baselines["addition"], abs=1e-6)
    assert baselines["reversal"] < mixed.fitness < alone.fitness  # a mixture lies between its parts


CRASHING_FITNESS = '''
import os
from pathlib import Path

from evomerge.fitness.blackbox import negative_cross_entropy

calls = 0


async def crash_once(model, examples):
    """negative_cross_entropy that kills its process once, after its answers came in (call 5:
    the three experts alone, then the second candidate)."""
    global calls
    scores = await negative_cross_entropy(model, examples)
    calls += 1
    marker = Path(os.environ["CRASH_MARKER"])
    if calls == 5 and not marker.exists():
        marker.write_text("crashed")
        os._exit(1)
    return scores
'''


def test_a_run_killed_mid_candidate_resumes_from_recorded_answers(service, make_config, tmp_path):
    """Answers reach the run store with the evaluation that brought them (workers never write it),
    and a resumed run's workers start from every answer recorded: over plain served models the
    experts alone asked for every answer once, so the candidate scored again after the crash, on
    a fresh worker, asks the service nothing."""
    import os
    import subprocess
    import sys

    import yaml

    make, key = make_config
    (tmp_path / "crash_plugin.py").write_text(CRASHING_FITNESS)
    config = make(service, fitness={"name": "crash_plugin:crash_once"}, api={"level": "openai"},
                  merge={"method": "linear", "granularity": "per_model"})
    config_path = tmp_path / "blackbox.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CRASH_MARKER": str(tmp_path / "crashed"), KEY_ENV: key}
    cli = [sys.executable, "-m", "evomerge.cli"]
    first = subprocess.run([*cli, "run", str(config_path)], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1 and (tmp_path / "crashed").exists(), first.stderr[-2000:]
    second = subprocess.run([*cli, "resume", str(config.run_path())], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    store = RunStore(config.run_path(), readonly=True)
    rows = {r.candidate_id: r for r in store.evaluations()}
    store.close()
    assert len(rows) == 6 and all(r.status == "ok" for r in rows.values())
    assert all(r.metrics["usage"]["requests"] == 0 for r in rows.values())
    resumed = rows["random:1"]  # in flight when the process died: scored again from the recorded answers
    assert resumed.metrics["cached_responses"] == 16 * len(EXPERTS)


def test_black_box_workers_run_in_the_ray_pool(service, make_config):
    import ray

    make, _ = make_config
    config = make(service, executor="ray", workers={"count": 2, "cpus_per_worker": 0.5}, budget={"evaluations": 4})
    assert not ray.is_initialized()  # the executor starts Ray here, so its workers see the API key's variable
    summary = start_run(config, "test-config")
    store = RunStore(config.run_path(), readonly=True)
    rows = list(store.evaluations())
    store.close()
    assert summary["evaluations"] == 4 and all(r.status == "ok" for r in rows), [r.error for r in rows]
    assert all(r.worker.startswith("ray-") for r in rows)
    assert all(r.metrics["usage"]["requests"] >= 16 for r in rows)


def test_lm_eval_tasks_score_black_box_candidates_through_the_client(service, make_config):
    from evomerge.testing.harness_tasks import tiny_harness_options

    fitness = {"name": "lm_eval", "options": tiny_harness_options(), "data": None, "test_data": None}
    make, _ = make_config
    worker = BlackBoxWorker(RunPlan.from_config(make(service, fitness=fitness)), "lm-eval")
    try:
        candidate = Candidate("c0", "random", np.linspace(0.2, 0.8, worker.space.dim))
        first, again = worker.evaluate(candidate), worker.evaluate(candidate)
    finally:
        worker.close()
    assert first.status == "ok", first.error
    assert first.per_example.shape == (100,) and first.metrics["usage"]["requests"] > 0
    assert again.metrics["usage"]["requests"] == 0  # every answer from the response cache of this merge
    np.testing.assert_array_equal(first.per_example, again.per_example)
