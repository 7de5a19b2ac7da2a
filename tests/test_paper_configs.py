"""The papers' setups ship as configs for GPU clusters; they validate here without any download."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.plan import RunPlan
from evomerge.cli import main
from evomerge.config import load_config

PAPERS = Path(__file__).resolve().parents[1] / "configs" / "papers"
CONFIGS = sorted(PAPERS.glob("*.yaml"))


def test_the_three_papers_have_configs():
    assert {p.stem for p in CONFIGS} == {"evolutionary-merge-dare-ties", "m2n2-llm-math-agent", "evo-merging-lora-pool"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_paper_config_validates_and_states_its_hardware(path, capsys):
    assert main(["validate", "--no-files", str(path)]) == 0, capsys.readouterr().err
    assert "# Hardware:" in path.read_text()


def test_paper_setups_match_the_papers():
    dare = load_config(PAPERS / "evolutionary-merge-dare-ties.yaml")
    assert dare.merge.method == "dare_ties" and len(dare.models.experts) == 3
    assert set(dare.merge.search) == {"weight", "density"} and "cmaes" in dare.populations[0].strategy

    m2n2 = load_config(PAPERS / "m2n2-llm-math-agent.yaml")
    pop = {p.name: p for p in RunPlan.from_config(m2n2).populations}
    assert pop["m2n2"].options.archive_size == 15 and pop["m2n2"].requires.split_grid is not None
    assert RunPlan.from_config(m2n2).budgets == {"m2n2": 1000, "cmaes": 1000}
    assert m2n2.merge.method == "slerp" and m2n2.merge.layer_groups == 32

    pool = load_config(PAPERS / "evo-merging-lora-pool.yaml")
    assert pool.merge.method == "lora_compose" and pool.populations[0].strategy == "evo_merging"
    assert pool.models.base.startswith("meta-llama/") and len(pool.models.experts) >= 10


def test_hub_only_configs_validate_with_file_checks_too(capsys):
    assert main(["validate", str(PAPERS / "m2n2-llm-math-agent.yaml")]) == 0
    assert main(["validate", str(PAPERS / "evo-merging-lora-pool.yaml")]) == 2
    assert "model directory not found" in capsys.readouterr().err
