"""jkv's measurement library: what the benchmark and measurement scripts under scripts/ run.

Each script is argparse and printing over these modules; tests import them, never a script.

- `child`: run one library function in a fresh Python process and read its JSON result back (device memory
  peaks are process-wide, so every measured configuration gets its own process).
- `probe`: `StepProbe`, the one place outside the engine that touches an Engine's internals (run, lower and
  compile its steps on synthetic inputs in place on its pools), and the synthetic decode-input builder.
- `trace`: jax.profiler traces -> kernel intervals and per-kernel times; whole-pool copies in HLO text.
- `search`: the real-maximum-batch search (`search_max_batch`) and its report.
- `memory`: plan vs measured device memory, term by term, and the candidates of the max-batch search.
- `workspace`: the steps' workspace beyond parameters and pool, by decode batch.
- `serving`: synthetic workloads, Poisson arrivals, the offline and online (open-loop) serving drivers, latency
  percentiles.
- `generate`: end-to-end generation throughput: paged engine, static padded batching, Hugging Face, GPU idle share.
- `step_profile`: one decode step's device time, dispatch time and kernels (and the multi-step call's).
- `warmup`, `dispatch`, `sampler`, `attention`, `host`, `timeline`, `kv_text`, `kv_quality`, `hf_torch`: the
  measurements of the scripts of the same names (hf_torch: the torch side of the Hugging Face fixtures).
"""


class CheckFailed(RuntimeError):
    """A benchmark's correctness check failed before anything was timed (the numbers would be meaningless)."""


def echo(msg: str) -> None:
    """The default progress sink of long measurements: one line on stdout, flushed (a child's parent reads it)."""
    print(msg, flush=True)
