"""XLA's measured scratch for the decode steps of listed model shapes, which the planner uses instead of its bound.

The planner's scratch term for a step (planner.memory.step_workspace) is a bound: tokens x activation_width x weight
bytes + TEMP_BASE_BYTES, at or above every step measured. For a small model on a large card the decode step's
scratch binds the maximum batch (its float32 logits plus scratch outgrow the lm-head's autotuning buffers), and there
the bound's slack becomes sequences the plan leaves unused: 0.21-0.36 % of Qwen2.5-1.5B's full-card batch
(docs/benchmarks.md, "Real maximum batch, searched"). For the shapes listed here the planner reads the scratch off
the measured points instead.

Each entry is what `scripts/measure_workspace.py --sweep` read from XLA's `memory_analysis()` (temp bytes) of the
compiled decode step at the listed row counts, at the shortest listed length (128 tokens), with sampling on, bf16
weights, tensor parallelism 1, and the model's own context (the block table's width is part of the scratch). Between
two points the scratch is read off the chord; past the last point it follows the last two points' slope; below the
first point it is the first point's value (the scratch there is flat: the sampler's block and one layer's tensors).
MEASURED_MARGIN_BYTES is added to every reading: the chords of the measured points lie within 0.1 MiB of the
points between them.

Measured on an NVIDIA H200, driver 580.159.04, JAX 0.11.2, 2026-12-03. Another card, driver or XLA version can
differ: measure it there with the same command and add a row.
"""

from __future__ import annotations

from kvspec.config import ModelConfig

MiB = 2**20
MEASURED_MARGIN_BYTES = 1 * MiB


def shape_key(config: ModelConfig, kv_dtype: str, weight_bytes: int, context: int) -> tuple:
    """What a decode step's scratch depends on: the model's shapes, the KV and weight dtypes and the context."""
    return (config.model_type, config.vocab_size, config.n_embd, config.n_layer, config.n_head, config.kv_heads,
            config.head_dim, config.mlp_dim, kv_dtype, weight_bytes, context)  # fmt: skip


# (rows, XLA temp bytes) of the decode step, by shape_key. Command, H200, 2026-12-03:
#   python3 scripts/measure_workspace.py --sweep --rows qwen2.5-1.5b:bfloat16:1024,4046,8000,16000,30620,30636 \
#       qwen2.5-1.5b:int8:7001,16000,30000,52671,52735
_QWEN25_15B = ("qwen2", 151936, 1536, 28, 12, 2, 128, 8960)
DECODE_SCRATCH: dict[tuple, tuple[tuple[int, int], ...]] = {
    (*_QWEN25_15B, "bfloat16", 2, 32768): (
        (1024, 175_084_096), (4046, 175_160_128), (8000, 259_168_320), (16000, 484_736_320),
        (30620, 896_962_112), (30636, 897_413_184),
    ),  # fmt: skip
    (*_QWEN25_15B, "int8", 2, 32768): (
        (7001, 231_049_792), (16000, 500_454_720), (30000, 938_318_912), (52671, 1_647_376_960),
        (52735, 1_649_371_456),
    ),  # fmt: skip
}


def measured_decode_scratch(config: ModelConfig, kv_dtype: str, weight_bytes: int, context: int, rows: int,
                            tp: int = 1) -> int | None:  # fmt: skip
    """The measured scratch of a decode step of `rows` rows, plus MEASURED_MARGIN_BYTES; None where the shape (or a
    tensor-parallel split of it) was not measured."""
    points = DECODE_SCRATCH.get(shape_key(config, kv_dtype, weight_bytes, context)) if tp == 1 else None
    if points is None:
        return None
    if rows <= points[0][0]:
        return points[0][1] + MEASURED_MARGIN_BYTES
    (r0, t0), (r1, t1) = points[-2], points[-1]
    for a, b in zip(points, points[1:]):
        if rows <= b[0]:
            (r0, t0), (r1, t1) = a, b
            break
    return t0 + -(-(t1 - t0) * (rows - r0) // (r1 - r0)) + MEASURED_MARGIN_BYTES
