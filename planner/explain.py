"""The plan in words: each family's KV formula, its windowed layers, MLA's saving and the tensor-parallel split.

Shared by the JSON contract (planner.report.plan_to_dict) and the human report, so both say the same thing.
"""

from __future__ import annotations

from kvspec.config import ModelConfig
from kvspec.layout import cache_row_bytes, layer_bytes_per_token, window_groups
from kvspec.params import kv_heads_per_device
from planner.memory import CALIBRATED_FAMILIES, CHECKED_FAMILIES
from planner.plan import Plan


def _row_words(config: ModelConfig, plan: Plan) -> str:
    kv = plan.layout.kv
    d = f"({config.mla.kv_lora_rank} + {config.mla.qk_rope_head_dim})" if config.mla else config.cache_head_dim
    bits = kv.bits
    element = f"{bits // 8} B" if bits >= 8 else f"{bits / 8:g} B"
    if not kv.quantized:
        return f"{d} x {element}"
    groups = kv.scale_groups(config.cache_head_dim)
    scale = "a 2 B scale" if groups == 1 else f"{groups} x 2 B scales"
    return f"({d} x {element} + {scale})"


def kv_formula(plan: Plan) -> str:
    """`2 (K and V) x 32 layers x 8 KV heads x 128 x 2 B = 131,072 B per token`, per device under tp."""
    c, tp = plan.config, plan.options.tp
    heads = kv_heads_per_device(c, tp)
    if c.mla is not None:
        lead = f"{c.n_layer} layers x 1 latent (kv_lora_rank + qk_rope_head_dim)"
    else:
        kind = "KV head" if heads == 1 else "KV heads"
        split = f" ({c.kv_heads} / tp {tp}{', replicated' if c.kv_heads < tp else ''})" if tp > 1 else ""
        lead = f"2 (K and V) x {c.n_layer} layers x {heads} {kind}{split}"
    return f"{lead} x {_row_words(c, plan)} = {plan.layout.bytes_per_token:,} B per token"


def layer_kinds(plan: Plan) -> dict[str, dict]:
    """Per attention kind: its layers, window and bytes per token (a sliding layer's count stops at its window)."""
    c = plan.config
    per_layer = layer_bytes_per_token(c, plan.layout.kv, plan.options.tp)
    kinds: dict[str, dict] = {}
    for window in window_groups(c):
        layers = [i for i, w in enumerate(c.layer_windows) if w == window]
        kinds["full_attention" if window is None else "sliding_attention"] = {
            "layers": layers,
            "window": window,
            "bytes_per_token": per_layer * len(layers),
        }
    return kinds


def _ranges(indices: list[int]) -> str:
    parts, start = [], None
    for i, n in enumerate(indices):
        start = n if start is None else start
        if i + 1 == len(indices) or indices[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(parts)


def windows_text(plan: Plan) -> str | None:
    """Which layers are windowed, and what a windowed layer holds at most."""
    bs = plan.layout.block_size
    kinds = layer_kinds(plan)
    sliding = kinds.get("sliding_attention")
    if sliding is None:
        return None
    w = sliding["window"]
    cap = -(-w // bs) + 1
    held = f"each holds at most the last {w:,} tokens (ceil({w}/{bs}) + 1 = {cap} blocks per sequence)"
    full = kinds.get("full_attention")
    if full is None:
        return f"every layer is windowed (sliding window {w:,}): {held}"
    return (
        f"{len(sliding['layers'])} sliding layers (window {w:,}; layers {_ranges(sliding['layers'])}) {held}; "
        f"{len(full['layers'])} full-attention layers ({_ranges(full['layers'])}) hold every token. Limits assume an "
        "allocator that frees a sliding layer's blocks behind its window, as vLLM's hybrid allocator does"
    )


def mla(plan: Plan) -> dict | None:
    """MLA's latent against the K/V the same heads would cache without it."""
    c = plan.config
    if c.mla is None:
        return None
    m = c.mla
    full_elements = c.n_head * (m.qk_head_dim + m.v_head_dim)  # per layer per token: K heads and V heads
    full_bytes = c.n_layer * full_elements * plan.layout.kv.bits // 8
    latent_bytes = c.n_layer * cache_row_bytes(c, plan.layout.kv)
    return {
        "latent_dim": m.latent_dim,
        "full_kv_elements_per_layer": full_elements,
        "full_kv_bytes_per_token": full_bytes,
        "times_smaller": full_bytes / latent_bytes,
    }


def mla_text(plan: Plan) -> str | None:
    info = mla(plan)
    if info is None:
        return None
    c = plan.config
    m = c.mla
    return (
        f"MLA caches one {info['latent_dim']}-element latent per token per layer, replicated on every device; full K/V "
        f"of {c.n_head} heads x ({m.qk_head_dim} + {m.v_head_dim}) = {info['full_kv_elements_per_layer']:,} elements "
        f"would be {info['times_smaller']:.1f}x larger ({info['full_kv_bytes_per_token']:,} B per token)"
    )


def tp_notes(plan: Plan) -> list[str]:
    c, tp = plan.config, plan.options.tp
    if tp == 1:
        return []
    notes = [
        f"tp={tp}: attention and MLP matrices{' (every expert too)' if c.moe else ''} split {tp} ways; the token "
        f"embedding and lm-head split by vocabulary (ceil({c.vocab_size:,} / {tp}) rows each, as vLLM does); norms"
        + (", routers" if c.moe else "") + (", MLA's latent projections" if c.mla else "")
        + (", the vision tower" if c.vision else "") + " and position embeddings replicated"
    ]
    if c.mla is None and c.kv_heads < tp:
        notes.append(f"{c.kv_heads} KV heads < tp {tp}: each device holds a replicated copy of one KV head, as vLLM does")
    if c.mla is not None:
        notes.append("MLA's latent cache is replicated on every device: KV memory per device does not fall with tp")
    return notes


def params_how(plan: Plan) -> str:
    c, o = plan.config, plan.options
    total = f"{c.param_count:,} params"
    tied = " (tied embedding once)" if c.tie_word_embeddings else " (untied lm-head)"
    experts = f", all {c.moe.num_experts} experts resident" if c.moe else ""
    vision = ", vision tower included" if c.vision else ""
    if o.tp > 1:
        return f"this device's share of {total}{tied}{experts}{vision} x {o.dtype}, split tp={o.tp} ways"
    return f"{total}{tied}{experts}{vision} x {o.dtype}"


def calibration_note(plan: Plan) -> str | None:
    family = plan.config.model_type
    if family in CALIBRATED_FAMILIES:
        return None
    if family in CHECKED_FAMILIES:
        return (
            f"The workspace and reserve constants were calibrated on GPT-2; for {family} they were checked on an H200 "
            f"at {CHECKED_FAMILIES[family]}'s shapes, against the largest batch that really ran."
        )
    return (
        f"The workspace and reserve constants were calibrated on GPT-2 only; {plan.config.model_type} uses the same "
        "terms, not yet measured on a GPU."
    )
