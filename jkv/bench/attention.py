"""jkv's paged decode attention against every JAX alternative, on one card: each checked against
`paged_decode_attention_reference`, then timed (scripts/bench_attention.py's docstring gives the method).

  jkv        pallas_kernels.paged_decode_attention (bf16 pages; int8 pages + float16 scales; packed int4 pages +
             float16 scales per 32 elements)
  jax        jax.experimental.pallas.ops.gpu.paged_attention, best of a few configurations
  xla        dense XLA attention (einsum + softmax) on a contiguous [B, Hkv, T, D] cache
  copy       a large device-to-device copy: the bandwidth ceiling (bytes read + written / time)

`bench_shape` is one row of the table, `tune` sweeps kernel configurations at a few shapes, `block_size_sweep`
block sizes 8..64. `set_interpret` and `set_time_budget` configure the process's runs.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import int4_groups, quantize_pages
from pallas_kernels.paged_decode import (
    _decode_pallas_call,
    choose_splits,
    paged_decode_attention,
    paged_decode_attention_reference,
    tuned_config,
)

MODELS = {"gpt2": (12, 12, 64), "gqa": (32, 8, 128)}  # (q heads, kv heads, head_dim)
QUANT_KINDS = ("int8", "int4")  # quantized page kinds of the table; quantize_pages(x, jnp.int4) packs int4
MAX_KERNEL_ERR = 3e-2  # relative L2 error vs the reference above which an implementation is not timed
SHAPES = [(8, 1024), (32, 1024), (32, 4096), (64, 8192), (128, 2048)]
L2_DEFEAT_BYTES = 160 << 20  # K/V copies rotated so that a call finds nothing of its inputs in L2
N_Q = 16  # distinct query arrays (>= calls per timed function)
KW: dict = {}  # {"interpret": True} under --interpret (a CPU smoke test of this script, tiny shapes)
JAX_CONFIGS = [  # (pages_per_compute_block, k_splits, num_warps, num_stages)
    (8, 16, 8, 2),  # upstream defaults
    (16, 16, 4, 2),
    (8, 4, 4, 2),
    (4, 16, 4, 3),
    (16, 4, 8, 2),
]


DEADLINE = [float("inf")]  # --time-budget: optional sweeps stop starting new work after this


def set_interpret(interpret: bool) -> None:
    """Run every kernel in Pallas interpret mode (a CPU smoke test of the benchmark, tiny shapes)."""
    KW.clear()
    if interpret:
        KW["interpret"] = True


def set_time_budget(seconds: float | None) -> None:
    """Optional sweeps stop starting new work `seconds` from now (None: no limit)."""
    DEADLINE[0] = float("inf") if seconds is None else time.perf_counter() + seconds


def over_budget() -> bool:
    return time.perf_counter() > DEADLINE[0]


def log(*a):
    print(*a, flush=True)


def time_per_call(fn, qs, kvs, reps: int = 15) -> float:
    """Seconds per call of fn(q, *kv).

    One jitted function makes n dependent calls (an optimization barrier ties call i's query to call i-1's output,
    so XLA can neither merge nor reorder them), rotating over the K/V copies; it is timed once and three times
    back to back (asynchronous dispatch keeps the GPU busy), and the difference of the medians / 2n is per call.
    """
    n_sets = len(kvs)
    n = n_sets * max(1, math.ceil(12 / n_sets))
    assert len(qs) >= n

    @jax.jit
    def multi(qs, kvs):
        outs, prev = [], None
        for i in range(n):
            q = qs[i]
            if prev is not None:
                q, _ = jax.lax.optimization_barrier((q, prev))
            prev = fn(q, *kvs[i % n_sets])
            outs.append(prev)
        return outs

    args = (qs[:n], kvs)
    jax.block_until_ready(multi(*args))  # compile + warm up
    jax.block_until_ready(multi(*args))

    def once(k):
        t0 = time.perf_counter()
        jax.block_until_ready([multi(*args) for _ in range(k)])
        return time.perf_counter() - t0

    diffs = []
    for _ in range(reps):  # paired: a spike in one sample moves one difference, not a whole median
        t1 = once(1)
        diffs.append(once(3) - t1)
    return max(statistics.median(diffs), 1e-9) / (2 * n)


def measure_copy(nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth, bytes read + written per second, over a chain of copies of an nbytes buffer."""
    x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.bfloat16)

    def chain(n):
        @jax.jit
        def f(x):
            for _ in range(n):
                x = jax.lax.optimization_barrier(-x)
            return x

        return f

    def med(n):
        f = chain(n)
        jax.block_until_ready(f(x))
        ts = []
        for _ in range(10):
            t0 = time.perf_counter()
            jax.block_until_ready(f(x))
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    t = (med(12) - med(4)) / 8
    return 2 * nbytes / t


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


