"""Every parameter tensor of each supported family, on one device of a `tp`-way tensor-parallel group.

Names and shapes are transformers' own (`named_parameters()`, PyTorch's [out, in] for linear layers; GPT-2 keeps
Hugging Face GPT-2's checkpoint names and Conv1D's [in, out]); a tied lm-head is listed once, as the embedding.

Tensor parallelism is Megatron-style, as vLLM shards these models:
- column-parallel: the query projection and its bias by heads, K/V by KV heads (replicated when there are fewer
  KV heads than devices), MLP gate/up (and every expert's) by intermediate columns;
- row-parallel: the attention output and MLP down projections by input rows; their biases stay whole;
- vocab-parallel: the token embedding and the lm-head, ceil(vocab / tp) rows per device (the logits are gathered
  for sampling);
- replicated: position embeddings, norms, MoE routers, MLA's down-projections to the latent (q_a_proj,
  kv_a_proj_with_mqa), whose output every head reads, and a vision tower.

Pure Python: no JAX, no device.
"""

from __future__ import annotations

from kvspec.config import ConfigError, ModelConfig

Shapes = dict[str, tuple[int, ...]]


def check_tp(config: ModelConfig, tp: int) -> None:
    """Refuse a tensor-parallel degree the model's heads and MLP widths cannot be split by, in one sentence."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ConfigError(f"--tp {tp} must be a positive integer.")
    if config.n_head % tp:
        raise ConfigError(f"--tp {tp} must divide the model's {config.n_head} attention heads.")
    kvh = config.kv_heads
    if config.mla is None and kvh % tp and tp % kvh:
        raise ConfigError(f"--tp {tp} must divide, or be a multiple of, the model's {kvh} KV heads.")
    widths = {"MLP width (intermediate_size)": config.mlp_dim}
    if config.moe is not None:
        widths["expert MLP width (moe_intermediate_size)"] = config.moe.expert_dim
        if config.moe.shared_expert_dim:
            widths["shared expert width"] = config.moe.shared_expert_dim
    for what, width in widths.items():
        if width % tp:
            raise ConfigError(f"--tp {tp} must divide the model's {width} {what}.")


def kv_heads_per_device(config: ModelConfig, tp: int) -> int:
    """Cached heads one device holds: KV heads split tp ways, replicated below one per device; MLA's one latent
    is replicated on every device."""
    check_tp(config, tp)
    if config.mla is not None:
        return 1
    return max(1, config.kv_heads // tp)


def vocab_rows(config: ModelConfig, tp: int) -> int:
    """Rows of the embedding and lm-head on one device: the vocabulary split tp ways, the last part padded."""
    return -(-config.vocab_size // tp)


def param_shapes(config: ModelConfig, tp: int = 1) -> Shapes:
    check_tp(config, tp)
    return _FAMILY[config.model_type if config.model_type in _FAMILY else "llama"](config, tp)


def _gpt2(c: ModelConfig, tp: int) -> Shapes:
    e, f, hd = c.n_embd, c.mlp_dim // tp, c.head_dim
    q = (c.n_head // tp + 2 * kv_heads_per_device(c, tp)) * hd
    shapes = {"wte": (vocab_rows(c, tp), e), "wpe": (c.n_positions, e)}
    block = {
        "ln_1.weight": (e,), "ln_1.bias": (e,),
        "attn.c_attn.weight": (e, q), "attn.c_attn.bias": (q,),  # Conv1D: stored [in, out]
        "attn.c_proj.weight": (c.n_head // tp * hd, e), "attn.c_proj.bias": (e,),
        "ln_2.weight": (e,), "ln_2.bias": (e,),
        "mlp.c_fc.weight": (e, f), "mlp.c_fc.bias": (f,),
        "mlp.c_proj.weight": (f, e), "mlp.c_proj.bias": (e,),
    }  # fmt: skip
    for i in range(c.n_layer):
        shapes.update({f"h.{i}.{k}": v for k, v in block.items()})
    shapes["ln_f.weight"] = (e,)
    shapes["ln_f.bias"] = (e,)
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (vocab_rows(c, tp), e)
    return shapes


def _linear(shapes: Shapes, name: str, out: int, inp: int, bias: bool) -> None:
    shapes[f"{name}.weight"] = (out, inp)
    if bias:
        shapes[f"{name}.bias"] = (out,)


def _fused_block(shapes: Shapes, attn: str, mlp: str, widths: tuple[int, int, int, int], attn_bias: bool,
                 mlp_bias: bool) -> None:  # fmt: skip
    """A fused-QKV block (gpt_neox, falcon): query_key_value and dense, dense_h_to_4h and dense_4h_to_h. A
    row-parallel projection's bias has the full output width, so `_linear` gives it whole."""
    qkv, q, f, e = widths
    _linear(shapes, f"{attn}.query_key_value", qkv, e, attn_bias)
    _linear(shapes, f"{attn}.dense", e, q, attn_bias)
    _linear(shapes, f"{mlp}.dense_h_to_4h", f, e, mlp_bias)
    _linear(shapes, f"{mlp}.dense_4h_to_h", e, f, mlp_bias)


