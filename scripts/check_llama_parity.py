"""Check jkv against Hugging Face transformers on a random Llama-family model of any size (torch half only, so far).

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
intermediate 2048, vocab 32000). The jkv stage (JAX, on the GPU machine) compares against these files.
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
    ap.add_argument("--stage", choices=["hf"], default="hf", help="hf: the torch part (the only one so far)")
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


if __name__ == "__main__":
    main()
