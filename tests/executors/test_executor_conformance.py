"""Every registered executor passes the executor suite (``evomerge.testing.executor_suite``) on the
tiny digit experts; the Ray executor joins one small local Ray session for the module."""

from __future__ import annotations

import pytest
import ray

from evomerge.config import load_config
from evomerge.testing.executor_suite import ExecutorSuite


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def run_config(digits_config, data_file):
    def make(executor: str):
        return load_config(
            digits_config(
                executor=executor,
                workers={"count": 2, "cpus_per_worker": 0.5, "timeout": "60s", "schedule_timeout": "60s", "load_timeout": "60s"},
                populations=[{"name": "rand", "strategy": "random"}],
                fitness={"name": "classification_accuracy", "data": {"source": str(data_file)}},
                budget={"evaluations": 6},
            )
        )

    return make


class TestExecutors(ExecutorSuite):
    pass
