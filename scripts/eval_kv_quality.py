#!/usr/bin/env python
"""KV-cache quality measured through the cache: perplexity, ΔPPL, KL and top-1 agreement per kv dtype and window.

    python scripts/eval_kv_quality.py [--model DIR | --train] [--smoke] [--json FILE]

Method (docs/kv_quality.md): every held-out sequence's prefix is prefilled into the paged pool of the kv dtype
under test, then each continuation token is fed through the decode path with teacher forcing
(`jkv.scoring.score_through_cache`), so every next-token distribution is computed from K/V that were written to
and read back from the (quantized, windowed) cache. The bfloat16 cache is the reference: ΔPPL, mean
KL(bf16 || this) and top-1 agreement are against it, token by token on the same text.

Model: `--model DIR`, a Hugging Face GPT-2 checkpoint, or (default, `--train`) a GPT-2-architecture model trained
in the same command, fixed seed: 6 layers x 384 wide x 6 heads (head_dim 64, so the Pallas kernels serve it),
512 positions, GPT-2's 50,257-token vocabulary, on English text that ships in every Python: the CPython
documentation topics (`pydoc_data.topics`) and the docstrings of the standard library outside the evaluation
modules (read with `ast`), with every 10th document held out for early stopping. Evaluation text: the docstrings
of a fixed list of other standard-library modules (`inspect.getdoc`), never trained on.

Prints a table last; writes the results as JSON (--json, default $OUT/kv_quality.json when $OUT is set).
`--smoke` runs the whole pipeline on a tiny model in seconds (CPU test).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib
import inspect
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jkv  # noqa: E402
from jkv.model import Model, attend_no_cache, forward  # noqa: E402
from jkv.scoring import score_through_cache  # noqa: E402
from jkv.weights import random_params  # noqa: E402
from planner.config import ModelConfig  # noqa: E402
from planner.kv_layout import blocks_for_tokens, kv_bytes_per_token, kv_dtype  # noqa: E402

EOS = 50256  # GPT-2's <|endoftext|>, between documents

# Held-out evaluation text: docstrings of these modules (and of the public classes and functions they define).
# pdb is left out: its docstring repeats the debugger-command help of the pydoc topic "debugger" (23 % of its
# 8-grams occur in the training text; the modules below share about 4 %, common phrases).
EVAL_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest",
    "email.message", "enum", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip",
    "heapq", "hmac", "html.parser", "http.client", "http.server", "imaplib", "inspect", "ipaddress", "json",
    "locale", "logging", "mailbox", "mimetypes", "operator", "optparse", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "reprlib", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket",
    "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "trace", "traceback", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings",
    "weakref", "xml.dom.minidom", "zipfile",
)  # fmt: skip

# (label, kv_dtype, sliding window, attention): the first row is the reference every other row is compared with.
REFERENCE = ("bfloat16", "bfloat16", None, "auto")
CONTROL = ("bfloat16 (jnp attention)", "bfloat16", None, "reference")  # noise floor: same cache, other attention

TARGETS = {  # issue 6; |ΔPPL| so that a lucky negative change does not pass for free
    "int8": {"abs_delta_ppl_pct": 0.5, "mean_kl": 1e-3, "top1_agreement_min": 0.99, "pool_ratio": 0.53},
    "float8_e4m3fn": {"abs_delta_ppl_pct": 1.0},
    "int4": {"abs_delta_ppl_pct": 3.0},
}


# Text ------------------------------------------------------------------------------------------------------------
def stdlib_docstrings(exclude: tuple[str, ...] = ()) -> list[str]:
    """Docstrings (>= 80 characters) of every standard-library source file, read with `ast` (nothing imported).

    Modules in `exclude` and their submodules are skipped, as are the test suites and IDLE.
    """
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] in ("test", "idlelib", "site-packages", "lib2to3") or "tests" in parts:
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if any(name == m or name.startswith(m + ".") for m in exclude):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 80:
                    docs.append(doc)
    return docs


def train_documents(exclude: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """(training, validation) documents: the CPython documentation topics shipped in the stdlib
    (`pydoc_data.topics`) and the docstrings of every stdlib module outside EVAL_MODULES, distinct, without any
    text in `exclude` (the evaluation docstrings); every 10th document is held out for early stopping."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)] + stdlib_docstrings(EVAL_MODULES)
    texts = [x for x in dict.fromkeys(texts) if x not in exclude]  # a few texts occur twice: keep them once
    return [x for i, x in enumerate(texts) if i % 10], [x for i, x in enumerate(texts) if not i % 10]


