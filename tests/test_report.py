"""`evomerge report`: every section from a short real run, in headless Chromium without console
errors, live while the run goes (served on 127.0.0.1), and after a resume."""

from __future__ import annotations

import io
import math
import os
import sys
import re
import shutil
import signal
import subprocess
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import evomerge
from evomerge.analysis import api_usage, archive_history, progress_curves, task_ratios
from evomerge.cli import main
from evomerge.records import Candidate, Evaluation, Status
from evomerge.report import SECTIONS, render_report
from evomerge.store import RunStore

SCREENSHOT = Path("/tmp/evomerge-report-screenshot.png")

# Scores like the built-in accuracy, but the 8th, 15th, 22nd … calls fail (every 7th after the base
# alone): the failures section has content.
FLAKY_PLUGIN = """
from evomerge.fitness.classification import classification_accuracy
CALLS = {"n": 0}

def flaky_accuracy(model, tokenizer, examples):
    CALLS["n"] += 1
    if CALLS["n"] % 7 == 1 and CALLS["n"] > 1:
        raise RuntimeError("pretend out of memory")
    return classification_accuracy(model, tokenizer, examples)
"""


def write_config(folder: Path, digit_models: dict[str, Path], data_file: Path, evaluations: int, fitness: str) -> Path:
    """Two populations (CMA-ES, M2N2 breeding the experts), experts scored first, inline executor."""
    data = {
        "name": "report-run",
        "seed": 0,
        "run_dir": str(folder / "run"),
        "executor": "inline",
        "score_experts": True,
        "models": {
            "base": str(digit_models["base"]),
            "experts": [{"path": str(digit_models["low"]), "name": "digits 0-4"}, {"path": str(digit_models["high"]), "name": "digits 5-9"}],
            "device": "cpu",
        },
        "merge": {"method": "task_arithmetic", "granularity": "per_layer_group", "search": ["weight"], "fixed": {"lambda": 1.0}},
        "populations": [
            {"name": "cma", "strategy": "cmaes"},
            {"name": "m2n2", "strategy": "m2n2", "options": {"archive": "seed_recipes", "split_grid": "elements", "archive_size": 4}},
        ],
        "fitness": {"name": fitness, "data": {"source": str(data_file), "limit": 200}},
        "budget": {"evaluations": evaluations},
        "checkpoint_every": 5,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digit_models, data_file) -> Path:
    folder = tmp_path_factory.mktemp("report-run")
    (folder / "flaky_fitness.py").write_text(textwrap.dedent(FLAKY_PLUGIN))
    sys.path.insert(0, str(folder))
    try:
        config = write_config(folder, digit_models, data_file, 24, "flaky_fitness:flaky_accuracy")
        assert main(["run", str(config)]) == 0
    finally:
        sys.path.remove(str(folder))
    return folder / "run"


def png_ok(data: bytes) -> bool:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    return image.width > 100 and image.height > 100 and float(np.asarray(image.convert("L")).std()) > 1.0


