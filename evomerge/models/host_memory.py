"""How much memory this machine can still give a process: ``MemAvailable`` of ``/proc/meminfo``,
bounded by the memory limit of the control group the process runs in.

A container (Docker's ``--memory``, a Kubernetes pod's limit) or a Slurm job confines its
processes to a cgroup whose limit the kernel enforces with its OOM killer, while
``/proc/meminfo`` still describes the whole host: a memory check that read only ``MemAvailable``
would let workers load models the cgroup cannot hold, and they would be killed (SIGKILL, no
message) halfway through loading. The cgroup's headroom is its limit less what it uses, not
counting the inactive file cache the kernel reclaims before it kills anything (as Ray's memory
monitor counts it). Limits of the cgroup's ancestors bind too; the tightest one counts.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
MEMINFO = Path("/proc/meminfo")
UNLIMITED = 1 << 60
"""A cgroup v1 limit at or above this is the kernel's "no limit" (2^63 rounded down to pages)."""

# per cgroup version: (its directory under the root, limit file, usage file, inactive file cache in memory.stat)
V2 = ("", "memory.max", "memory.current", "inactive_file")
V1 = ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def meminfo(field: str) -> int | None:
    """A ``/proc/meminfo`` figure in bytes (``MemAvailable``, ``MemTotal``); None where unreadable."""
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_bytes() -> int | None:
    """The memory this machine can still give this process (None: unknown)."""
    figures = [meminfo("MemAvailable"), cgroup_headroom()]
    known = [f for f in figures if f is not None]
    if not known:
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return min(known)


def process_anon_bytes() -> int:
    """This process's anonymous resident memory (``RssAnon``: its heap, not mapped files or shared
    libraries' pages); 0 where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def total_bytes() -> int | None:
    """This machine's memory as this process sees it: ``MemTotal``, or its cgroup's limit if smaller."""
    figures = [meminfo("MemTotal"), cgroup_limit()]
    known = [f for f in figures if f is not None]
    return min(known) if known else None


def _cgroups() -> list[tuple[Path, tuple[str, str, str, str]]]:
    """The memory cgroup directories this process is confined by, its own first, then its
    ancestors, with their version's file names."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _id, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "-", "")
        names = V2 if controllers == "" else V1 if "memory" in controllers.split(",") else None
        if names is None:
            continue
        mount = CGROUP_ROOT / names[0] if names[0] else CGROUP_ROOT
        own = mount / path.lstrip("/")
        # inside a container the mount is the cgroup itself, while /proc names the host's path
        directory = own if own.is_dir() and mount in own.parents else mount
        found.append((directory, names))
        while directory != mount:
            directory = directory.parent
            found.append((directory, names))
    return found


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" or not text.isdigit() else int(text)


def _inactive_file(directory: Path, field: str) -> int:
    try:
        for line in (directory / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == field and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def cgroup_limit() -> int | None:
    """The tightest memory limit of this process's cgroup and its ancestors (None: unlimited)."""
    limits = [_read_int(d / names[1]) for d, names in _cgroups()]
    bounded = [limit for limit in limits if limit is not None and limit < UNLIMITED]
    return min(bounded) if bounded else None


def cgroup_headroom() -> int | None:
    """Bytes this process's cgroups let it still take before the kernel's OOM killer acts: the
    least, over the cgroup and its ancestors that have a limit, of the limit less the memory used
    (less the inactive file cache). None where no limit applies."""
    headrooms = []
    for directory, (_sub, limit_file, usage_file, inactive) in _cgroups():
        limit = _read_int(directory / limit_file)
        usage = _read_int(directory / usage_file)
        if limit is None or limit >= UNLIMITED or usage is None:
            continue
        headrooms.append(max(0, limit - max(0, usage - _inactive_file(directory, inactive))))
    return min(headrooms) if headrooms else None
