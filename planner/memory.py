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

F32 = 4
MiB = 2**20

# Every constant below was measured on an H200 (JAX 0.11.2); docs/memory.md, "Where the constants come from", gives
# the measurements behind each one. Another card, driver or XLA version can differ: measure it there.

# Runtime reserve: device memory a process holds outside JAX's pool (CUDA context, loaded kernels, cuBLAS handles),
# a base plus a per-layer share (it grows with the executables), plus the spread between runs of one row.
RESERVE_ALLOWANCE_BYTES = 6 * MiB  # the outside-pool memory's spread between runs of one row
RESERVE_BASE_BYTES = 630 * MiB + RESERVE_ALLOWANCE_BYTES
RESERVE_PER_LAYER_BYTES = MiB // 4

# Rows the sampler sorts at a time (jkv.sampling): its scratch stays one block of rows, whatever the batch.
SAMPLER_ROWS = 32

# A step's scratch (XLA temp): max(TEMP_FLOOR_BYTES, tokens x (mlp + embd) x weight bytes + TEMP_BASE_BYTES), at or
# above every measured step.
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
    """Bytes of parameters on one device: exact from shapes, tied embedding once.

    Under tp-way tensor parallelism the QKV and MLP-in projections are split by columns and the two output
    projections by rows (their biases stay whole); embeddings and LayerNorms are replicated on every device.
    K/V heads are split too, or replicated when there are fewer of them than devices.
    """
    e, f, hd = config.n_embd, config.mlp_dim, config.head_dim
    kvh = kv_heads_per_device(config, tp)
    qkv_cols = e // tp + 2 * kvh * hd
    per_layer = (
        4 * e  # ln_1, ln_2 weight and bias
        + e * qkv_cols + qkv_cols  # c_attn (Conv1D [in, out]) and bias
        + (e // tp) * e + e  # attn.c_proj: rows split, bias whole
        + e * (f // tp) + f // tp  # mlp.c_fc
        + (f // tp) * e + e  # mlp.c_proj: rows split, bias whole
    )  # fmt: skip
    embed = config.vocab_size * e + config.n_positions * e + 2 * e  # wte, wpe, ln_f
    if not config.tie_word_embeddings:
        embed += config.vocab_size * e
    return (embed + config.n_layer * per_layer) * dtype_bytes


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
) -> StepWorkspace:
    """Workspace of a step that runs `tokens` query tokens for `sequences` sequences of up to `context` tokens.

    naive_attention: materialize the [heads, tokens, context] float32 score matrix and its softmax (B*H*T^2 for a
    full prefill); otherwise flash/paged attention keeps only per-row running max and sum.
    """
    e, v = config.n_embd, config.vocab_size
    temp = tokens * (config.mlp_dim // tp + e) * dtype_bytes + TEMP_BASE_BYTES
    if naive_attention:
        temp += 2 * (config.n_head // tp) * tokens * context * F32
    logits = sequences * v * F32
    autotune = logits + (sequences * e + e * v) * dtype_bytes + 3 * 2 * REDZONE_BYTES
    return StepWorkspace(name, tokens, sequences, logits, max(TEMP_FLOOR_BYTES, temp), autotune)
