"""The wheel, installed as a user installs it, runs the demo and the commands around it.

``make test`` installs evomerge editable, which hides a package left out of the wheel or a data
file read from the repository (house review P4: a wheel once shipped without ``evomerge/report``).
Here the wheel is built from the package alone, installed non-editable into a fresh virtual
environment, and run in a directory outside the repository. The new environment sees the already
installed dependencies through a ``.pth`` line naming this environment's site-packages: such a
directory is appended to ``sys.path`` but its own ``.pth`` files are not processed, so the
repository's editable install stays inactive (the test checks where ``evomerge`` is imported from).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a build, a virtual environment and the full demo: about two minutes

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("evomerge/report/", "evomerge/workers/", "evomerge/service/", "evomerge/server/", "evomerge/testing/")


def run(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the repository must not be importable
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of what it is made of, so the build leaves nothing in the repository."""
    source = tmp_path_factory.mktemp("source")
    shutil.copytree(REPO / "evomerge", source / "evomerge", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), str(source)], out)
    (built,) = out.glob("evomerge-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed, and this one's packages beside it."""
    root = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", str(root)], root)
    python = root / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)], root)
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root


def test_the_wheel_holds_the_whole_package_and_the_demo_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for folder in SHIPPED:
        assert any(n.startswith(folder) for n in names), f"{folder} is missing from the wheel"
    assert {"evomerge/demos/digits.yaml", "evomerge/demos/lm.yaml"} <= set(names)
    tasks = "evomerge/testing/lm_eval_tasks/"  # the lm_eval fitness suite's tiny tasks
    assert {tasks + "tiny_sums_mc.yaml.in", tasks + "tiny_sums_gen.yaml.in", tasks + "tiny_sums_mc.jsonl"} <= set(names)


def test_the_installed_wheel_runs_demo_status_export_and_report_anywhere(venv, tmp_path):
    bin_dir = venv / "bin"
    imported = run([str(bin_dir / "python"), "-c", "import evomerge; print(evomerge.__file__)"], tmp_path).stdout.strip()
    assert Path(imported).is_relative_to(venv), f"evomerge was imported from {imported}, not the installed wheel"

    evomerge = str(bin_dir / "evomerge")
    demo = run([evomerge, "demo"], tmp_path, timeout=600)
    assert "searched merge (cmaes)" in demo.stdout and "runs/digits.yaml" in demo.stdout
    assert (tmp_path / "runs" / "digits.yaml").is_file()
    run_dir = tmp_path / "runs" / "demo"

    status = json.loads(run([evomerge, "status", str(run_dir), "--json"], tmp_path).stdout)
    assert status["state"] == "finished"

    run([evomerge, "export", str(run_dir), "--out", str(tmp_path / "merged")], tmp_path)
    assert list((tmp_path / "merged").glob("*.safetensors")), "the export holds no weights"

    run([evomerge, "report", str(run_dir)], tmp_path)
    assert (run_dir / "report.html").is_file()
