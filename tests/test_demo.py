"""The embedded demo: the searched merge beats each expert and their uniform average on the test set."""

from __future__ import annotations

import re

import pytest

from evomerge.cli import main


@pytest.mark.slow
def test_demo_merge_beats_experts_and_uniform_average(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # `evomerge demo` from any directory: everything goes under ./runs/
    assert main(["demo"]) == 0
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
    assert "runs/digits.yaml" in out
    assert str(tmp_path / "runs" / "demo") in out
    assert (tmp_path / "runs" / "demo" / "run.db").exists()
    assert (tmp_path / "runs" / "demo-models" / "digits-0-4" / "model.safetensors").exists()

    # Safe to run again: experts are reused, the demo's run directory is replaced.
    assert main(["demo"]) == 0


def test_an_edited_copy_is_kept_and_run_only_through_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "runs" / "digits.yaml"
    copy.parent.mkdir()
    copy.write_text("name: digits-demo  # edited\n")
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "--config runs/digits.yaml" in err and len(err.strip().splitlines()) == 1
    assert copy.read_text() == "name: digits-demo  # edited\n"


@pytest.mark.parametrize(
    "argv, message",
    [(["demo", "mnist"], "unknown demo 'mnist' (shipped: digits, lm)"), (["demo", "lm", "--config", "x.yaml"], "not both")],
)
def test_a_bad_demo_request_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
