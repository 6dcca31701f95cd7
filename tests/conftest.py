"""Test setup: JAX on the CPU (Pallas kernels in interpret mode), a hypothesis profile sized for 2-core CI."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. Each XLA:CPU executable holds its own memory mappings,
    and a process may hold at most vm.max_map_count (65,530 by default) of them: the whole suite in one process
    kept ~65k alive and crashed inside XLA's compiler (a segfault in a later test's compile)."""
    yield
    import gc

    import jax

    from jkv import runner

    runner._JITTED.clear()
    jax.clear_caches()
    gc.collect()
