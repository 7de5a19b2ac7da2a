"""The tiny-LM demo: a searched merge of an addition and a reversal specialist beats each of them."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from evomerge.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_lm_demo_merge_beats_each_specialist_on_the_mixed_test_set(tmp_path, capsys):
    config = yaml.safe_load((REPO / "configs" / "demo-lm.yaml").read_text())
    models = tmp_path / "models"
    config["run_dir"] = str(tmp_path / "run")
    config["models"]["base"] = str(models / "base")
    for expert in config["models"]["experts"]:
        expert["path"] = str(models / Path(expert["path"]).name)
    config["fitness"]["data"]["source"] = str(models / "data" / "fitness.jsonl")
    config["fitness"]["test_data"]["source"] = str(models / "data" / "test.jsonl")
    config["executor"] = "inline"  # the Ray path of the same search is covered by the Ray tests
    config["budget"] = {"evaluations": 60}
    path = tmp_path / "demo-lm.yaml"
    path.write_text(yaml.safe_dump(config))

    assert main(["demo", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    rows = {name.strip(): float(score) for name, score in re.findall(r"│\s*([^│]+?)\s*│\s*([0-9.]+)\s*│", out)}
    specialists = [v for k, v in rows.items() if k.startswith("specialist")]
    assert len(specialists) == 2
    searched = [v for k, v in rows.items() if k.startswith("searched merge")]
    assert len(searched) == 2
    assert max(searched) > max(specialists), rows
    assert rows["base (before fine-tuning)"] < min(specialists), "fine-tuning taught each specialist its skill"
    for name in ("base", "addition", "reversal"):
        assert (models / name / "model.safetensors").exists() and (models / name / "tokenizer.json").exists()


def test_demo_refuses_a_config_that_is_not_a_shipped_demo(tmp_path, capsys):
    config = yaml.safe_load((REPO / "configs" / "demo-lm.yaml").read_text())
    config["name"] = "my-merge"
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["demo", "--config", str(path)]) == 2
    assert "evomerge run" in capsys.readouterr().err