def _gpt_neox(c: ModelConfig, tp: int) -> Shapes:
    e, f, hd = c.n_embd, c.mlp_dim // tp, c.head_dim
    q, kv = c.n_head // tp * hd, kv_heads_per_device(c, tp) * hd
    b = c.attention_bias
    shapes: Shapes = {"gpt_neox.embed_in.weight": (vocab_rows(c, tp), e)}
    for i in range(c.n_layer):
        p = f"gpt_neox.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{p}.{norm}.weight"] = shapes[f"{p}.{norm}.bias"] = (e,)
        _fused_block(shapes, f"{p}.attention", f"{p}.mlp", (q + 2 * kv, q, f, e), b, True)
    shapes["gpt_neox.final_layer_norm.weight"] = shapes["gpt_neox.final_layer_norm.bias"] = (e,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab_rows(c, tp), e)
    return shapes


def _falcon(c: ModelConfig, tp: int) -> Shapes:
    e, f, hd = c.n_embd, c.mlp_dim // tp, c.head_dim
    q, kv = c.n_head // tp * hd, kv_heads_per_device(c, tp) * hd
    b = c.attention_bias
    norms = {"post": ("input_layernorm", "post_attention_layernorm"), "attn+mlp": ("ln_attn", "ln_mlp"),
             "input": ("input_layernorm",)}[c.option("norms", "input")]  # fmt: skip
    shapes: Shapes = {"transformer.word_embeddings.weight": (vocab_rows(c, tp), e)}
    for i in range(c.n_layer):
        p = f"transformer.h.{i}"
        _fused_block(shapes, f"{p}.self_attention", f"{p}.mlp", (q + 2 * kv, q, f, e), b, b)
        for norm in norms:
            shapes[f"{p}.{norm}.weight"] = shapes[f"{p}.{norm}.bias"] = (e,)
    shapes["transformer.ln_f.weight"] = shapes["transformer.ln_f.bias"] = (e,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab_rows(c, tp), e)
    return shapes


def _attention(shapes: Shapes, p: str, c: ModelConfig, tp: int) -> None:
    """Self-attention of the Llama-style families (q/k/v/o, phi3's fused qkv, MLA's latent projections)."""
    e = c.n_embd
    heads = c.n_head // tp
    if c.mla is not None:
        m, bias = c.mla, c.attention_bias
        if m.q_lora_rank is None:
            _linear(shapes, f"{p}.q_proj", heads * m.qk_head_dim, e, False)
        else:
            _linear(shapes, f"{p}.q_a_proj", m.q_lora_rank, e, bias)
            shapes[f"{p}.q_a_layernorm.weight"] = (m.q_lora_rank,)
            _linear(shapes, f"{p}.q_b_proj", heads * m.qk_head_dim, m.q_lora_rank, False)
        _linear(shapes, f"{p}.kv_a_proj_with_mqa", m.latent_dim, e, bias)
        shapes[f"{p}.kv_a_layernorm.weight"] = (m.kv_lora_rank,)
        _linear(shapes, f"{p}.kv_b_proj", heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank, False)
        _linear(shapes, f"{p}.o_proj", e, heads * m.v_head_dim, False)
        if bias:
            shapes[f"{p}.o_proj.bias"] = (e,)
        return
    hd = c.head_dim
    q, kv = heads * hd, kv_heads_per_device(c, tp) * hd
    if c.model_type == "phi3":
        _linear(shapes, f"{p}.qkv_proj", q + 2 * kv, e, False)
    else:
        qkv_bias = c.attention_bias
        _linear(shapes, f"{p}.q_proj", q, e, qkv_bias)
        _linear(shapes, f"{p}.k_proj", kv, e, qkv_bias)
        _linear(shapes, f"{p}.v_proj", kv, e, qkv_bias)
    _linear(shapes, f"{p}.o_proj", e, q, False)
    if c.attention_bias and c.model_type not in ("qwen2", "qwen2_moe"):  # qwen2 biases q/k/v only
        shapes[f"{p}.o_proj.bias"] = (e,)
    if c.qk_norm:
        shapes[f"{p}.q_norm.weight"] = shapes[f"{p}.k_norm.weight"] = (hd,)


