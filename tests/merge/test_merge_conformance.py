"""Every registered merge method, in every setup it accepts, passes the shipped conformance suite
(evomerge.testing.merge_suite); a method built outside the registry can be run through it too."""

from __future__ import annotations

import dataclasses

import pytest

from evomerge.merge import MERGE_METHODS
from evomerge.testing.merge_suite import MergeMethodSuite, RegisteredMergeMethods


class TestRegisteredMergeMethods(RegisteredMergeMethods):
    pass


class TestAMethodBuiltOutsideTheRegistry(MergeMethodSuite):
    """How a plugin author runs the suite: override ``merge_case`` (here, SLERP under another name)."""

    @pytest.fixture(params=[True, False], ids=["base", "nobase"])
    def merge_case(self, request, monkeypatch):
        method = dataclasses.replace(MERGE_METHODS["slerp"], name="my_slerp")
        monkeypatch.setitem(MERGE_METHODS, method.name, method)  # recipes name their method
        return method, 2, request.param
