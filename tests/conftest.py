"""Test setup: JAX on the CPU (Pallas kernels in interpret mode), a hypothesis profile sized for 2-core CI."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The CPU compiler's cheapest settings: the suite is dominated by compiling small steps (a third less time on 2
# cores), and every comparison is between programs compiled under the same flags. Subprocesses inherit them.
FAST_COMPILE_FLAGS = ("--xla_llvm_disable_expensive_passes=true", "--xla_backend_optimization_level=0",
                      "--xla_cpu_parallel_codegen_split_count=1")  # fmt: skip
_flags = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join(_flags + [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")])

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def _memory_maps() -> int | None:
    """Memory mappings this process holds (Linux), or None where /proc does not say."""
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def _max_maps() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after a test module once the process holds many memory mappings. Each XLA:CPU
    executable holds its own mappings, and a process may hold at most vm.max_map_count (65,530 by default): the
    whole suite in one process kept ~65k alive and crashed inside XLA's compiler (a segfault in a later test's
    compile). A heavy module adds ~12k mappings, so the programs are kept (later modules that build the same
    engines reuse them) while fewer than a third of the limit are in use, and dropped otherwise (always where
    /proc cannot tell)."""
    yield
    maps = _memory_maps()
    if maps is not None and maps < _max_maps() // 3:
        return
    import gc

    import jax

    from jkv import runner

    runner._JITTED.clear()
    jax.clear_caches()
    gc.collect()
