"""A plan as a JSON-ready dict (the public contract of `plan.py --json`) and as a readable rich report."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from kvspec.params import kv_heads_per_device
from planner import explain
from planner.plan import Plan, expected_fragmentation
from planner.units import human_bytes

GROWTH_NOTE = (
    "The KV cache grows linearly with sequence length, batch and depth (bytes/token x tokens). What grows "
    "quadratically with sequence length is the score workspace of a naive prefill (B*H*T^2 floats); jkv's paged "
    "attention never materializes it."
)


def plan_to_dict(plan: Plan) -> dict:
    """Every figure of the plan; keys listed in DESIGN.md's public contracts are always present."""
    c, o, lay = plan.config, plan.options, plan.layout
    return {
        "model": c.name,
        "model_type": c.model_type,
        "preset": c.preset,  # shapes from a packaged public config, no weights
        "dtype": o.dtype,
        "kv_dtype": lay.kv.name,
        "tp": o.tp,
        "hbm_bytes": o.hbm_bytes,
        "utilization": o.utilization,
        "budget_bytes": plan.budget_bytes,
        "param_count": c.param_count,
        "param_bytes": plan.param_bytes,
        "activation_bytes": plan.activation_bytes,
        "activation_terms": {
            w.name: {
                "tokens": w.tokens, "sequences": w.sequences, "logits": w.logits, "temp": w.temp,
                "running": w.running, "autotune": w.autotune, "floor": w.floor, "total": w.total,
            }
            for w in plan.workspaces
        },  # fmt: skip
        "reserve_bytes": plan.reserve_bytes,
        "kv_pool_bytes": plan.kv_pool_bytes,
        "peak_bytes": plan.peak_bytes,
        "unused_bytes": plan.unused_bytes,
        "kv_bytes_per_token": lay.bytes_per_token,
        "kv_formula": explain.kv_formula(plan),
        "kv_bytes_per_token_by_layer_kind": explain.layer_kinds(plan),
        "kv_cache": {
            "kind": "mla_latent" if c.mla is not None else "k_and_v",
            "pools_per_layer": lay.pools_per_layer,
            "heads": c.cache_heads,
            "heads_per_device": kv_heads_per_device(c, o.tp),
            "replicated": c.mla is not None or c.kv_heads < o.tp,
            "head_dim": c.cache_head_dim,
        },
        "mla": explain.mla(plan),
        "moe": None if c.moe is None else {
            "num_experts": c.moe.num_experts, "experts_per_token": c.moe.experts_per_token,
            "expert_dim": c.moe.expert_dim, "shared_expert_dim": c.moe.shared_expert_dim,
            "moe_layers": sum(c.moe.sparse_layers),
        },
        "embedding_tp": "vocab_parallel",
        "calibrated_for_family": explain.calibration_note(plan) is None,
        "block_size": lay.block_size,
        "bytes_per_block": lay.bytes_per_block,
        "num_blocks": lay.num_blocks,
        "usable_blocks": lay.usable_blocks,
        "null_block": 0,
        "kv_tokens": plan.kv_tokens,
        "pool_shape": list(lay.pool_shape),
        "layer_pool_shape": list(lay.layer_pool_shape),
        "scale_shape": list(lay.scale_shape) if lay.scale_shape else None,
        "head_block_bytes": lay.head_block_bytes,
        "token_row_bytes": lay.token_row_bytes,
        "rows_line_aligned": lay.rows_line_aligned,
        "max_seq_len": plan.max_seq_len,
        "sliding_window": c.sliding_window,
        "layer_windows": list(c.layer_windows),
        "max_num_seqs": plan.max_num_seqs,
        "prefill_chunk": plan.options.prefill_chunk,  # the prefill token budget asked for
        "prefill_step_positions": plan.workspaces[0].tokens,  # what the plan prices: the padded prefill step
        "max_batch_by_seq_len": {str(x.seq_len): x.paged for x in plan.by_seq_len},
        "static_max_batch_by_seq_len": {str(x.seq_len): x.static for x in plan.by_seq_len},
        "fragmentation_by_seq_len": {str(x.seq_len): x.fragmentation for x in plan.by_seq_len},
        "static_waste_by_seq_len": {str(x.seq_len): x.static_waste for x in plan.by_seq_len},
        "blocks_per_seq_by_seq_len": {str(x.seq_len): x.blocks_per_seq for x in plan.by_seq_len},
        "seq_lens": list(o.seq_lens) if o.seq_lens else None,
        "seq_lens_fragmentation": expected_fragmentation(lay.block_size, seq_lens=o.seq_lens) if o.seq_lens else None,
        "max_context_by_batch": {str(x.batch): x.paged for x in plan.by_batch},
        "static_max_context_by_batch": {str(x.batch): x.static for x in plan.by_batch},
        "note": GROWTH_NOTE,
    }


def _ws_limit(ws) -> str:
    """Which of the step's three limits sets its workspace (planner.memory.StepWorkspace)."""
    if ws.total == ws.running:
        return f"running it: logits {human_bytes(ws.logits)} + scratch {human_bytes(ws.temp)}"
    if ws.total == ws.autotune:
        return "compiling it: XLA's autotuning of the lm-head GEMM"
    return "the least measured (XLA autotuning floor)"


