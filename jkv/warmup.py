"""Warm-up: compile every step an engine can meet before it serves, so no request waits while XLA compiles a new
batch shape (seconds per shape on a GPU: an online stream meets new shapes for a long time, as arrivals vary the
batch).

The shapes come from the engine's `ShapePolicy` (the same rules the scheduler and the executor bucket with). Each
runs once as a padding-only step; block copies and swaps are warmed for every call size they can take.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import jax

from jkv.compile_cache import active_store
from jkv.executor import ModelExecutor
from kvspec.shapes import ShapePolicy


def default_threads() -> int:
    """Compilations at a time: on a GPU up to 8 (one per CPU core); 1 elsewhere (XLA's CPU compiler already spreads
    one compilation over the cores)."""
    return min(8, os.cpu_count() or 1) if jax.default_backend() == "gpu" else 1


@contextmanager
def progress_bar(label: str = "warm-up: step shapes"):
    """A rich progress bar on stderr (shapes done of all, elapsed, time left), as a progress(done, total) callable."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = None

        def report(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = bar.add_task(label, total=total)
            bar.update(task, completed=done)

        yield report


def warm_up(executor: ModelExecutor, shapes: ShapePolicy, *, greedy: bool | None = None, threads: int | None = None,
            progress: Callable[[int, int], None] | bool | None = None) -> dict:  # fmt: skip
    """Compile every step shape of `shapes` not compiled yet (greedy None: both sampling variants), then every block
    copy and swap call size.

    threads: compile this many shapes at a time first; XLA compiles on the calling thread, so one thread per shape
    overlaps their compilations, and the runs that follow find the executables compiled. A shape whose compilation
    fails in parallel (say, the GEMM autotuner found no free memory beside the others) compiles again alone in its
    run, as it would without threads. progress(done, total) is called on the calling thread as each shape is
    compiled (with threads, as each thread's compilation comes back, in the list's order); progress=True shows a
    rich progress bar on stderr. A shape whose executable the compile cache holds is loaded, not compiled.
    Returns {"shapes": steps made ready now, "seconds": wall time, "parallel_failures": that count, "loaded": of
    them from the compile cache, "prepare_seconds": of the wall time, the threads' loading or compiling (0 without
    threads), "run_seconds": running each shape once on padding (and compiling what the threads did not)}.
    """
    if progress is True:
        with progress_bar() as bar:
            return warm_up(executor, shapes, greedy=greedy, threads=threads, progress=bar)
    if progress is False:
        progress = None
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads={threads!r} must be a positive integer (1: compile one shape at a time).")
    if progress is not None and not callable(progress):
        raise ValueError(f"progress={progress!r} must be a function of (done, total), True (a progress bar) or None.")
    report = progress or (lambda done, total: None)
    t0 = time.perf_counter()
    store = active_store()
    loaded_before = store.stats["loaded"] if store is not None else 0
    before = len(executor.runner.compiled)
    todo = [shape for shape in shapes.all_shapes(greedy) if not executor.is_compiled(shape)]
    threads = default_threads() if threads is None else threads
    failures = 0
    parallel = threads > 1 and len(todo) > 1
    t_prepare = time.perf_counter()
    if parallel:
        jobs = [executor.padding_compiler(shape) for shape in todo]  # the jitted functions are made on this thread

        def compile_one(job) -> bool:
            fn, args = job
            try:
                fn.precompile(*args)  # loaded from the compile cache, or compiled (and stored)
                return True
            except Exception:  # noqa: BLE001 - any failure: the serial run below compiles it again
                return False

        with ThreadPoolExecutor(threads) as pool:
            for i, ok in enumerate(pool.map(compile_one, jobs)):
                failures += not ok
                report(i + 1, len(todo))
    t_run = time.perf_counter()
    for i, shape in enumerate(todo):
        executor.run_padding(shape)
        if not parallel:
            report(i + 1, len(todo))
    executor.kv.warm(shapes.copy_buckets())
    loaded = (store.stats["loaded"] - loaded_before) if store is not None else 0
    done = time.perf_counter()
    return {"shapes": len(executor.runner.compiled) - before, "seconds": done - t0, "parallel_failures": failures,
            "loaded": loaded, "prepare_seconds": t_run - t_prepare if parallel else 0.0, "run_seconds": done - t_run}  # fmt: skip
