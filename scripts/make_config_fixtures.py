"""Make tests/fixtures/hf_configs/: one small config.json per supported family, written by transformers, and
transformers' own parameter count and parameter shapes for it and for every packaged preset (kvspec/presets).

Runs OUTSIDE jkv's environment, in a throwaway venv with torch (never a jkv dependency); nothing is downloaded,
models are built on the meta device (no memory):

    python3.11 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch==2.13.0 transformers
    /tmp/hfvenv/bin/python scripts/make_config_fixtures.py

What it writes:
- `<family>.json`: `AutoConfig.for_model(...).to_dict()` of a tiny model of that family, in transformers 5.x's
  spelling (`dtype`, `rope_parameters`, `layer_types`), exercising the family's options (biases, tied heads,
  windows, shared experts, MLA with and without q_lora_rank, a vision tower).
- `expected.json`: for each tiny config and each preset, `sum(p.numel() for p in model.parameters())` (tied
  weights once), each layer's attention window, and, for the tiny ones, every `named_parameters()` shape; plus
  the versions used.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "hf_configs"
PRESETS = REPO / "kvspec" / "presets"

_BASE = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=64, pad_token_id=None, bos_token_id=None, eos_token_id=None)  # fmt: skip

TINY: dict[str, tuple[str, dict]] = {
    "gpt2": ("gpt2", dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=80,
                          tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)),
    "gpt_neox": ("gpt_neox", dict(_BASE, intermediate_size=80, rotary_pct=0.25)),
    "falcon_mqa": ("falcon", dict(_BASE, multi_query=True, parallel_attn=True, bias=False)),
    "falcon_gqa": ("falcon", dict(_BASE, num_kv_heads=2, new_decoder_architecture=True, bias=True,
                                  tie_word_embeddings=False)),
    "falcon_serial": ("falcon", dict(_BASE, multi_query=False, parallel_attn=False, bias=True)),
    "llama": ("llama", dict(_BASE, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                            rope_theta=500000.0)),
    "llama_tied_head_dim": ("llama", dict(_BASE, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)),
    "mistral": ("mistral", dict(_BASE, num_key_value_heads=2, sliding_window=8)),
    "qwen2": ("qwen2", dict(_BASE, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_window": ("qwen2", dict(_BASE, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                                   max_window_layers=1)),
    "qwen3": ("qwen3", dict(_BASE, num_key_value_heads=2, head_dim=16)),
    "phi3": ("phi3", dict(_BASE, num_key_value_heads=2, sliding_window=15)),
    "gemma2": ("gemma2", dict(_BASE, num_hidden_layers=4, num_key_value_heads=2, head_dim=16, sliding_window=8)),
    "gemma3_text": ("gemma3_text", dict(_BASE, num_hidden_layers=7, num_key_value_heads=2, head_dim=16,
                                        sliding_window=8)),
    "gemma3": ("gemma3", dict(text_config=dict(_BASE, num_hidden_layers=6, num_key_value_heads=2, head_dim=16,
                                               sliding_window=8),
                              vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                                 num_attention_heads=2, patch_size=4, image_size=16,
                                                 vision_use_head=False),
                              mm_tokens_per_image=4)),
    "mixtral": ("mixtral", dict(_BASE, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("qwen2_moe", dict(_BASE, num_key_value_heads=2, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2,
                                    decoder_sparse_step=1, mlp_only_layers=[1])),
    "qwen3_moe": ("qwen3_moe", dict(_BASE, num_key_value_heads=2, head_dim=8, moe_intermediate_size=16,
                                    num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2)),
    "deepseek_v2": ("deepseek_v2", dict(_BASE, num_key_value_heads=4, moe_intermediate_size=16, n_routed_experts=4,
                                        n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
                                        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=8,
                                        v_head_dim=8)),
    "deepseek_v3": ("deepseek_v3", dict(_BASE, num_key_value_heads=4, moe_intermediate_size=16, n_routed_experts=4,
                                        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=8,
                                        v_head_dim=8, n_group=2, topk_group=1)),
}


def layer_windows(config) -> list[int | None]:
    """Each decoder layer's attention window as transformers configures it (None: full attention)."""
    text = getattr(config, "text_config", None) or config
    window = getattr(text, "sliding_window", None) or None
    types = getattr(text, "layer_types", None)
    if types is None:
        return [window] * text.num_hidden_layers
    return [window if t == "sliding_attention" else None for t in types]


def count(config) -> tuple[int, dict[str, list[int]]]:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: list(p.shape) for name, p in model.named_parameters()}  # tied parameters once
    return sum(p.numel() for p in model.parameters()), shapes


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    expected: dict = {"versions": {"transformers": transformers.__version__, "torch": torch.__version__},
                      "tiny": {}, "presets": {}}  # fmt: skip
    for name, (model_type, kwargs) in TINY.items():
        config = AutoConfig.for_model(model_type, **kwargs)
        raw = config.to_dict()
        (OUT / f"{name}.json").write_text(json.dumps(raw, indent=1, sort_keys=True, default=str) + "\n")
        total, shapes = count(AutoConfig.for_model(model_type, **kwargs))
        expected["tiny"][name] = {"param_count": total, "shapes": shapes, "layer_windows": layer_windows(config)}
        print(f"{name:22s} {total:>16,}")
    for path in sorted(PRESETS.glob("*.json")):
        raw = json.loads(path.read_text())
        raw.pop("_comment", None)
        model_type = raw.pop("model_type")
        config = AutoConfig.for_model(model_type, **raw)
        total, _ = count(config)
        expected["presets"][path.stem] = {"param_count": total, "layer_windows": layer_windows(config)}
        print(f"{path.stem:22s} {total:>16,}")
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
