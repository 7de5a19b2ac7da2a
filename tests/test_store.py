"""The run store passes the shipped conformance suite (evomerge.testing.store_suite)."""

from __future__ import annotations

from evomerge.testing.store_suite import RunStoreSuite


class TestRunStore(RunStoreSuite):
    pass