def _dense_mlp(shapes: Shapes, p: str, c: ModelConfig, width: int, tp: int) -> None:
    e, f = c.n_embd, width // tp
    if c.model_type == "phi3":
        _linear(shapes, f"{p}.gate_up_proj", 2 * f, e, False)
    else:
        _linear(shapes, f"{p}.gate_proj", f, e, c.mlp_bias)
        _linear(shapes, f"{p}.up_proj", f, e, c.mlp_bias)
    _linear(shapes, f"{p}.down_proj", e, f, False)
    if c.mlp_bias:
        shapes[f"{p}.down_proj.bias"] = (e,)


def _moe_mlp(shapes: Shapes, p: str, c: ModelConfig, tp: int) -> None:
    """Routed experts as transformers 5.x holds them (one fused [experts, ...] tensor each), router, shared experts."""
    moe, e = c.moe, c.n_embd
    assert moe is not None
    f = moe.expert_dim // tp
    shapes[f"{p}.gate.weight"] = (moe.num_experts, e)
    shapes[f"{p}.experts.gate_up_proj"] = (moe.num_experts, 2 * f, e)
    shapes[f"{p}.experts.down_proj"] = (moe.num_experts, e, f)
    if moe.shared_expert_dim:
        name = "shared_experts" if c.mla is not None else "shared_expert"
        _dense_mlp(shapes, f"{p}.{name}", c, moe.shared_expert_dim, tp)
    if moe.shared_expert_gate:
        shapes[f"{p}.shared_expert_gate.weight"] = (1, e)


def _llama(c: ModelConfig, tp: int) -> Shapes:
    e = c.n_embd
    root = "model.language_model" if c.model_type == "gemma3" else "model"
    shapes: Shapes = {} if c.vision is None else _vision_tower(c)
    shapes[f"{root}.embed_tokens.weight"] = (vocab_rows(c, tp), e)
    gemma = c.model_type.startswith("gemma")
    for i in range(c.n_layer):
        p = f"{root}.layers.{i}"
        _attention(shapes, f"{p}.self_attn", c, tp)
        if c.moe is not None and c.moe.sparse_layers[i]:
            _moe_mlp(shapes, f"{p}.mlp", c, tp)
        else:
            _dense_mlp(shapes, f"{p}.mlp", c, c.mlp_dim, tp)
        norms = ["input_layernorm", "post_attention_layernorm"]
        if gemma:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for norm in norms:
            shapes[f"{p}.{norm}.weight"] = (e,)
    shapes[f"{root}.norm.weight"] = (e,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab_rows(c, tp), e)
    return shapes


def _vision_tower(c: ModelConfig) -> Shapes:
    """Gemma 3's SigLIP tower and its projector into the decoder's width (replicated under tensor parallelism)."""
    v = c.vision
    assert v is not None
    h, f, root = v.hidden, v.intermediate, "model.vision_tower"
    shapes: Shapes = {
        f"{root}.embeddings.patch_embedding.weight": (h, v.channels, v.patch_size, v.patch_size),
        f"{root}.embeddings.patch_embedding.bias": (h,),
        f"{root}.embeddings.position_embedding.weight": ((v.image_size // v.patch_size) ** 2, h),
    }
    for i in range(v.layers):
        p = f"{root}.encoder.layers.{i}"
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}.{norm}.weight"] = shapes[f"{p}.{norm}.bias"] = (h,)
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            _linear(shapes, f"{p}.self_attn.{proj}", h, h, True)
        _linear(shapes, f"{p}.mlp.fc1", f, h, True)
        _linear(shapes, f"{p}.mlp.fc2", h, f, True)
    shapes[f"{root}.post_layernorm.weight"] = shapes[f"{root}.post_layernorm.bias"] = (h,)
    if v.use_head:
        p = f"{root}.head"
        shapes[f"{p}.probe"] = (1, 1, h)
        shapes[f"{p}.attention.in_proj_weight"] = (3 * h, h)
        shapes[f"{p}.attention.in_proj_bias"] = (3 * h,)
        _linear(shapes, f"{p}.attention.out_proj", h, h, True)
        shapes[f"{p}.layernorm.weight"] = shapes[f"{p}.layernorm.bias"] = (h,)
        _linear(shapes, f"{p}.mlp.fc1", f, h, True)
        _linear(shapes, f"{p}.mlp.fc2", h, f, True)
    shapes["model.multi_modal_projector.mm_input_projection_weight"] = (h, c.n_embd)
    shapes["model.multi_modal_projector.mm_soft_emb_norm.weight"] = (h,)
    return shapes


_FAMILY = {"gpt2": _gpt2, "gpt_neox": _gpt_neox, "falcon": _falcon, "llama": _llama}
