"""The embedded demo: the searched merge beats each expert and their uniform average on the test set."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from evomerge.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_demo_merge_beats_experts_and_uniform_average(tmp_path, capsys):
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["run_dir"] = str(tmp_path / "run")
    config["models"]["base"] = str(tmp_path / "models" / "base")
    for expert in config["models"]["experts"]:
        expert["path"] = str(tmp_path / "models" / Path(expert["path"]).name)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))

    assert main(["demo", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    rows = dict(
        (name.strip(), float(acc)) for name, acc in re.findall(r"│\s*([^│]+?)\s*│\s*([0-9.]+)\s*│", out)
    )
    experts = [v for k, v in rows.items() if k.startswith("expert")]
    assert len(experts) == 2
    assert all(0.3 < e < 0.6 for e in experts), "each specialist knows about half the digits"
    searched = {k: v for k, v in rows.items() if k.startswith("searched merge")}
    assert set(searched) == {"searched merge (cmaes)", "searched merge (m2n2)"}
    assert all(v > max(experts) for v in searched.values()), "every population beats each expert"
    assert max(searched.values()) > rows["uniform average"]
    assert str(tmp_path / "run") in out
    assert (tmp_path / "run" / "run.db").exists()

    # Safe to run again: experts are reused, the demo's run directory is replaced.
    assert main(["demo", "--config", str(path)]) == 0
