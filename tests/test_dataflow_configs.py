"""The shipped data-flow configs validate here (their run and models come from the LM demo)."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.config import load_config
from evomerge.plan import RunPlan

DATAFLOW = Path(__file__).resolve().parents[1] / "configs" / "dataflow"
CONFIGS = sorted(DATAFLOW.glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_dataflow_config_validates(path, capsys):
    assert main(["validate", "--no-files", str(path)]) == 0, capsys.readouterr().err


def test_the_ps_dfs_config_takes_the_demo_runs_best_and_both_specialists():
    config = load_config(DATAFLOW / "lm-ps-dfs.yaml")
    assert RunPlan.from_config(config).dataflow
    assert [(e.run, e.name) for e in config.models.experts] == [("../../runs/demo-lm", "ps-best"), (None, "addition"), (None, "reversal")]
