"""The memory a worker may take on this machine is bounded by its cgroup's limit, as the kernel's
OOM killer enforces it, not only by the host's MemAvailable (which a container's limit does not
change): a memory check that read only MemAvailable passed a run whose workers the container could
not hold."""

from __future__ import annotations

import json

import pytest
import yaml

from evomerge.cli import main
from evomerge.models import host_memory, memory
from evomerge.models.zoo.tiny_lm import build_tokenizer, tiny_llama

GIB = 1 << 30


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A fake /proc and /sys/fs/cgroup: a host with 64 GiB available, and a function to confine
    this process to cgroups (v1 or v2) with limits and usages."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: {128 * GIB // 1024} kB\nMemAvailable: {64 * GIB // 1024} kB\n")
    root = tmp_path / "cgroup"
    proc = tmp_path / "proc_cgroup"
    monkeypatch.setattr(host_memory, "MEMINFO", meminfo)
    monkeypatch.setattr(host_memory, "CGROUP_ROOT", root)
    monkeypatch.setattr(host_memory, "PROC_CGROUP", proc)

    def confine(version: int, path: str, groups: dict[str, tuple[str, int, int]]) -> None:
        """``groups``: directory under the memory mount -> (limit, usage, inactive file cache)."""
        names = host_memory.V2 if version == 2 else host_memory.V1
        mount = root / names[0] if names[0] else root
        proc.write_text(f"0::{path}\n" if version == 2 else f"4:memory:{path}\n1:cpu:/\n")
        for directory, (limit, usage, inactive) in groups.items():
            where = mount / directory
            where.mkdir(parents=True, exist_ok=True)
            (where / names[1]).write_text(f"{limit}\n")
            (where / names[2]).write_text(f"{usage}\n")
            (where / "memory.stat").write_text(f"active_file 5\n{names[3]} {inactive}\n")

    return confine


def test_without_a_cgroup_limit_the_hosts_available_memory_counts(machine):
    machine(2, "/user.slice", {"": ("max", 0, 0), "user.slice": ("max", 3 * GIB, 0)})
    assert host_memory.available_bytes() == 64 * GIB
    assert host_memory.total_bytes() == 128 * GIB


def test_a_cgroup_v2_limit_bounds_available_memory_less_its_usage(machine):
    # 8 GiB limit, 3 GiB used of which 1 GiB is inactive file cache the kernel reclaims first
    machine(2, "/", {"": (str(8 * GIB), 3 * GIB, GIB)})
    assert host_memory.available_bytes() == 6 * GIB
    assert host_memory.total_bytes() == 8 * GIB


def test_an_ancestors_tighter_limit_binds(machine):
    machine(2, "/job/step", {"": ("max", 0, 0), "job": (str(4 * GIB), GIB, 0), "job/step": (str(16 * GIB), GIB, 0)})
    assert host_memory.available_bytes() == 3 * GIB


def test_a_cgroup_v1_limit_is_read_where_the_container_mounts_it(machine):
    # /proc names the host's path; inside the container the memory mount is that cgroup itself
    machine(1, "/docker/0123abcd", {"": (str(10 * GIB), 4 * GIB, 0)})
    assert host_memory.available_bytes() == 6 * GIB
    machine(1, "/docker/0123abcd", {"": (str(2**63 - 4096), 4 * GIB, 0)})  # v1's "no limit"
    assert host_memory.available_bytes() == 64 * GIB


def test_a_run_that_fits_the_host_but_not_its_container_is_refused(machine, tmp_path, capsys):
    tokenizer = build_tokenizer()
    model = tiny_llama(tokenizer, hidden=32, layers=2, heads=2)
    for name in ("a", "b"):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    (tmp_path / "data.jsonl").write_text(json.dumps({"prompt": "1+1=", "target": "2"}) + "\n")
    document = {
        "executor": "inline",
        "run_dir": str(tmp_path / "run"),
        "models": {"experts": [str(tmp_path / "a"), str(tmp_path / "b")], "device": "cpu"},
        "merge": {"method": "linear"},
        "populations": [{"name": "p", "strategy": "random"}],
        "fitness": {"name": "negative_cross_entropy", "data": {"source": str(tmp_path / "data.jsonl")}},
        "budget": {"evaluations": 1},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(document))
    machine(2, "/", {"": (str(100_000), 10_000, 0)})  # 64 GiB on the host, 90 kB left in the container

    assert main(["run", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    assert "fit no memory tier" in err and f"this machine has {memory.size(90_000)} free" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "run.db").exists()
