"""Teacher-forced scoring *through the paged KV cache*: the honest way to measure a KV cache's quality.

The prefix is prefilled into the (possibly quantized, possibly windowed) pools, then every continuation token
is fed through the decode path one step at a time, so each next-token distribution is computed from K/V that
were written to and read back from the cache. A single full-sequence forward pass would never read the cache
and would prove nothing about it.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from jkv.kv_cache import allocate_pools
from jkv.runner import StepRunner, bucket, build_inputs


def score_through_cache(
    model,
    sequences: np.ndarray,  # [B, T] int32 token ids, all of one length
    prefix_len: int,
    *,
    kv_dtype: str | None = None,
    block_size: int = 16,
    sliding_window: int | None = None,
    attention: str = "auto",
) -> np.ndarray:
    """Log-probabilities [B, T - prefix_len, V] (float32) of tokens prefix_len .. T-1 given everything before.

    Row b's entry i is log p(x | sequences[b, :prefix_len + i]); the first comes from the prefill's last
    position, each later one from a decode step that reads the cache.
    """
    seqs = np.asarray(sequences, np.int32)
    if seqs.ndim != 2 or not 1 <= prefix_len < seqs.shape[1]:
        raise ValueError(f"sequences {seqs.shape} must be [B, T] with 1 <= prefix_len={prefix_len} < T.")
    b, t = seqs.shape
    config = model.config if sliding_window is None else model.config.replace(sliding_window=sliding_window)
    if t > config.n_positions:
        raise ValueError(f"sequences of {t} tokens exceed the model's {config.n_positions} positions.")
    kv_dtype = kv_dtype or np.dtype(model.dtype).name
    sliding_window = config.sliding_window
    per_seq = math.ceil(t / block_size)
    pools = allocate_pools(config, b * per_seq + 1, block_size, kv_dtype)
    tables = [list(range(1 + r * per_seq, 1 + (r + 1) * per_seq)) for r in range(b)]
    runner = StepRunner(model.params, config, block_size=block_size, backend=attention, sliding_window=sliding_window)
    width, rows_b = bucket(per_seq), bucket(b)
    greedy_row = (0.0, 0, 1.0, 0, 0)
    rows = [(seqs[r, :prefix_len].tolist(), 0, tables[r], *greedy_row) for r in range(b)]
    x = build_inputs(rows, block_size=block_size, chunk=bucket(prefix_len, 16), width=width, batch=rows_b)
    _, logits, pools = runner.run(pools, x, decode=False, greedy=True)
    out = [jax.nn.log_softmax(logits[:b])]
    for i in range(prefix_len, t - 1):
        rows = [([int(seqs[r, i])], i, tables[r], *greedy_row) for r in range(b)]
        x = build_inputs(rows, block_size=block_size, chunk=1, width=width, batch=rows_b)
        _, logits, pools = runner.run(pools, x, decode=True, greedy=True)
        out.append(jax.nn.log_softmax(logits[:b]))
    return np.stack([np.asarray(o, np.float32) for o in out], axis=1)


def quality_metrics(logp: np.ndarray, ref_logp: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Perplexity, its change against a reference cache, mean KL(ref || this) and top-1 agreement.

    logp, ref_logp [B, N, V] log-probabilities; targets [B, N] the tokens actually next.
    """
    nll = -np.take_along_axis(logp, targets[..., None], axis=-1).mean()
    ref_nll = -np.take_along_axis(ref_logp, targets[..., None], axis=-1).mean()
    p_ref = np.exp(ref_logp.astype(np.float64))
    kl = (p_ref * (ref_logp.astype(np.float64) - logp.astype(np.float64))).sum(-1).mean()
    top1 = (logp.argmax(-1) == ref_logp.argmax(-1)).mean()
    ppl, ref_ppl = float(np.exp(nll)), float(np.exp(ref_nll))
    return {"ppl": ppl, "ref_ppl": ref_ppl, "delta_ppl_pct": 100 * (ppl / ref_ppl - 1), "mean_kl": float(kl),
            "top1_agreement": float(top1)}  # fmt: skip
