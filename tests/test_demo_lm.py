"""The tiny-LM demo: a searched merge of an addition and a reversal specialist beats each of them."""

from __future__ import annotations

import re
from importlib.resources import files

import pytest
import yaml

from evomerge.cli import main


def shipped_lm_config() -> dict:
    return yaml.safe_load((files("evomerge") / "demos" / "lm.yaml").read_text())


@pytest.mark.slow
def test_lm_demo_merge_beats_each_specialist_on_the_mixed_test_set(tmp_path, capsys):
    config = shipped_lm_config()
    config["executor"] = "inline"  # the Ray path of the same search is covered by the Ray tests
    config["budget"] = {"evaluations": 60}
    path = tmp_path / "lm.yaml"  # relative paths resolve beside the copy, as in ./runs/lm.yaml
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
    models = tmp_path / "demo-lm-models"
    for name in ("base", "addition", "reversal"):
        assert (models / name / "model.safetensors").exists() and (models / name / "tokenizer.json").exists()


def test_demo_refuses_a_config_that_is_not_a_shipped_demo(tmp_path, capsys):
    config = shipped_lm_config()
    config["name"] = "my-merge"
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["demo", "--config", str(path)]) == 2
    assert "evomerge run" in capsys.readouterr().err
