"""A real local Ray cluster for the engine tests, started once per session and shut down at the end."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """``ray.init(num_cpus=2)``: the engine finds Ray initialised and runs on it (it does not shut it down)."""
    ray = pytest.importorskip("ray", reason="the Ray engine tests need the [ray] extra (CI installs it)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