class Shape:
    def __init__(self, model, batch, ctx, block_size=16, seed=0):
        self.model, self.batch, self.ctx, self.bs = model, batch, ctx, block_size
        self.h, self.hkv, self.d = MODELS[model]
        self.m = ctx // block_size
        self.num_blocks = batch * self.m + 1
        self.seed = seed

    def kv_bytes(self, itemsize: float, scale_bytes: int = 0) -> int:
        """K and V bytes of the whole context: itemsize per element (0.5 for int4) plus scale bytes per row."""
        return int(2 * self.batch * self.ctx * self.hkv * (self.d * itemsize + scale_bytes))

    def quant_bytes(self, kind: str) -> int:
        """Bytes a quantized call reads: int8 rows of D bytes + one float16 scale; int4 rows of D/2 bytes + one
        float16 scale per 32 elements."""
        return self.kv_bytes(1, 2) if kind == "int8" else self.kv_bytes(0.5, 2 * int4_groups(self.d))

    def n_sets(self, nbytes):
        return int(min(6, max(2, math.ceil(L2_DEFEAT_BYTES / nbytes))))

    def label(self):
        return f"{self.model} {self.batch}x{self.ctx // 1024}k"

    def make(self, n_sets, n_q, dtype=jnp.bfloat16):
        key = jax.random.key(self.seed)
        kq, kt, *kk = jax.random.split(key, 2 + 2 * n_sets)
        qs = [
            jax.random.normal(k, (self.batch, self.h, self.d), jnp.bfloat16)
            for k in jax.random.split(kq, n_q)
        ]
        shape = (self.num_blocks, self.hkv, self.bs, self.d)
        pools = []
        for i in range(n_sets):
            perm = jax.random.permutation(
                jax.random.fold_in(kt, i), jnp.arange(1, self.num_blocks, dtype=jnp.int32)
            )
            tables = perm.reshape(self.batch, self.m)
            k = jax.random.normal(kk[2 * i], shape, jnp.bfloat16)
            v = jax.random.normal(kk[2 * i + 1], shape, jnp.bfloat16)
            pools.append((k, v, tables))
        lengths = jnp.full((self.batch,), self.ctx, jnp.int32)
        return qs, pools, lengths


