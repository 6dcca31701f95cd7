"""The named terms of a device's peak memory: parameters, activation workspace and runtime reserve.

Pure arithmetic on a `ModelConfig`. The KV pool is what is left of the budget after these terms (planner.plan).

Keep two growth laws apart: the KV cache grows *linearly* in sequence length, batch and depth; what grows
*quadratically* in sequence length is the attention-score workspace of a naive (non-flash) prefill, B*H*T^2 floats.
The paged kernels never materialize scores, so with them attention workspace is linear in the tokens of a step.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvspec.config import ModelConfig
from kvspec.layout import kv_heads_per_device
from kvspec.shapes import PREFILL_MIN_CHUNK, padded_prefill_tokens  # noqa: F401 - the planner prices these
from planner.measured_scratch import measured_decode_scratch

F32 = 4
MiB = 2**20

# Every constant below was measured on an H200 (JAX 0.11.2) with GPT-2 models only; docs/memory.md, "Where the
# constants come from", gives the measurements behind each one. For the other families the same terms apply,
# uncalibrated (CALIBRATED_FAMILIES), except the decode scratch of the shapes planner.measured_scratch lists.
# Another card, driver or XLA version can differ: measure it there.
CALIBRATED_FAMILIES = ("gpt2",)
# Families whose plans were checked on an H200 against the real maximum batch, searched (docs/benchmarks.md), at one
# model's shapes each: the plan never went above it; it was within one of it in 5 of 8 rows, within 0.05 % in all.
CHECKED_FAMILIES = {"llama": "llama-3.1-8b", "qwen2": "qwen2.5-1.5b"}

# Runtime reserve: device memory a process holds outside JAX's pool (CUDA context, loaded kernels, cuBLAS handles),
# a base plus a per-layer share (it grows with the executables), plus the spread between runs of one row.
RESERVE_ALLOWANCE_BYTES = 6 * MiB  # the outside-pool memory's spread between runs of one row
RESERVE_BASE_BYTES = 630 * MiB + RESERVE_ALLOWANCE_BYTES
RESERVE_PER_LAYER_BYTES = MiB // 4

# Rows the sampler sorts at a time (jkv.sampling): its scratch stays one block of rows, whatever the batch.
SAMPLER_ROWS = 32

# A step's scratch (XLA temp): max(TEMP_FLOOR_BYTES, tokens x activation_width x weight bytes + TEMP_BASE_BYTES), at
# or above every measured GPT-2 step (activation_width = mlp + embd there).
TEMP_FLOOR_BYTES = 64 * MiB
TEMP_BASE_BYTES = 16 * MiB

# XLA autotunes each GEMM shape the first time it compiles it, on buffers it allocates from the same pool as the KV
# pools: the operands and the output, each with REDZONE_BYTES on both sides (the largest is the lm-head's). No
# measured step compiled and ran with less free memory than AUTOTUNE_FLOOR_BYTES.
REDZONE_BYTES = 8 * MiB
AUTOTUNE_FLOOR_BYTES = 326 * MiB


# A prefill step's shape follows the engine's one shape policy (kvspec.shapes): its scheduler admits prefill chunks
# only while padded rows x padded chunk stays within `padded_prefill_tokens(prefill budget)`, so that is the most
# query positions a prefill step computes.


def runtime_reserve(config: ModelConfig) -> int:
    """The default runtime reserve for `config` (see RESERVE_BASE_BYTES)."""
    return RESERVE_BASE_BYTES + RESERVE_PER_LAYER_BYTES * config.n_layer


def param_bytes(config: ModelConfig, dtype_bytes: int, tp: int = 1) -> int:
    """Bytes of parameters on one device: exact from the family's tensors (kvspec.params), tied embedding once.

    Under tp-way tensor parallelism attention and MLP matrices (every expert's too) are split tp ways, K/V heads
    split or, when there are fewer than tp, replicated; the token embedding and lm-head split by vocabulary; norms,
    routers and position embeddings replicated (kvspec.params).
    """
    total = 0
    for shape in config.param_shapes(tp).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total * dtype_bytes


def activation_width(config: ModelConfig, tp: int = 1) -> int:
    """Values per token live in the widest layer of a step, on one device: the residual plus the wider of the
    attention projections' output and the MLP's hidden activations.

    GPT-2's GELU MLP holds mlp_dim; a gated (SwiGLU) MLP holds gate and up, 2 x mlp_dim; a token routed through
    k experts holds k of those, plus the shared expert and the router's logits. Only GPT-2's width was measured
    against XLA's scratch (docs/memory.md); the others follow the same rule.
    """
    gated = config.model_type not in ("gpt2", "gpt_neox", "falcon")
    mlp = (2 if gated else 1) * config.mlp_dim // tp
    if config.moe is not None:
        moe = config.moe
        routed = moe.experts_per_token * 2 * moe.expert_dim // tp + 2 * moe.shared_expert_dim // tp + moe.num_experts
        mlp = max(mlp, routed)
    heads = config.n_head // tp
    if config.mla is not None:
        m = config.mla
        attention = heads * (m.qk_head_dim + m.qk_nope_head_dim + m.v_head_dim) + m.latent_dim
    else:
        attention = (heads + 2 * kv_heads_per_device(config, tp)) * config.head_dim
    return config.n_embd + max(mlp, attention)


@dataclass(frozen=True, slots=True)
class StepWorkspace:
    """Device memory one jitted step needs beyond parameters and KV pool, by its three limits (the largest wins).

    - running it: its float32 logits output plus its scratch (XLA reuses buffers across layers, so the scratch is
      about one layer's live tensors or the sampler's block, whichever is larger);
    - compiling it: XLA's autotuning of the lm-head GEMM on buffers of its own (operands, output, redzones);
    - the floor no measured step went below.
    """

    name: str
    tokens: int  # query tokens in the step
    sequences: int  # sequences whose next-token logits the step produces
    logits: int  # the step's [sequences, vocab] float32 logits output
    temp: int  # scratch while it runs
    autotune: int  # the lm-head GEMM's autotuning buffers while it compiles

    @property
    def floor(self) -> int:
        return AUTOTUNE_FLOOR_BYTES

    @property
    def running(self) -> int:
        return self.logits + self.temp

    @property
    def total(self) -> int:
        return max(self.running, self.autotune, self.floor)


def step_workspace(
    config: ModelConfig,
    name: str,
    tokens: int,
    sequences: int,
    context: int,
    dtype_bytes: int,
    tp: int = 1,
    naive_attention: bool = False,
    kv_dtype: str | None = None,
) -> StepWorkspace:
    """Workspace of a step that runs `tokens` query tokens for `sequences` sequences of up to `context` tokens.

    naive_attention: materialize the [heads, tokens, context] float32 score matrix and its softmax (B*H*T^2 for a
    full prefill); otherwise flash/paged attention keeps only per-row running max and sum.
    kv_dtype: the KV pages' dtype; a decode step (`name` "decode") of a shape measured on the card
    (planner.measured_scratch) takes its measured scratch in place of the bound.
    """
    e, v = config.n_embd, config.vocab_size
    temp = tokens * activation_width(config, tp) * dtype_bytes + TEMP_BASE_BYTES
    if naive_attention:
        temp += 2 * (config.n_head // tp) * tokens * context * F32
    if name == "decode" and kv_dtype is not None and not naive_attention:
        temp = measured_decode_scratch(config, kv_dtype, dtype_bytes, context, tokens, tp) or temp
    logits = sequences * v * F32
    autotune = logits + (sequences * e + e * v) * dtype_bytes + 3 * 2 * REDZONE_BYTES
    return StepWorkspace(name, tokens, sequences, logits, max(TEMP_FLOOR_BYTES, temp), autotune)
