"""KV-cache quality measured through the cache: perplexity, ΔPPL, KL and top-1 agreement per kv dtype and window.

Method (docs/kv_quality.md): every held-out sequence's prefix is prefilled into the paged pool of the kv dtype
under test, then each continuation token is fed through the decode path with teacher forcing
(`jkv.scoring.score_through_cache`), so every next-token distribution is computed from K/V that were written to
and read back from the (quantized, windowed) cache. The bfloat16 cache is the reference: ΔPPL, mean
KL(bf16 || this) and top-1 agreement are against it, token by token on the same text (`jkv.bench.kv_text`).

The model is a Hugging Face GPT-2 checkpoint or a GPT-2-architecture model trained here first, fixed seed
(`train`, early stopping on held-out documents). `EvalOptions` holds every setting with its default;
`EvalOptions(smoke=True)` runs the whole pipeline on a tiny model in seconds (the CPU test).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jkv
from jkv.bench import echo
from jkv.bench.kv_text import eval_documents, ngram_overlap, token_stream, train_documents
from jkv.bench.probe import attention_backend
from jkv.model import Model, attend_no_cache, forward
from jkv.scoring import score_through_cache
from jkv.weights import random_params
from kvspec.config import ModelConfig
from kvspec.layout import blocks_for_tokens, kv_bytes_per_token, kv_dtype

# (label, kv_dtype, sliding window, attention): the first row is the reference every other row is compared with.
REFERENCE = ("bfloat16", "bfloat16", None, "auto")
CONTROL = ("bfloat16 (jnp attention)", "bfloat16", None, "reference")  # noise floor: same cache, other attention

TARGETS = {  # issue 6; |ΔPPL| so that a lucky negative change does not pass for free
    "int8": {"abs_delta_ppl_pct": 0.5, "mean_kl": 1e-3, "top1_agreement_min": 0.99, "pool_ratio": 0.53},
    "float8_e4m3fn": {"abs_delta_ppl_pct": 1.0},
    "int4": {"abs_delta_ppl_pct": 3.0},
}


@dataclass
class EvalOptions:
    """Every setting of an evaluation (scripts/eval_kv_quality.py's flags, same names and defaults)."""

    model: str | None = None  # a Hugging Face GPT-2 checkpoint directory; None: train one first
    train: bool = False  # train a model first (the default without `model`)
    smoke: bool = False  # tiny everything (SMOKE below), overriding the other settings it names
    seed: int = 0
    n_layer: int = 6  # trained model: layers
    n_embd: int = 384  # trained model: width
    n_head: int = 6  # trained model: heads (head_dim 64 suits the kernels)
    n_positions: int = 512  # trained model: context
    steps: int = 2000  # most training steps (early stopping may end sooner)
    batch: int = 16  # training sequences per step
    train_seq_len: int = 512
    lr: float = 1e-3
    warmup: int = 50
    eval_every: int = 25
    patience: int = 8  # evaluations without improvement before stopping
    max_train_seconds: float = 90.0
    num_seqs: int = 64  # held-out sequences scored
    prefix: int = 64  # tokens prefilled into the cache
    continuation: int = 384  # tokens scored through decode steps
    block_size: int = 16
    kv_dtypes: str = "bfloat16,int8,float8_e4m3fn,int4"
    windows: str = "128,256"  # sliding windows to score with a bfloat16 cache
    control: bool = True  # also the bf16 cache with jnp attention (the measurement's noise floor)
    json: str | None = None  # results go here (default: $OUT/kv_quality.json when $OUT is set)

    def __post_init__(self) -> None:
        if self.smoke:
            for name, value in SMOKE.items():
                setattr(self, name, value)


SMOKE = {"steps": 4, "batch": 2, "train_seq_len": 32, "eval_every": 2, "warmup": 1, "num_seqs": 2, "prefix": 8,
         "continuation": 8, "block_size": 4, "windows": "8"}  # fmt: skip


# Training --------------------------------------------------------------------------------------------------------
def lm_loss(params, config: ModelConfig, batch: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy; float32 master weights, bfloat16 compute (LayerNorm/softmax/logits float32)."""
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    x, y = batch[:, :-1], batch[:, 1:]  # [B, T]
    pos = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape)
    logits, _ = forward(p16, config, x, pos, None, attend_no_cache)  # [B, T, V] float32
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), y[..., None], axis=-1))


def train(
    config: ModelConfig,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    args: EvalOptions,
    log: Callable[[str], None] = print,
) -> tuple[dict, dict]:
    """AdamW with warmup + cosine decay; keeps the parameters of the best validation loss (early stopping)."""
    import optax

    seq = min(args.train_seq_len, config.n_positions)
    params = random_params(config, "float32", seed=args.seed)
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, max(args.steps, args.warmup + 1),
                                               args.lr / 10)  # fmt: skip
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.1))
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
        loss, grads = jax.value_and_grad(lm_loss)(params, config, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    eval_loss = jax.jit(lambda p, b: lm_loss(p, config, b))
    n_val = max(1, min(16, (len(val_ids) - 1) // (seq + 1)))
    val = jnp.asarray(val_ids[: n_val * (seq + 1)].reshape(n_val, seq + 1))
    rng = np.random.default_rng(args.seed)
    best = (math.inf, 0, params)
    history = []
    t0 = time.perf_counter()
    stopped = "max steps"
    loss = jnp.nan
    for i in range(1, args.steps + 1):
        starts = rng.integers(0, len(train_ids) - seq - 1, args.batch)
        batch = jnp.asarray(np.stack([train_ids[s : s + seq + 1] for s in starts]))
        params, state, loss = step(params, state, batch)
        if i % args.eval_every == 0 or i == args.steps:
            v = float(eval_loss(params, val))
            history.append(
                {"step": i, "train_loss": float(loss), "val_loss": v, "seconds": time.perf_counter() - t0}
            )
            log(f"train step {i:5d}  loss {float(loss):.3f}  val {v:.3f}  {time.perf_counter() - t0:6.1f} s")
            if v < best[0]:
                best = (v, i, jax.tree.map(jnp.copy, params))
            elif i - best[1] >= args.patience * args.eval_every:
                stopped = f"early stop (no val improvement for {args.patience} evals)"
                break
            if time.perf_counter() - t0 > args.max_train_seconds:
                stopped = f"time cap {args.max_train_seconds} s"
                break
    info = {"steps_run": i, "best_step": best[1], "best_val_loss": best[0], "stopped": stopped,
            "train_seconds": time.perf_counter() - t0, "batch": args.batch, "seq_len": seq, "lr": args.lr,
            "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids)), "history": history}  # fmt: skip
    return best[2], info


# Metrics ---------------------------------------------------------------------------------------------------------
@jax.jit
def _token_metrics(logp, ref_logp, targets):
    """Per-token nll, reference nll, KL(ref || this) and top-1 agreement; logp, ref_logp [b, N, V]."""
    pick = lambda lp: -jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
    kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
    agree = jnp.argmax(logp, axis=-1) == jnp.argmax(ref_logp, axis=-1)
    return pick(logp), pick(ref_logp), kl, agree


def summarize(logp: np.ndarray, ref_logp: np.ndarray, targets: np.ndarray, rows: int = 8) -> dict[str, float]:
    """`jkv.scoring.quality_metrics` computed on the device a few rows at a time (the full [B, N, V] arrays are
    gigabytes; NumPy float64 over them would take minutes); per-token values are summed in float64 on the host.
    tests/test_eval_kv_quality.py checks it equals quality_metrics."""
    parts = [_token_metrics(logp[i : i + rows], ref_logp[i : i + rows], targets[i : i + rows])
             for i in range(0, len(logp), rows)]  # fmt: skip
    nll, ref_nll, kl, agree = (
        np.concatenate([np.asarray(p[j], np.float64) for p in parts]) for j in range(4)
    )
    ppl, ref_ppl = float(np.exp(nll.mean())), float(np.exp(ref_nll.mean()))
    return {"ppl": ppl, "ref_ppl": ref_ppl, "delta_ppl_pct": 100 * (ppl / ref_ppl - 1), "mean_kl": float(kl.mean()),
            "top1_agreement": float(agree.mean())}  # fmt: skip


# Settings ----------------------------------------------------------------------------------------------------------
def model_config(args: EvalOptions) -> ModelConfig:
    if args.smoke:
        return ModelConfig("jkv-smoke-2x64", vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=2)
    return ModelConfig(f"jkv-trained-{args.n_layer}x{args.n_embd}", vocab_size=50257, n_positions=args.n_positions,
                       n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head)  # fmt: skip


def configurations(args: EvalOptions) -> list[tuple[str, str, int | None, str]]:
    """The reference first, then the quantized caches, the windows, and the noise-floor control last."""
    rows = [REFERENCE]
    rows += [(kv, kv, None, "auto") for kv in args.kv_dtypes.split(",") if kv and kv != "bfloat16"]
    rows += [(f"bfloat16 W={w}", "bfloat16", int(w), "auto") for w in args.windows.split(",") if w]
    if args.control:
        rows.append(CONTROL)
    return rows


def check_targets(rows: list[dict], bf16_bytes: int) -> list[dict]:
    out = []
    for r in rows:
        t = TARGETS.get(r["label"])
        if not t:
            continue
        checks = {"abs_delta_ppl_pct": (abs(r["delta_ppl_pct"]), "<=", t["abs_delta_ppl_pct"])}
        if "mean_kl" in t:
            checks["mean_kl"] = (r["mean_kl"], "<=", t["mean_kl"])
        if "top1_agreement_min" in t:
            checks["top1_agreement"] = (r["top1_agreement"], ">=", t["top1_agreement_min"])
        if "pool_ratio" in t:
            checks["pool_ratio_vs_bf16"] = (r["kv_bytes_per_token"] / bf16_bytes, "<=", t["pool_ratio"])
        for name, (value, op, bound) in checks.items():
            hit = value <= bound if op == "<=" else value >= bound
            out.append(
                {"kv": r["label"], "metric": name, "value": value, "target": f"{op} {bound:g}", "hit": hit}
            )
    return out


# The evaluation ----------------------------------------------------------------------------------------------
def load_or_train(args: EvalOptions, log: Callable[[str], None] = print):
    """(model, tokenizer, model description, training info or None, the training text's ids or None): the
    checkpoint `args.model`, or a model trained here on `kv_text`'s training documents."""
    if args.model:
        model = jkv.load_model(args.model, dtype="bfloat16")
        return (
            model,
            jkv.get_tokenizer(args.model),
            {"source": str(args.model), "kind": "checkpoint"},
            None,
            None,
        )
    tok = jkv.get_tokenizer()
    config = model_config(args)
    tr_docs, va_docs = train_documents(set(eval_documents()[0]))
    train_ids, val_ids = token_stream(tok, tr_docs), token_stream(tok, va_docs)
    log(
        f"training {config.name}: {len(train_ids):,} tokens ({len(tr_docs)} documents: pydoc_data.topics and "
        f"docstrings of the stdlib outside the evaluation modules), {len(val_ids):,} held out for early stopping"
    )
    params, train_info = train(config, train_ids, val_ids, args, log)
    model = Model(config, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), jnp.bfloat16, "trained")
    desc = {"source": "trained here", "kind": "trained", "config": {
        k: getattr(config, k) for k in ("name", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head")}}  # fmt: skip
    return model, tok, desc, train_info, np.concatenate([train_ids, val_ids])


def result_path(args: EvalOptions) -> str | None:
    """Where the results go: `args.json`, else $OUT/kv_quality.json when $OUT is set."""
    return args.json or (
        os.path.join(os.environ["OUT"], "kv_quality.json") if os.environ.get("OUT") else None
    )


def score_row(model, seqs: np.ndarray, args: EvalOptions, label: str, kv: str, window: int | None, attention: str,
              log: Callable[[str], None]) -> tuple[np.ndarray, str]:  # fmt: skip
    """score_through_cache for one configuration; (log-probabilities, the attention that ran). A configuration whose
    kernel fails (one that does not lower) is retried with the jnp reference attention, so it does not lose the
    rest."""
    score = partial(score_through_cache, model, seqs, args.prefix, kv_dtype=kv, block_size=args.block_size,
                    sliding_window=window)  # fmt: skip
    try:
        return score(attention=attention), attention
    except Exception as err:
        if attention != "auto":
            raise
        log(f"  {label}: {type(err).__name__}: {str(err)[:300]} -- retrying with the jnp reference attention")
        return score(attention="reference"), "reference"


def evaluate(args: EvalOptions, command: str = "", log: Callable[[str], None] = echo) -> dict:
    """The whole evaluation (module docstring): every configuration's row, the targets checked, written to
    `result_path(args)` after every row. Raises ValueError when prefix + continuation exceed the model's context."""
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    log(
        f"device: {dev.device_kind} ({jax.default_backend()}), JAX {jax.__version__}, Python {platform.python_version()}"
    )
    model, tok, model_desc, train_info, train_ids = load_or_train(args, log)
    config = model.config
    docs, modules = eval_documents()
    ids = token_stream(tok, docs)
    t = args.prefix + args.continuation
    if t > config.n_positions:
        raise ValueError(
            f"--prefix + --continuation = {t} exceeds the model's {config.n_positions} positions."
        )
    n = min(args.num_seqs, len(ids) // t)
    seqs = ids[: n * t].reshape(n, t)
    targets = seqs[:, args.prefix :]
    text_desc = {"source": "docstrings (inspect.getdoc) of stdlib modules and their public classes/functions",
                 "modules": modules, "docstrings": len(docs), "tokens_available": int(len(ids)),
                 "sha256_of_token_ids": hashlib.sha256(ids.tobytes()).hexdigest()[:16], "sequences": n,
                 "prefix": args.prefix, "continuation": args.continuation, "tokens_scored": int(targets.size)}  # fmt: skip
    if train_ids is not None:
        text_desc["8gram_overlap_with_training_text"] = ngram_overlap(seqs.reshape(-1), train_ids)
    log(
        f"scoring {n} held-out sequences ({len(docs)} docstrings of {len(modules)} modules): prefix "
        f"{args.prefix} prefilled, {args.continuation} tokens teacher-forced through the cache"
    )

    bf16_bytes = kv_bytes_per_token(config, kv_dtype("bfloat16"))
    path = result_path(args)
    rows, ref_logp = [], None
    result = {
        "date": datetime.date.today().isoformat(), "device": dev.device_kind, "backend": jax.default_backend(),
        "jax": jax.__version__, "python": platform.python_version(), "command": command,
        "smoke": args.smoke, "seed": args.seed, "block_size": args.block_size, "model": model_desc,
        "training": train_info, "eval_text": text_desc, "rows": rows,
    }  # fmt: skip
    for label, kv, window, attention in configurations(args):
        t0 = time.perf_counter()
        logp, attention = score_row(model, seqs, args, label, kv, window, attention, log)
        if ref_logp is None:
            ref_logp = logp
        m = summarize(logp, ref_logp, targets)
        per_tok = kv_bytes_per_token(config, kv_dtype(kv))
        row = {"label": label, "kv_dtype": kv, "sliding_window": window,
               "attention": attention_backend(attention, config.head_dim, args.block_size, kv), **m,
               "kv_bytes_per_token": per_tok, "tokens_per_gb": int(1e9 // per_tok),
               "kv_bytes_per_seq": blocks_for_tokens(t, args.block_size, window) * args.block_size * per_tok,
               "seconds": time.perf_counter() - t0}  # fmt: skip
        rows.append(row)
        log(
            f"  {label:26s} ppl {m['ppl']:.3f}  ΔPPL {m['delta_ppl_pct']:+.3f}%  KL {m['mean_kl']:.2e}  "
            f"top-1 {100 * m['top1_agreement']:.2f}%  ({row['seconds']:.1f} s)"
        )
        del logp
        if path:  # after every row, so a run cut short still leaves what it measured
            Path(path).write_text(json.dumps(result, indent=1))
    result |= {"targets": check_targets(rows, bf16_bytes), "seconds_total": time.perf_counter() - t_start}
    if path:
        Path(path).write_text(json.dumps(result, indent=1))
    return result
