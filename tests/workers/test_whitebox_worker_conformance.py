"""The white-box worker passes the worker suite (``evomerge.testing.worker_suite``) on the tiny
digit experts; the black-box worker runs the same suite in test_blackbox_worker_conformance.py, against the reference service."""

from __future__ import annotations

import pytest

from evomerge.config import load_config
from evomerge.models.loading import parameter_names
from evomerge.plan import RunPlan
from evomerge.testing.worker_suite import WorkerSuite


@pytest.fixture
def worker_config(digits_config, data_file):
    def make(fitness: str | None = None):
        section = {"name": fitness or "classification_accuracy", "data": {"source": str(data_file)}}
        return load_config(digits_config(fitness=section))

    return make


@pytest.fixture
def genome(worker_config):
    plan = RunPlan.from_config(worker_config())
    return plan.space(parameter_names(plan.working_model)).x0()


class TestWhiteBoxWorker(WorkerSuite):
    pass
