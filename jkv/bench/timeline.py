"""Memory and block-use timeline of a workload: a seeded mixed workload through an engine that records its per-step
history, and the plot of that history (blocks used / cached against the pool, fragmentation, running / waiting /
swapped sequences, preemptions, device bytes in use against the planned peak).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import jkv


def mixed_engine(model, *, requests: int, max_tokens: int, hbm: str | None = None, num_blocks: int | None = None,
                 block_size: int = 16, max_num_seqs: int = 32, decode_steps: int = 1) -> jkv.Engine:  # fmt: skip
    """An engine recording its history, with `requests` seeded requests queued: log-normal prompt lengths up to
    the context less max_tokens, 1..max_tokens output tokens each, EOS ignored."""
    eng = jkv.Engine(model, hbm=hbm, num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                     max_seq_len=min(model.config.n_positions, 1024), record_history=True,
                     decode_steps=decode_steps)  # fmt: skip
    rng = np.random.default_rng(0)
    limit = eng.max_seq_len - max_tokens
    for _ in range(requests):
        n = int(np.clip(rng.lognormal(np.log(max(2, limit // 4)), 0.7), 1, limit))
        eng.add_request(rng.integers(0, model.config.vocab_size, n).tolist(),
                        jkv.SamplingParams(max_tokens=int(rng.integers(1, max_tokens + 1)), ignore_eos=True))  # fmt: skip
    return eng


def plot(history: list[dict], blocks_total: int, planned_peak: int | None, png: Path) -> None:
    """The three-panel timeline of `history` (Engine.history records) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(len(history))
    col = lambda k: np.array([h[k] if h.get(k) is not None else np.nan for h in history], float)  # noqa: E731
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    ax = axes[0]
    ax.stackplot(
        steps, col("blocks_used"), col("blocks_cached"), labels=["used", "cached (reusable)"], alpha=0.8
    )
    ax.axhline(blocks_total, color="k", ls="--", lw=1, label=f"planned pool ({blocks_total} blocks)")
    ax.set_ylabel("KV blocks")
    ax.legend(loc="upper right")
    ax = axes[1]
    ax.plot(steps, 100 * col("internal_fragmentation"), label="internal fragmentation %")
    ax.plot(steps, 100 * col("prefix_hit_rate"), label="prefix hit rate %")
    ax2 = ax.twinx()
    for k in ("running", "waiting", "swapped"):
        ax2.plot(steps, col(k), ls=":", label=k)
    ax2.plot(steps, col("preemptions_recompute") + col("preemptions_swap"), ls="-.", label="preemptions")
    ax.set_ylabel("%")
    ax2.set_ylabel("sequences")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    ax = axes[2]
    used = col("bytes_in_use") / 2**30
    if np.isfinite(used).any():
        ax.plot(steps, used, label="measured bytes in use")
        ax.plot(steps, col("peak_bytes_in_use") / 2**30, label="measured peak")
    if planned_peak:
        ax.axhline(planned_peak / 2**30, color="r", ls="--", label="planned peak")
    if np.isfinite(used).any() or planned_peak:
        ax.legend(loc="lower right")
    else:
        ax.text(
            0.5,
            0.5,
            "this backend reports no memory statistics (CPU); run on a GPU for this panel",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_ylabel("device memory (GiB)")
    ax.set_xlabel("engine step")
    fig.suptitle("jkv: planned vs measured memory and block use")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