def test_report_has_every_section_and_plot(finished_run, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", str(finished_run), "--out", str(out)]) == 0
    page = out.read_text()
    for key in SECTIONS:
        assert f'<section id="{key}">' in page
    plots = sorted((tmp_path / "report-plots").glob("*.png"))
    assert {p.stem for p in plots} == {"progress", "archive", "recipe", "workers", "experts"}  # no usage: white-box
    assert all(p.stat().st_size > 0 and png_ok(p.read_bytes()) for p in plots)
    assert page.count("data:image/png;base64,") == len(plots)
    assert "pretend out of memory" in page and "RuntimeError" in page  # failures, with the traceback
    assert "not a black-box run" in page
    assert "expert digits 0-4" in page and "expert digits 5-9" in page and "best merge (" in page
    assert "base base" in page and "÷ expert digits 5-9" in page  # the per-task ratios
    assert 'http-equiv="refresh"' not in page  # only a live page reloads itself


def test_report_data_match_the_store(finished_run):
    frame = evomerge.load_run(finished_run)
    store = RunStore(finished_run, readonly=True)
    rows = list(store.evaluations())
    baselines = store.baselines()
    store.close()
    assert len(frame) == len(rows) == 24 and list(frame["candidate_id"]) == [r.candidate_id for r in rows]
    assert (frame["status"] == "failed").sum() == sum(r.status == "failed" for r in rows) > 0
    assert [(b["role"], b["name"]) for b in baselines] == [("base", "base"), ("expert", "digits 0-4"), ("expert", "digits 5-9")]
    history = archive_history(finished_run)
    m2n2 = frame[frame["population"] == "m2n2"]
    assert len(history) == len(m2n2)
    assert history["coverage"].between(0, 1).all() and (history["members"] <= 4).all()
    # the first two M2N2 candidates are the experts themselves: coverage of the two is the union
    low, high = (b["per_example"] for b in baselines[1:])
    assert m2n2.iloc[:2]["status"].eq("ok").all()  # the 8th, 15th … fitness calls fail, not these
    assert history["coverage"].iloc[1] == pytest.approx(np.mean(np.maximum(low, high) > 0))


def test_task_ratios_divide_the_best_merge_by_the_base_and_each_expert(finished_run):
    table = task_ratios(finished_run)
    store = RunStore(finished_run, readonly=True)
    best, baselines = store.best(), store.baselines()
    store.close()
    assert list(table.index) == ["fitness"]  # digits rows name no task
    assert table.loc["fitness", "best merge"] == pytest.approx(best.fitness)
    for b in baselines:
        assert table.loc["fitness", f"÷ {b['role']} {b['name']}"] == pytest.approx(best.fitness / b["fitness"])


def test_progress_curves_leave_out_evaluations_racing_stopped_early():
    """A partial mean (over 10 % of the examples) is not a full score: it never enters best or median."""
    frame = pd.DataFrame({
        "seq": [1, 2, 3, 4, 5],
        "population": ["cma"] * 5,
        "elapsed": [1.0, 2.0, 3.0, 4.0, 5.0],
        "fitness": [0.5, 0.9, 0.6, float("nan"), 0.1],
        "fidelity": [1.0, 0.1, 1.0, 1.0, 0.1],
    })
    curves = progress_curves(frame, window=3)
    assert list(curves["best"]) == [0.5, 0.5, 0.6, 0.6, 0.6]
    assert list(curves["median"]) == [0.5, 0.5, 0.55, 0.6, 0.6]
    assert list(curves["evaluation"]) == [1, 2, 3, 4, 5]  # still counted as evaluations


def test_api_usage_table_sums_black_box_metrics():
    frame = pd.DataFrame(
        {
            "population": ["a", "a", "b"],
            "usage.requests": [2, 3, 4],
            "usage.prompt_tokens": [10, 20, 30],
            "usage.completion_tokens": [1, 2, 3],
            "usage.cost": [0.5, 0.25, 1.0],
        }
    )
    table = api_usage(frame)
    assert table.loc["a", "requests"] == 5 and table.loc["total", "cost"] == 1.75
    assert api_usage(frame[["population"]]) is None


def chromium() -> str:
    """Debian's Chromium, installed on first use (as root); skips when it cannot be had."""
    binary = "/usr/lib/chromium/chromium"
    if not Path(binary).exists():
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            pytest.skip("Chromium is absent and cannot be installed here (needs apt-get as root)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                pytest.skip(f"could not install Chromium ({' '.join(cmd)}): {done.stderr.strip()[-300:]}")
    return binary


@pytest.mark.slow
def test_report_renders_in_chromium_without_console_errors(finished_run, tmp_path):
    binary = chromium()
    out = tmp_path / "report.html"
    assert main(["report", str(finished_run), "--out", str(out)]) == 0
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
            "--window-size=1280,2400", f"--screenshot={shot}", out.resolve().as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    assert png_ok(shot.read_bytes())
    shutil.copyfile(shot, SCREENSHOT)


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read().decode("utf-8")


def test_report_served_live_while_the_run_goes(tmp_path, digit_models, data_file):
    from evomerge.config import load_config
    from evomerge.report.serve import ReportServer
    from evomerge.runs import start_run

    config_path = write_config(tmp_path, digit_models, data_file, 16, "classification_accuracy")
    run_dir = tmp_path / "run"
    seen: dict[int, str] = {}
    servers: list[ReportServer] = []

    def watch(progress) -> None:  # called by the controller after each evaluation
        if progress.evaluations in (6, 12) and progress.evaluations not in seen:
            if not servers:
                servers.append(ReportServer(run_dir, tmp_path / "live.html", port=0).start())
            seen[progress.evaluations] = fetch(servers[0].url)

    start_run(load_config(config_path), str(config_path), on_progress=watch)
    server = servers[0]
    try:
        final = fetch(server.url)
        assert fetch(server.url) == final and server.renders == 3  # unchanged run: no new rendering
    finally:
        server.stop()
    for count, page in seen.items():
        assert ">running<" in page and 'http-equiv="refresh"' in page
        assert f"{count} evaluations" in page
        assert all(f'<section id="{key}">' in page for key in SECTIONS)
    assert ">finished<" in final and "16 evaluations" in final and 'http-equiv="refresh"' not in final
    assert (tmp_path / "live.html").read_text() == final


def test_report_of_a_resumed_run(tmp_path, digit_models, data_file, monkeypatch):
    import evomerge.workers.whitebox as local

    original = local.WhiteBoxWorker.evaluate
    calls = {"n": 0}

    def interrupt_once(self, candidate):
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, candidate)

    monkeypatch.setattr(local.WhiteBoxWorker, "evaluate", interrupt_once)
    config = write_config(tmp_path, digit_models, data_file, 14, "classification_accuracy")
    run_dir = tmp_path / "run"
    assert main(["run", str(config)]) == 0
    assert RunStore(run_dir, readonly=True).run_info()["state"] == "interrupted"
    assert main(["resume", str(run_dir)]) == 0
    page = render_report(run_dir).html
    assert re.search(r"resumed 1×", page) and "14 evaluations" in page and ">finished<" in page
    store = RunStore(run_dir, readonly=True)
    assert [b["name"] for b in store.baselines()] == ["base", "digits 0-4", "digits 5-9"]  # scored once, kept
    store.close()
    assert len(archive_history(run_dir)) == 7


# --- odd run directories, written through the store as the controller writes them -------------
def write_store(run_dir: Path, config_path: Path, populations: list[str], rows: list[tuple], state: str = "finished") -> Path:
    """A run of ``populations`` (CMA-ES) with ``rows`` = (population, scores or None for a failure,
    metrics[, error]) recorded in order; genomes are valid points of the digits run's space."""
    data = yaml.safe_load(config_path.read_text())
    data.update(run_dir=str(run_dir), populations=[{"name": p, "strategy": "cmaes"} for p in populations], budget={"evaluations": 50})
    store = RunStore(run_dir, create=True)
    store.init_run(run_dir.name, yaml.safe_dump(data), data["budget"])
    for population in populations:
        store.add_population(population, "cmaes", None, {"dim": 4})
    rng = np.random.default_rng(0)
    for i, (population, scores, metrics, *error) in enumerate(rows):
        candidate = Candidate(f"{population}:{i}", population, rng.uniform(size=4))
        store.add_candidate(candidate, asked_after=i)
        failed = scores is None
        store.add_evaluation(Evaluation(
            candidate.id, Status.FAILED if failed else Status.OK, -math.inf if failed else float(np.mean(scores)),
            None if failed else np.asarray(scores, dtype=float), metrics, "w0", 1000.0 + i, 0.5,
            (error or ["RuntimeError: pretend out of memory"])[0] if failed else None, population,
        ))
    store.set_state(state, {"stop_reason": "budget exhausted"})
    store.close()
    return run_dir


@pytest.fixture(scope="module")
def odd_runs(tmp_path_factory, digit_models, data_file) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("odd-runs")
    config = write_config(folder, digit_models, data_file, 50, "classification_accuracy")
    flat = [0.5] * 8  # every example the same score: zero variance
    mixed = []
    for i in range(12):  # "never" always fails; "cma" fails every third; per-task metrics on some only
        scores = None if i % 3 == 0 else [float((i + k) % 2) for k in range(8)]
        mixed += [("cma", scores, {"per_task": {"a": 0.5}} if i % 2 else {}), ("never", None, {})]
    return {
        "empty": write_store(folder / "empty", config, ["cma", "m2n2"], [], state="interrupted"),
        "all_failed": write_store(folder / "all_failed", config, ["cma"], [("cma", None, {})] * 3),
        "one": write_store(folder / "one", config, ["cma"], [("cma", flat, {})]),
        "mixed": write_store(folder / "mixed", config, ["cma", "never"], mixed),
        "many_reasons": write_store(folder / "many_reasons", config, ["cma"], [
            ("cma", None, {"traceback": f"Traceback …\nOSError: {i}"}, f"OSError: {i}") for i in range(25)
        ] + [("cma", flat, {})]),
        "five": write_store(folder / "five", config, [f"p{i}" for i in range(5)], [(f"p{i % 5}", flat, {}) for i in range(10)]),
    }


def sections(page: str) -> dict[str, str]:
    return {key: re.search(f'<section id="{key}">(.*?)</section>', page, re.S).group(1) for key in SECTIONS}


def test_report_of_a_run_without_any_evaluation(odd_runs, tmp_path):
    """Stopped before its first evaluation was recorded: every section says so, no traceback."""
    out = tmp_path / "r.html"
    assert main(["report", str(odd_runs["empty"]), "--out", str(out)]) == 0
    found = sections(out.read_text())
    assert "no evaluation recorded: nothing to show" in found["progress"] and "<img" not in found["progress"]
    assert "no evaluation recorded" in found["recipe"]
    frame = evomerge.load_run(odd_runs["empty"], per_example=True)
    assert frame.empty and {"fitness", "fidelity", "per_example"} <= set(frame.columns)


def test_report_of_a_run_whose_every_candidate_failed(odd_runs):
    found = sections(render_report(odd_runs["all_failed"]).html)
    for key in ("progress", "recipe"):
        assert "all 3 evaluations failed (see Failures): nothing to show" in found[key] and "yet" not in found[key]
    assert "pretend out of memory" in found["failures"]


def test_report_of_a_single_evaluation_draws_it(odd_runs):
    """A line through one point draws nothing: the point is marked, on an integer axis."""
    from PIL import Image

    from evomerge.report import figures

    def curve_pixels(png: bytes) -> int:  # pixels in the first population's colour (C0)
        rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
        return int((np.abs(rgb - [31, 119, 180]).sum(axis=2) < 60).sum())

    curves = progress_curves(evomerge.load_run(odd_runs["one"]))
    legend_only = curves.assign(best=np.nan, median=np.nan)  # the same axes and legend, no value drawn
    assert curve_pixels(figures.progress(curves)) > curve_pixels(figures.progress(legend_only)) + 50
    assert png_ok(render_report(odd_runs["five"]).plots["progress"])


def test_report_leaves_out_a_population_that_never_succeeded_and_says_so(odd_runs):
    frame = evomerge.load_run(odd_runs["mixed"])
    assert frame.loc[frame["status"] == "failed", "fitness"].isna().all()  # -inf is no fitness to plot
    curves = progress_curves(frame)
    assert np.isfinite(curves["best"].dropna()).all() and curves.loc[curves["population"] == "never", "best"].isna().all()
    assert curves.loc[curves["population"] == "cma", "best"].iloc[0] != curves.loc[curves["population"] == "cma", "best"].iloc[0]  # NaN until one succeeds
    found = sections(render_report(odd_runs["mixed"]).html)
    assert "Not drawn, no fully scored evaluation: never." in found["progress"] and "<img" in found["progress"]
    assert task_ratios(odd_runs["mixed"]).empty  # no baselines scored: no ratios, whatever per_task holds


def test_report_lists_the_most_frequent_failure_reasons_and_counts_the_rest(odd_runs):
    """A run whose errors all differ would make a page of megabytes: 20 reasons, then a count."""
    from evomerge.report.document import FAILURE_REASONS

    found = sections(render_report(odd_runs["many_reasons"]).html)["failures"]
    assert found.count("<details>") == FAILURE_REASONS == 20
    assert "and 5 more reasons (5 failed evaluations)" in found


def test_report_and_load_run_read_while_the_writer_holds_the_run_and_leave_it_writable(odd_runs, tmp_path):
    run_dir = Path(shutil.copytree(odd_runs["one"], tmp_path / "run"))
    writer = RunStore(run_dir)  # the run directory's one writer (run.lock)
    try:
        writer.set_state("running")
        writer._db.execute("BEGIN IMMEDIATE")  # in the middle of recording an evaluation
        writer._db.execute("INSERT INTO events (time, kind, message) VALUES (0, 'x', 'y')")
        page = render_report(run_dir, live=True).html
        assert ">running<" in page and 'http-equiv="refresh"' in page and "1 evaluations" in page
        assert len(evomerge.load_run(run_dir, per_example=True)) == 1
        writer._db.execute("COMMIT")
        candidate = Candidate("cma:1", "cma", np.full(4, 0.5))
        writer.add_candidate(candidate, asked_after=1)  # the readers held no lock: the writer goes on
        writer.add_evaluation(Evaluation(candidate.id, Status.OK, 0.25, np.full(8, 0.25), population="cma"))
        assert len(evomerge.load_run(run_dir)) == 2
    finally:
        writer.close()
