"""The named terms of a device's peak memory: parameters, activation workspace and runtime reserve.

Pure arithmetic on a `ModelConfig`. The KV pool is what is left of the budget after these terms (planner.plan).

Keep two growth laws apart: the KV cache grows *linearly* in sequence length, batch and depth; what grows
*quadratically* in sequence length is the attention-score workspace of a naive (non-flash) prefill, B*H*T^2 floats.
The paged kernels never materialize scores, so with them attention workspace is linear in the tokens of a step.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.config import ModelConfig
from planner.kv_layout import kv_heads_per_device

F32 = 4

# Runtime reserve: device memory a process needs beyond parameters, KV pool and step workspace. Calibrated with
# scripts/measure_memory.py on an H200 (2026-11-26, JAX's preallocated pool capped at a 24 GB card's budget;
# table in docs/benchmarks.md, "Plan vs measured memory"): 0.62-0.63 GiB lives outside JAX's pool in every row
# (CUDA context, loaded kernels, cuBLAS handles), and peak_bytes_in_use exceeded parameters + pool + the workspace
# below by up to 0.26 GiB more (gpt2-xl: XLA's autotuning scratch while compiling a step and buffers the formula
# does not name). The measured rows need a reserve between 0.88 and 1.13 GiB for the planned peak to be at or above
# the measured one and within 3 % of it; 1 GiB is in that window. Override with reserve_bytes.
DEFAULT_RESERVE_BYTES = 2**30

# Logits workspace of a step, in [sequences, vocab] float32 buffers: the lm-head product and the step's logits
# output (the greedy/softmax pass fuses into them). The sampler then sorts rows in blocks of SAMPLER_ROWS
# (jkv.sampling), with about SAMPLER_COPIES [rows, vocab] float32-sized buffers live (scaled logits, order,
# sorted, probs, cumsum, mask). Calibrated on the same runs: at decode batches of 3,708 and 6,150 (gpt2) the
# measured activation was 1.56 and 2.48 GiB; 3 logits copies planned 2.25 and 3.68 GiB, 2 copies plan 1.55 and
# 2.53 GiB.
LOGITS_COPIES = 2
SAMPLER_ROWS = 32
SAMPLER_COPIES = 12


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
    """Live activation bytes at the peak of one jitted step (one layer's intermediates plus the logits).

    XLA reuses buffers across layers, so the peak is one layer's live tensors, not n_layer of them.
    """

    name: str
    tokens: int  # query tokens in the step
    sequences: int  # sequences whose next-token logits the step produces
    residual: int  # hidden states in and out of a block, LayerNorm output
    qkv: int
    attention: int  # attention output and softmax statistics; + scores when naive
    mlp: int  # MLP intermediate before and after GELU
    logits: int  # float32 logits and the sampler's block workspace

    @property
    def total(self) -> int:
        return self.residual + self.qkv + self.attention + self.mlp + self.logits


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
    e, hd = config.n_embd, config.head_dim
    heads = config.n_head // tp
    kvh = kv_heads_per_device(config, tp)
    residual = 3 * tokens * e * dtype_bytes
    qkv = tokens * (heads * hd + 2 * kvh * hd) * dtype_bytes
    attention = tokens * heads * hd * (F32 + dtype_bytes) + 2 * tokens * heads * F32
    if naive_attention:
        attention += 2 * heads * tokens * context * F32
    mlp = 2 * tokens * (config.mlp_dim // tp) * dtype_bytes
    sampler = min(sequences, SAMPLER_ROWS) * SAMPLER_COPIES
    logits = (LOGITS_COPIES * sequences + sampler) * config.vocab_size * F32
    return StepWorkspace(name, tokens, sequences, residual, qkv, attention, mlp, logits)