def eval_documents(modules=EVAL_MODULES) -> tuple[list[str], list[str]]:
    """Distinct docstrings (>= 80 characters) of `modules` and of the public classes and functions each defines."""
    seen: set[str] = set()
    docs, used = [], []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        used.append(name)
        objs = [mod] + [vars(mod)[n] for n in sorted(vars(mod)) if not n.startswith("_")]
        for obj in objs:
            if obj is not mod and getattr(obj, "__module__", None) != name:
                continue
            if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            with warnings.catch_warnings():  # typing.io / typing.re warn when their docs are read
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.getdoc(obj)
            if doc and len(doc) >= 80 and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs, used


def ngram_overlap(ids: np.ndarray, train_ids: np.ndarray, n: int = 8) -> float:
    """Share of `ids`' n-grams that also occur in `train_ids` (a leak check between the two texts)."""
    seen = {tuple(train_ids[i : i + n]) for i in range(len(train_ids) - n + 1)}
    return float(np.mean([tuple(ids[i : i + n]) in seen for i in range(len(ids) - n + 1)]))


def token_stream(tok, docs: list[str]) -> np.ndarray:
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(d) + [EOS]
    return np.asarray(ids, np.int32)


# Training --------------------------------------------------------------------------------------------------------
def lm_loss(params, config: ModelConfig, batch: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy; float32 master weights, bfloat16 compute (LayerNorm/softmax/logits float32)."""
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    x, y = batch[:, :-1], batch[:, 1:]  # [B, T]
    pos = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape)
    logits, _ = forward(p16, config, x, pos, None, attend_no_cache)  # [B, T, V] float32
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), y[..., None], axis=-1))


def train(config: ModelConfig, train_ids: np.ndarray, val_ids: np.ndarray, args) -> tuple[dict, dict]:
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
            history.append({"step": i, "train_loss": float(loss), "val_loss": v, "seconds": time.perf_counter() - t0})
            print(f"train step {i:5d}  loss {float(loss):.3f}  val {v:.3f}  {time.perf_counter() - t0:6.1f} s",
                  flush=True)  # fmt: skip
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
    nll, ref_nll, kl, agree = (np.concatenate([np.asarray(p[j], np.float64) for p in parts]) for j in range(4))
    ppl, ref_ppl = float(np.exp(nll.mean())), float(np.exp(ref_nll.mean()))
    return {"ppl": ppl, "ref_ppl": ref_ppl, "delta_ppl_pct": 100 * (ppl / ref_ppl - 1), "mean_kl": float(kl.mean()),
            "top1_agreement": float(agree.mean())}  # fmt: skip


# Driver ----------------------------------------------------------------------------------------------------------
def model_config(args) -> ModelConfig:
    if args.smoke:
        return ModelConfig("jkv-smoke-2x64", vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=2)
    return ModelConfig(f"jkv-trained-{args.n_layer}x{args.n_embd}", vocab_size=50257, n_positions=args.n_positions,
                       n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head)  # fmt: skip


def configurations(args) -> list[tuple[str, str, int | None, str]]:
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
            out.append({"kv": r["label"], "metric": name, "value": value, "target": f"{op} {bound:g}", "hit": hit})
    return out


def fmt_table(rows: list[dict], bf16_bytes: int) -> str:
    head = (f"{'cache':26s} {'attention':9s} {'PPL':>9s} {'ΔPPL %':>8s} {'mean KL':>9s} {'top-1 %':>8s} "
            f"{'B/token':>8s} {'x bf16':>6s} {'tokens/GB':>10s} {'KV/seq MiB':>10s}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['label']:26s} {r['attention']:9s} {r['ppl']:9.3f} {r['delta_ppl_pct']:+8.3f} {r['mean_kl']:9.2e} "
            f"{100 * r['top1_agreement']:8.2f} {r['kv_bytes_per_token']:8d} {r['kv_bytes_per_token'] / bf16_bytes:6.3f} "
            f"{r['tokens_per_gb']:10,d} {r['kv_bytes_per_seq'] / 2**20:10.2f}"
        )  # fmt: skip
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a Hugging Face GPT-2 checkpoint directory (config.json + model.safetensors)")
    src.add_argument("--train", action="store_true", help="train a GPT-2-architecture model first (the default)")
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps, few sequences: a CPU test in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-layer", type=int, default=6, help="trained model: layers")
    p.add_argument("--n-embd", type=int, default=384, help="trained model: width")
    p.add_argument("--n-head", type=int, default=6, help="trained model: heads (head_dim 64 suits the kernels)")
    p.add_argument("--n-positions", type=int, default=512, help="trained model: context")
    p.add_argument("--steps", type=int, default=2000, help="most training steps (early stopping may end sooner)")
    p.add_argument("--batch", type=int, default=16, help="training sequences per step")
    p.add_argument("--train-seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--patience", type=int, default=8, help="evaluations without improvement before stopping")
    p.add_argument("--max-train-seconds", type=float, default=90.0)
    p.add_argument("--num-seqs", type=int, default=64, help="held-out sequences scored")
    p.add_argument("--prefix", type=int, default=64, help="tokens prefilled into the cache")
    p.add_argument("--continuation", type=int, default=384, help="tokens scored through decode steps")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-dtypes", default="bfloat16,int8,float8_e4m3fn,int4")
    p.add_argument("--windows", default="128,256", help="sliding windows to score with a bfloat16 cache")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the bf16 cache with jnp attention (the measurement's noise floor)")  # fmt: skip
    p.add_argument("--json", help="write results here (default: $OUT/kv_quality.json when $OUT is set)")
    args = p.parse_args(argv)
    if args.smoke:
        # Tiny everything; explicit options given after --smoke do not override these.
        args.steps, args.batch, args.train_seq_len, args.eval_every, args.warmup = 4, 2, 32, 2, 1
        args.num_seqs, args.prefix, args.continuation, args.block_size, args.windows = 2, 8, 8, 4, "8"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), JAX {jax.__version__}, Python {platform.python_version()}",
          flush=True)  # fmt: skip
    if args.model:
        model = jkv.load_model(args.model, dtype="bfloat16")
        tok = jkv.get_tokenizer(args.model)
        train_info, train_ids = None, None
        model_desc = {"source": str(args.model), "kind": "checkpoint"}
    else:
        tok = jkv.get_tokenizer()
        config = model_config(args)
        tr_docs, va_docs = train_documents(set(eval_documents()[0]))
        train_ids, val_ids = token_stream(tok, tr_docs), token_stream(tok, va_docs)
        print(f"training {config.name}: {len(train_ids):,} tokens ({len(tr_docs)} documents: pydoc_data.topics and "
              f"docstrings of the stdlib outside the evaluation modules), {len(val_ids):,} held out for early "
              "stopping", flush=True)  # fmt: skip
        params, train_info = train(config, train_ids, val_ids, args)
        model = Model(config, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), jnp.bfloat16, "trained")
        model_desc = {"source": "trained here", "kind": "trained", "config": {
            k: getattr(config, k) for k in ("name", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head")}}
    config = model.config

    docs, modules = eval_documents()
    ids = token_stream(tok, docs)
    t = args.prefix + args.continuation
    if t > config.n_positions:
        raise SystemExit(f"--prefix + --continuation = {t} exceeds the model's {config.n_positions} positions.")
    n = min(args.num_seqs, len(ids) // t)
    seqs = ids[: n * t].reshape(n, t)
    targets = seqs[:, args.prefix :]
    text_desc = {"source": "docstrings (inspect.getdoc) of stdlib modules and their public classes/functions",
                 "modules": modules, "docstrings": len(docs), "tokens_available": int(len(ids)),
                 "sha256_of_token_ids": hashlib.sha256(ids.tobytes()).hexdigest()[:16], "sequences": n,
                 "prefix": args.prefix, "continuation": args.continuation, "tokens_scored": int(targets.size)}  # fmt: skip
    if train_ids is not None:
        text_desc["8gram_overlap_with_training_text"] = ngram_overlap(seqs.reshape(-1), np.concatenate([train_ids, val_ids]))
    print(f"scoring {n} held-out sequences ({len(docs)} docstrings of {len(modules)} modules): prefix "
          f"{args.prefix} prefilled, {args.continuation} tokens teacher-forced through the cache", flush=True)  # fmt: skip

    from jkv.runner import resolve_backend

    bf16_bytes = kv_bytes_per_token(config, kv_dtype("bfloat16"))
    path = args.json or (os.path.join(os.environ["OUT"], "kv_quality.json") if os.environ.get("OUT") else None)
    rows, ref_logp = [], None
    result = {
        "date": datetime.date.today().isoformat(), "device": dev.device_kind, "backend": jax.default_backend(),
        "jax": jax.__version__, "python": platform.python_version(), "command": " ".join(sys.argv),
        "smoke": args.smoke, "seed": args.seed, "block_size": args.block_size, "model": model_desc,
        "training": train_info, "eval_text": text_desc, "rows": rows,
    }  # fmt: skip
    for label, kv, window, attention in configurations(args):
        t0 = time.perf_counter()
        try:
            logp = score_through_cache(model, seqs, args.prefix, kv_dtype=kv, block_size=args.block_size,
                                       sliding_window=window, attention=attention)  # fmt: skip
        except Exception as err:  # one failing configuration (a kernel that does not lower) must not lose the rest
            if attention != "auto":
                raise
            print(f"  {label}: {type(err).__name__}: {str(err)[:300]} -- retrying with the jnp reference attention",
                  flush=True)  # fmt: skip
            attention = "reference"
            logp = score_through_cache(model, seqs, args.prefix, kv_dtype=kv, block_size=args.block_size,
                                       sliding_window=window, attention=attention)  # fmt: skip
        if ref_logp is None:
            ref_logp = logp
        m = summarize(logp, ref_logp, targets)
        per_tok = kv_bytes_per_token(config, kv_dtype(kv))
        row = {"label": label, "kv_dtype": kv, "sliding_window": window,
               "attention": resolve_backend(attention, config.head_dim, args.block_size, kv), **m,
               "kv_bytes_per_token": per_tok, "tokens_per_gb": int(1e9 // per_tok),
               "kv_bytes_per_seq": blocks_for_tokens(t, args.block_size, window) * args.block_size * per_tok,
               "seconds": time.perf_counter() - t0}  # fmt: skip
        rows.append(row)
        print(f"  {label:26s} ppl {m['ppl']:.3f}  ΔPPL {m['delta_ppl_pct']:+.3f}%  KL {m['mean_kl']:.2e}  "
              f"top-1 {100 * m['top1_agreement']:.2f}%  ({row['seconds']:.1f} s)", flush=True)  # fmt: skip
        del logp
        if path:  # after every row, so a run cut short still leaves what it measured
            Path(path).write_text(json.dumps(result, indent=1))

    targets_out = check_targets(rows, bf16_bytes)
    result |= {"targets": targets_out, "seconds_total": time.perf_counter() - t_start}
    if path:
        Path(path).write_text(json.dumps(result, indent=1))
    print("\ntargets (issue 6):")
    for c in targets_out:
        print(f"  {c['kv']:14s} {c['metric']:18s} {c['value']:.4g} {c['target']:9s} {'hit' if c['hit'] else 'MISS'}")
    print(f"\nKV cache quality through the cache, reference = bfloat16 cache; {text_desc['tokens_scored']:,} tokens "
          f"scored; {dev.device_kind}, JAX {jax.__version__}, {result['date']}:\n")  # fmt: skip
    print(fmt_table(rows, bf16_bytes))
    return result


if __name__ == "__main__":
    main()