def bench_shape(sh: Shape, copy_bw: float, quant_kinds: tuple[str, ...], do_jax: bool, do_xla: bool) -> dict:
    res = {"shape": sh.label(), "batch": sh.batch, "ctx": sh.ctx, "model": sh.model}
    nbytes = sh.kv_bytes(2)
    n_sets = sh.n_sets(nbytes)
    qs, pools, lengths = sh.make(n_sets, N_Q)
    k0, v0, t0 = pools[0]
    ref = paged_decode_attention_reference(qs[0], k0, v0, t0, lengths)

    # jkv bf16
    out = paged_decode_attention(qs[0], k0, v0, t0, lengths, **KW)
    res["jkv_err"] = rel_err(out, ref)
    kvs = [(k, v, t, lengths) for k, v, t in pools]
    t = time_per_call(lambda q, k, v, tb, ln: paged_decode_attention(q, k, v, tb, ln, **KW), qs, kvs)
    res["jkv_us"] = t * 1e6
    res["jkv_bw"] = nbytes / t

    for kind in quant_kinds:  # int8 / int4 pages quantized from the same bf16 pools
        qp = []
        for k, v, tb in pools:
            kd, ks = quantize_pages(k, jnp.dtype(kind))
            vd, vs = quantize_pages(v, jnp.dtype(kind))
            qp.append((kd, vd, tb, lengths, ks, vs))
        kd, vd, tb, _, ks, vs = qp[0]
        ref_q = paged_decode_attention_reference(qs[0], kd, vd, tb, lengths, k_scales=ks, v_scales=vs)
        out_q = paged_decode_attention(qs[0], kd, vd, tb, lengths, k_scales=ks, v_scales=vs, **KW)
        res[f"{kind}_err"] = rel_err(out_q, ref_q)
        res[f"{kind}_vs_bf16_err"] = rel_err(out_q, ref)
        if res[f"{kind}_err"] > MAX_KERNEL_ERR:
            log(f"  jkv {kind}: wrong (err {res[f'{kind}_err']:.2e} vs the reference), not timed")
            del qp
            continue
        tq = time_per_call(
            lambda q, k, v, tb, ln, ks, vs: paged_decode_attention(q, k, v, tb, ln, k_scales=ks, v_scales=vs, **KW),
            qs, qp,
        )  # fmt: skip
        res[f"{kind}_us"] = tq * 1e6
        res[f"{kind}_bw"] = sh.quant_bytes(kind) / tq
        del qp

    if do_jax:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
        jpools = [(k.transpose(1, 0, 2, 3), v.transpose(1, 0, 2, 3), tb, lengths) for k, v, tb in pools]
        qs_scaled = [q * (1 / math.sqrt(sh.d)) for q in qs]  # upstream's kernel applies no softmax scale
        best = None
        for ppcb, ksp, nw, ns in JAX_CONFIGS:
            if sh.m % ksp or (sh.m // ksp) % min(ppcb, sh.m // ksp):
                continue
            fn = functools.partial(
                paged_attention,
                block_h=16,
                pages_per_compute_block=ppcb,
                k_splits=ksp,
                num_warps=nw,
                num_stages=ns,
                **KW,
            )
            try:
                err = rel_err(fn(qs_scaled[0], *jpools[0]), ref)
                if err > 3e-2:
                    log(f"  jax config {(ppcb, ksp, nw, ns)}: wrong (err {err:.2e}), skipped")
                    continue
                tj = time_per_call(lambda q, k, v, tb, ln, fn=fn: fn(q, k, v, tb, ln), qs_scaled, jpools)
            except Exception as e:  # noqa: BLE001 - report and keep going
                log(f"  jax config {(ppcb, ksp, nw, ns)} failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            log(
                f"  jax config ppcb={ppcb} k_splits={ksp} warps={nw} stages={ns}: {tj * 1e6:.1f} us err {err:.1e}"
            )
            if best is None or tj < best[0]:
                best = (tj, (ppcb, ksp, nw, ns), err)
        del jpools
        if best:
            res["jax_us"], res["jax_cfg"], res["jax_err"] = best[0] * 1e6, best[1], best[2]
            res["jax_bw"] = nbytes / best[0]

    if do_xla:
        g = sh.h // sh.hkv
        scale = 1 / math.sqrt(sh.d)

        @jax.jit
        def xla_attn(q, k, v, ln):  # k, v: [B, Hkv, T, D] contiguous
            qg = q.reshape(sh.batch, sh.hkv, g, sh.d)
            s = jnp.einsum("bkgd,bktd->bkgt", qg, k, preferred_element_type=jnp.float32) * scale
            mask = jnp.arange(k.shape[2])[None, :] < ln[:, None]
            s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
            p = jax.nn.softmax(s, axis=-1)
            o = jnp.einsum("bkgt,bktd->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            return o.reshape(sh.batch, sh.h, sh.d).astype(q.dtype)

        def dense(pages, tb):
            x = pages[tb]  # [B, M, Hkv, bs, D]
            return x.transpose(0, 2, 1, 3, 4).reshape(sh.batch, sh.hkv, sh.ctx, sh.d)

        cpools = [(dense(k, tb), dense(v, tb), lengths) for k, v, tb in pools]
        res["xla_err"] = rel_err(xla_attn(qs[0], *cpools[0]), ref)
        tx = time_per_call(xla_attn, qs, cpools)
        res["xla_us"], res["xla_bw"] = tx * 1e6, nbytes / tx
        del cpools

    for k in ("jkv", *QUANT_KINDS, "jax", "xla"):
        if f"{k}_bw" in res:
            res[f"{k}_pct"] = 100 * res[f"{k}_bw"] / copy_bw
    return res


TUNE_PLAN = [  # (model, batch, ctx, page dtype, tokens_per_step, warps, stages, splits, dots?); None = default
    ("gpt2", 32, 4096, "int8", (128, 256), (4,), (2, 3), (None,), (True,)),
    ("gpt2", 64, 8192, "bfloat16", (64,), (2,), (4,), (None,), (False,)),
    ("gqa", 32, 4096, "int8", (128,), (4, 8), (2,), (None,), (None,)),
    ("gpt2", 32, 4096, "bfloat16", (64, 128, 256), (2, 4, 8), (2, 3, 4), (None,), (None,)),
    ("gqa", 32, 4096, "bfloat16", (32, 64, 128), (4, 8), (2, 3, 4), (None,), (None,)),
    (
        "gpt2",
        32,
        4096,
        "int4",
        (32, 64, 128),
        (2, 4),
        (2, 3, 4),
        (None,),
        (False, True),
    ),  # TUNING "int4" rows
    ("gqa", 32, 4096, "int4", (32, 64, 128), (4, 8), (2, 3), (None,), (None,)),
]


def tune(copy_bw: float):
    """Sweep tokens_per_step x num_warps x num_stages (and context splits) at a few shapes; None = the default."""
    rows = []
    for model, batch, ctx, dtype, t_opts, w_opts, st_opts, sp_opts, dot_opts in TUNE_PLAN:
        if over_budget():
            break
        sh = Shape(model, batch, ctx)
        quant = dtype in QUANT_KINDS
        nbytes = sh.quant_bytes(dtype) if quant else sh.kv_bytes(2)
        n_sets = sh.n_sets(nbytes)
        qs, pools, lengths = sh.make(n_sets, N_Q)
        if quant:
            kvs = []
            for k, v, tb in pools:
                (kd, ks), (vd, vs) = quantize_pages(k, jnp.dtype(dtype)), quantize_pages(v, jnp.dtype(dtype))
                kvs.append((kd, vd, tb, lengths, ks, vs))
        else:
            kvs = [(k, v, tb, lengths, None, None) for k, v, tb in pools]
        del pools
        ref = paged_decode_attention_reference(qs[0], *kvs[0][:4], k_scales=kvs[0][4], v_scales=kvs[0][5])
        # The pages' own dtype keys the table (uint8 for packed int4).
        d_t, d_w, d_st, d_dot = tuned_config(kvs[0][0].dtype, sh.h // sh.hkv, sh.d)
        for t in t_opts:
            for w in w_opts:
                for st in st_opts:
                    for sp, dot in ((sp, dot) for sp in sp_opts for dot in dot_opts):
                        if over_budget():
                            break
                        tt_, ww, ss = t or d_t, w or d_w, st or d_st
                        splits = sp or choose_splits(sh.batch, sh.hkv, sh.ctx, tt_)
                        fn = functools.partial(
                            _decode_pallas_call, scale=1 / math.sqrt(sh.d), sliding_window=None,
                            tokens_per_step=tt_, num_splits=splits, num_warps=ww, num_stages=ss,
                            interpret=bool(KW), debug=False, use_dot=d_dot if dot is None else dot,
                        )  # fmt: skip
                        dot = d_dot if dot is None else dot
                        tag = f"{sh.label()} {dtype} T={tt_} w={ww} st={ss} S={splits}" + (
                            " dot" if dot else " lane"
                        )
                        try:
                            err = rel_err(fn(qs[0], *kvs[0]), ref)
                            tm = time_per_call(lambda q, *a, fn=fn: fn(q, *a), qs, kvs, reps=9)
                        except Exception as e:  # noqa: BLE001
                            log(f"  {tag}: FAILED {type(e).__name__}: {str(e)[:300]}")
                            continue
                        row = dict(
                            shape=sh.label(),
                            dtype=dtype,
                            T=tt_,
                            warps=ww,
                            stages=ss,
                            splits=splits,
                            dot=dot,
                            us=tm * 1e6,
                            pct=100 * nbytes / tm / copy_bw,
                            err=err,
                        )
                        rows.append(row)
                        log(f"  {tag}: {tm * 1e6:8.1f} us {row['pct']:5.1f}% of copy err {err:.1e}")
        del kvs
    return rows


def block_size_sweep(copy_bw: float):
    rows = []
    for model in ("gpt2", "gqa"):
        for bs in (8, 16, 32, 64):
            if over_budget():
                break
            sh = Shape(model, 32, 4096, block_size=bs)
            nbytes = sh.kv_bytes(2)
            n_sets = sh.n_sets(nbytes)
            qs, pools, lengths = sh.make(n_sets, N_Q)
            ref = paged_decode_attention_reference(qs[0], *pools[0][:3], lengths)
            err = rel_err(paged_decode_attention(qs[0], *pools[0][:3], lengths, **KW), ref)
            kvs = [(k, v, tb, lengths) for k, v, tb in pools]
            tt = time_per_call(lambda q, k, v, tb, ln: paged_decode_attention(q, k, v, tb, ln, **KW), qs, kvs)
            rows.append(
                dict(shape=sh.label(), block_size=bs, us=tt * 1e6, pct=100 * nbytes / tt / copy_bw, err=err)
            )
            log(f"  {sh.label()} block {bs}: {tt * 1e6:.1f} us {rows[-1]['pct']:.1f}% of copy err {err:.1e}")
            del pools, kvs
    return rows
