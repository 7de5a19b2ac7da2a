"""What a run searches: the parts of its config a resume must not change.

A resumed run rebuilds its strategies, spaces and fitness from the config and replays the recorded
candidates through them, so a config that now names a third expert, another merge method or
another fitness would score new candidates in another space than the recorded ones (and fail on
their genomes). Every config field is part of the run's identity except ``HARMLESS_FIELDS``; a
field added to the config later counts as identity until it is listed there.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from evomerge.config import RunConfig

HARMLESS_FIELDS = (
    "name",
    "run_dir",
    "executor",
    "workers",
    "checkpoint_every",
    "score_experts",
    "budget",
    "models.device",
    "models.devices",
    "api.api_key_env",
    "api.concurrency",
    "api.requests_per_second",
    "api.timeout",
    "api.max_retries",
    "api.backoff",
    "api.max_backoff",
)
"""Dotted config fields a resume may change, because they say how long, where and how fast the
search runs, never what it searches or how a candidate is scored: the budget and its limits (a
new night's deadline), the executor and workers (another cluster), the device and how many of
them a worker spans, how often checkpoints are taken (the log after the last one is replayed),
whether the experts are scored alone (a report figure), the run's label and directory (a moved
run), and how the model service is called (concurrency, rate, timeouts, retries, the key's
variable), not which service answers."""


def identity(config: RunConfig) -> dict[str, Any]:
    """The config as plain data without its harmless fields."""
    data = config.model_dump(mode="json")
    for dotted in HARMLESS_FIELDS:
        *parents, leaf = dotted.split(".")
        node: Any = data
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return data


def changes(started: RunConfig, current: RunConfig) -> list[tuple[str, str]]:
    """Each identity field that differs, as ``(dotted field, "before → now")``, in the config's order."""
    return list(_diff(identity(started), identity(current), ""))


def _diff(before: Any, now: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(before, dict) and isinstance(now, dict):
        for key in [*before, *(k for k in now if k not in before)]:
            yield from _diff(before.get(key), now.get(key), f"{where}.{key}" if where else str(key))
    elif isinstance(before, list) and isinstance(now, list) and len(before) == len(now):
        for i, (a, b) in enumerate(zip(before, now)):
            yield from _diff(a, b, f"{where}.{i}")
    elif isinstance(before, list) and isinstance(now, list):
        noun = where.rsplit(".", 1)[-1]
        yield where, f"{len(before)} → {len(now)} {noun}"
    elif before != now:
        yield where, f"{_show(before)} → {_show(now)}"


def _show(value: Any) -> str:
    text = "unset" if value is None else value if isinstance(value, str) else json.dumps(value)
    text = " ".join(text.split())  # one line
    return text if len(text) <= 60 else text[:57] + "..."