def _b(n: int) -> str:
    return f"{n:,} B ({human_bytes(n)})"


def print_report(plan: Plan, console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 120))
    c, o, lay = plan.config, plan.options, plan.layout
    window = f", sliding window {c.sliding_window}" if c.sliding_window and not c.hybrid_attention else ""
    heads = "MLA latent" if c.mla is not None else f"{c.kv_heads} KV heads x {c.head_dim}"
    console.print(
        f"[bold]jkv plan[/bold]: {c.name} ({c.model_type}; {c.param_count:,} parameters, {c.n_layer} layers, "
        f"{c.n_head} heads, {heads}{window}) on {_b(o.hbm_bytes)}"
        + (f" per device, tp={o.tp}" if o.tp > 1 else "")
    )
    if c.preset:
        console.print(f"[dim]{c.name} is a preset: the shapes of its public config.json, no weights.[/dim]")
    console.print(f"weights {o.dtype}, KV cache {lay.kv.name}, utilization {o.utilization}")
    console.print(f"KV cache: {explain.kv_formula(plan)}")
    for line in (explain.windows_text(plan), explain.mla_text(plan), *explain.tp_notes(plan)):
        if line:
            console.print(f"  {line}.")

    peak = Table(title="Peak memory, term by term", title_justify="left")
    peak.add_column("term")
    peak.add_column("bytes", justify="right")
    peak.add_column("human", justify="right")
    peak.add_column("how")
    ws = max(plan.workspaces, key=lambda w: w.total)
    rows = [
        ("parameters", plan.param_bytes, explain.params_how(plan)),
        ("KV pool", plan.kv_pool_bytes, f"{lay.num_blocks:,} blocks x {lay.bytes_per_block:,} B"),
        ("activation workspace", plan.activation_bytes,
         f"largest step: {ws.name}, {ws.tokens} tokens / {ws.sequences} seqs; {_ws_limit(ws)}"),
        ("runtime reserve", plan.reserve_bytes,
         "outside JAX's pool: CUDA context, kernels" + (" (default)" if o.reserve_bytes is None else " (--reserve)")),
    ]  # fmt: skip
    for name, n, how in rows:
        peak.add_row(name, f"{n:,}", human_bytes(n), how)
    peak.add_row("[bold]planned peak[/bold]", f"{plan.peak_bytes:,}", human_bytes(plan.peak_bytes), "")
    peak.add_row("budget", f"{plan.budget_bytes:,}", human_bytes(plan.budget_bytes), f"HBM x {o.utilization}")
    console.print(peak)

    layout = Table(title="KV block layout", title_justify="left")
    layout.add_column("item")
    layout.add_column("value", justify="right")
    scale = f", scales {list(lay.scale_shape)} float16" if lay.scale_shape else ""
    for name, value in [
        ("KV bytes per token (K+V, all layers)", f"{lay.bytes_per_token:,} B"),
        ("tokens per block", f"{lay.block_size}"),
        ("bytes per block (all layers)", f"{lay.bytes_per_block:,} B"),
        ("k_pool / v_pool shape", f"{list(lay.pool_shape)}{scale}"),
        ("one head's block tile", f"{lay.head_block_bytes:,} B ({'whole' if lay.rows_line_aligned else 'not whole'} 128-B lines)"),
        ("blocks (block 0 = null block)", f"{lay.num_blocks:,} ({lay.usable_blocks:,} usable)"),
        ("KV capacity", f"{plan.kv_tokens:,} tokens"),
        ("engine batch cap (max_num_seqs)", f"{plan.max_num_seqs:,}"),
    ]:  # fmt: skip
        layout.add_row(name, value)
    console.print(layout)

    lim = Table(title="Concurrent sequences by length: paged vs static (each reserves max length)", title_justify="left")
    for col in ("length", "blocks/seq", "paged", "static", "paging gain", "paged frag.", "static waste"):
        lim.add_column(col, justify="right")
    for x in plan.by_seq_len:
        gain = f"{x.paged / x.static:.1f}x" if x.static else "n/a"
        per_seq = f"{x.blocks_per_seq:g}" if x.blocks_per_seq == int(x.blocks_per_seq) else f"{x.blocks_per_seq:.2f}"
        lim.add_row(str(x.seq_len), per_seq, f"{x.paged:,}", f"{x.static:,}", gain,
                    f"{x.fragmentation:.1%}", f"{x.static_waste:.1%}")  # fmt: skip
    console.print(lim)

    ctx = Table(title="Longest context by batch size", title_justify="left")
    for col in ("batch", "paged", "static"):
        ctx.add_column(col, justify="right")
    for x in plan.by_batch:
        ctx.add_row(str(x.batch), f"{x.paged:,}" if x.paged else "does not fit",
                    f"{x.static:,}" if x.static else "does not fit")  # fmt: skip
    console.print(ctx)
    if o.seq_lens:
        frag = expected_fragmentation(lay.block_size, seq_lens=o.seq_lens)
        console.print(f"Your {len(o.seq_lens)} lengths together: {frag:.1%} of their allocated slots hold no token.")
    note = explain.calibration_note(plan)
    if note:
        console.print(f"[yellow]{note}[/yellow]")
    console.print(f"[dim]{GROWTH_NOTE}[/dim]")
