"""The notebooks run top to bottom (nbclient, a real kernel) on short budgets, so they never rot:
the quickstart runs the digits demo, the analysis notebook reads the quickstart's run directory,
and the M2N2 reproduction runs a few hundred passes of its curves."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebooks need the dev extra (nbformat, nbclient, ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="notebooks need the dev extra (nbformat, nbclient, ipykernel)")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
pytestmark = pytest.mark.slow  # a real kernel and a search per notebook


def execute(name: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> str:
    """Every text and HTML output of the executed notebook, joined."""
    parts = []
    for cell in notebook.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.extend(str(v) for k, v in out.get("data", {}).items() if k in ("text/plain", "text/html"))
    return "\n".join(parts)


def test_quickstart_then_analysis_of_its_run(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_NOTEBOOK_BUDGET", "24")
    monkeypatch.setenv("EVOMERGE_NOTEBOOK_DIR", str(tmp_path))
    quickstart = outputs(execute("quickstart.ipynb"))
    assert "budget exhausted" in quickstart and "searched merge (m2n2)" in quickstart
    assert (tmp_path / "run" / "report.html").exists()

    monkeypatch.setenv("EVOMERGE_RUN_DIR", str(tmp_path / "run"))
    analysis = outputs(execute("analysis.ipynb"))
    assert "digits-demo finished 24 evaluations" in analysis
    assert "expert digits 0-4" in analysis and "busy share" in analysis


def test_m2n2_reproduction_runs_on_a_short_budget(monkeypatch):
    monkeypatch.setenv("EVOMERGE_M2N2_PASSES", "300")
    monkeypatch.setenv("EVOMERGE_M2N2_SEEDS", "42")
    notebook = execute("m2n2_reproduction.ipynb")
    images = [out for cell in notebook.cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert len(images) == 1  # the curves with the paper's final values marked
    assert "'m2n2'" in outputs(notebook) and "'ga'" in outputs(notebook)
