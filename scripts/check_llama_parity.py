"""Check jkv against Hugging Face transformers on a random Llama-family model of any size.

    /tmp/hfvenv/bin/python scripts/check_llama_parity.py --stage hf --family llama --workdir /tmp/llama_parity \
        [--hidden 768 --layers 12 --heads 12 --kv-heads 4 --vocab 32000] [--tokens 64] [--new 32]

`--stage hf` (torch on the CPU, in a venv with torch and transformers: see scripts/make_llama_fixtures.py) builds
a random `--family` model (llama, mistral, qwen2, qwen3) of the given shape in torch, weights rounded to bfloat16
and scaled so attention is peaked (jkv/bench/hf_llama_torch.py), and writes to `--workdir`:
- model/: config.json + model.safetensors (bfloat16, `save_pretrained`);
- hf.npz: `hf64` and `hf32`, HF's float64 and float32 logits [tokens, vocab] for hf.json's `ids`;
- hf.json: ids, two prompts (7 and 19 tokens), their float64 greedy continuations (`--new` each, equal in
  float32), the smallest top-1/top-2 logit gap along them, mean max attention, versions.
The default shape is a GPT-2-small-sized Llama (hidden 768, 12 layers, 12 heads, 4 kv heads, head_dim 64,
intermediate 2048, vocab 32000).

`--stage jkv` (JAX, jkv's environment; on the GPU machine) loads model/ in float32 and bfloat16 and prints one
JSON object: float32 and bfloat16 logits against HF's float64 (max |diff|, and relative to the largest logit),
HF's own float32 error for scale, and whether greedy tokens equal HF's through `reference_generate` (dense
cache and full recompute) and through the paged engine (`jkv.generate`, chunked prefill and prefix caching).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=["hf", "jkv"], default="hf",
                    help="hf: the torch part; jkv: the JAX part, against the hf stage's files")  # fmt: skip
    ap.add_argument("--workdir", required=True, help="where model/, hf.npz and hf.json go")
    ap.add_argument("--family", default="llama", choices=["llama", "mistral", "qwen2", "qwen3"])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, help="default hidden / heads (qwen2 always derives it so)")
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--max-positions", type=int, default=2048)
    ap.add_argument("--rope", default='{"rope_type": "default", "rope_theta": 10000.0}',
                    help="rope_parameters as JSON, as transformers 5 spells it (rope_theta inside)")  # fmt: skip
    ap.add_argument("--sliding-window", type=int, help="mistral: the window (default none)")
    ap.add_argument("--tie", action="store_true", help="tie lm_head to the embedding")
    ap.add_argument("--bias", action="store_true", help="llama: attention_bias and mlp_bias")
    ap.add_argument("--config", default="{}", help="more config kwargs as JSON (override the above)")
    ap.add_argument("--tokens", type=int, default=64, help="ids in the logits comparison")
    ap.add_argument("--new", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.stage == "jkv":
        print(json.dumps(jkv_stage(Path(args.workdir)), indent=1))
        return
    if args.head_dim is not None and args.family == "qwen2" and args.head_dim != args.hidden // args.heads:
        raise ValueError("qwen2 derives head_dim = hidden / heads: drop --head-dim or change --hidden")
    shape = {
        "hidden_size": args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads, "intermediate_size": args.intermediate, "vocab_size": args.vocab,
        "max_position_embeddings": args.max_positions, "rope_parameters": json.loads(args.rope),
        "tie_word_embeddings": args.tie, "rms_norm_eps": 1e-5,
    }  # fmt: skip
    if args.family != "qwen2":
        shape["head_dim"] = args.head_dim or args.hidden // args.heads
    if args.family == "mistral":
        shape["sliding_window"] = args.sliding_window
    if args.family == "qwen2":
        shape["use_sliding_window"] = False
    if args.bias:
        if args.family != "llama":
            raise ValueError("--bias is llama's attention_bias / mlp_bias: qwen2 always has q/k/v biases")
        shape.update(attention_bias=True, mlp_bias=True)
    shape.update(json.loads(args.config))
    from jkv.bench import hf_llama_torch  # torch's side: imports no JAX (jkv loads its engine lazily)

    info = hf_llama_torch.hf_stage(
        args.family, shape, args.tokens, args.new, Path(args.workdir), seed=args.seed
    )
    print(json.dumps({k: v for k, v in info.items() if k not in ("ids", "prompts", "greedy")}, indent=1))


def jkv_stage(work: Path) -> dict:
    import jax
    import numpy as np

    import jkv
    from jkv.reference import reference_generate

    info = json.loads((work / "hf.json").read_text())
    logs = np.load(work / "hf.npz")
    hf64, hf32 = logs["hf64"], logs["hf32"]
    scale = float(np.abs(hf64).max())
    out = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "family": info["family"],
           "max_abs_logit": scale, "hf_float32_vs_float64": float(np.abs(hf32 - hf64).max()),
           "hf_min_greedy_gap": info["min_gap"]}  # fmt: skip
    new = len(info["greedy"][0])
    for dtype in ("float32", "bfloat16"):
        model = jkv.load_model(work / "model", dtype=dtype)
        diff = float(np.abs(model.logits(info["ids"]) - hf64).max())
        out[f"{dtype}_vs_hf64"], out[f"{dtype}_relative"] = diff, diff / scale
        dense = reference_generate(model, info["prompts"], new)
        out[f"{dtype}_greedy_dense_equal"] = dense == info["greedy"]
        if dtype == "float32":
            out["float32_greedy_recompute_equal"] = reference_generate(model, info["prompts"], new, use_cache=False) \
                == info["greedy"]  # fmt: skip
            paged = jkv.generate(model, info["prompts"], jkv.SamplingParams(max_tokens=new, ignore_eos=True),
                                 block_size=16, max_num_batched_tokens=16, enable_prefix_caching=True,
                                 max_seq_len=128, num_blocks=64)  # fmt: skip
            out["float32_greedy_paged_equal"] = [o.token_ids for o in paged] == info["greedy"]
        else:
            first = [next((i for i, (a, b) in enumerate(zip(g, h)) if a != b), len(h))
                     for g, h in zip(dense, info["greedy"])]  # fmt: skip
            out["bfloat16_greedy_tokens_before_first_difference"] = first
        del model
    return out


if __name__ == "__main__":
    main()
