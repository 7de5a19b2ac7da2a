"""The progress display of ``evomerge run``: phases before the search, 80 columns, populations."""

from __future__ import annotations

import json

from rich.console import Console

from evomerge.cli import _progress_display, main
from evomerge.controller import Progress


def rendered(progress) -> list[str]:
    console = progress.console
    console.print(progress.get_renderable())
    return console.export_text().splitlines()


def display():
    return _progress_display(Console(width=80, record=True, force_terminal=True, color_system=None))


def test_phases_before_the_search_say_what_the_run_is_doing():
    progress, update, phase = display()
    phase("starting Ray (16 CPUs)")
    [line] = rendered(progress)
    assert line.startswith("starting Ray (16 CPUs)") and "0/?" in line
    phase("loading models on 16 workers")
    assert rendered(progress)[0].startswith("loading models on 16 workers")


def test_one_population_fits_80_columns_on_one_line():
    progress, update, _ = display()
    update(Progress(1000, 1000, -0.12345, 3725.0, 3725.0, {"cma": -0.12345}, 16, 16))
    [line] = rendered(progress)
    assert len(line) <= 80
    for part in ("searching", "1000/1000", "best -0.1235", "workers 16/16", "1:02:05", "left 1:02:05"):
        assert part in line


def test_five_populations_keep_the_line_and_list_their_bests_below_it():
    progress, update, _ = display()
    bests = {f"population-{i}": 0.5 + i / 10 for i in range(4)} | {"late": None}
    update(Progress(12, 50, 0.8, 64.0, 200.0, bests, 2, 2))
    lines = rendered(progress)
    assert len(lines) == 2 and all(len(line) <= 80 for line in lines)
    assert "best 0.8000" in lines[0] and "1:04" in lines[0] and "left 3:20" in lines[0]
    assert lines[1].startswith("  population-0 0.5000  population-1 0.6000")
    assert lines[1].endswith("…")  # cut to the terminal's width, not wrapped


def test_summary_and_status_report_search_and_wall_time_alike(tmp_path, digits_config, capsys):
    run_dir = tmp_path / "r"
    assert main(["run", str(digits_config(budget={"evaluations": 4})), "--run-dir", str(run_dir)]) == 0
    summary_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["status", str(run_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    stored = status["search_seconds"], status["wall_seconds"]
    assert 0 < stored[0] <= stored[1]
    assert f"search {status['search_seconds']:.1f}s, wall " in summary_line
    from evomerge.store import RunStore

    store = RunStore(run_dir, readonly=True)
    summary = store.run_info()["summary"]
    store.close()
    assert summary["search_seconds"] == status["search_seconds"]
    assert abs(summary["wall_seconds"] - status["wall_seconds"]) < 1.0
    assert "elapsed_seconds" not in summary and "elapsed_seconds" not in status


def test_a_run_names_its_phases_before_the_search(tmp_path, digits_config):
    from evomerge.config import load_config
    from evomerge.runs import start_run

    phases: list[str] = []
    config = load_config(digits_config(budget={"evaluations": 1}, score_experts=True))
    start_run(config, "config.yaml", tmp_path / "r", on_phase=phases.append)
    assert len(phases) == 2 and phases[1] == "scoring the experts"
    assert phases[0].startswith("loading models (memory tier device: the working model on cpu, 2 experts")
