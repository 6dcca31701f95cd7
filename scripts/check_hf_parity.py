"""Check jkv against Hugging Face transformers on a full-size random GPT-2 (run where torch is installed).

    PYTHONPATH=. python3 scripts/check_hf_parity.py [--size gpt2] [--tokens 64] [--new 32] [--json OUT.json]

Builds a `GPT2LMHeadModel` of the preset's size in torch with random weights (scaled as in
make_hf_fixture.py so attention is peaked), `save_pretrained`s it to a temporary directory, loads that with
`jkv.load_model` on the default JAX device, and compares:
- logits for random ids: jkv float32 (as shipped, and under a global "highest" matmul precision) and bfloat16
  against HF float64,
  with HF float32 against HF float64 for scale;
- greedy tokens for two prompts: `jkv.reference_generate` (cache and full recompute) against HF `generate`
  in float64, with the smallest top-1/top-2 logit gap along HF's path (a tie that close can flip legitimately).
torch runs on the CPU (float64 is the reference); jkv runs on whatever JAX sees. Prints one JSON object.
`--stage hf` / `--stage jkv` with one `--workdir` split the torch and JAX halves across two environments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvspec.config import PRESETS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="gpt2", choices=list(PRESETS))
    ap.add_argument("--tokens", type=int, default=64, help="ids in the logits comparison")
    ap.add_argument("--new", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--stage", choices=["all", "hf", "jkv"], default="all",
                    help="hf: torch part only; jkv: JAX part only (both need the same --workdir)")  # fmt: skip
    ap.add_argument("--workdir", help="where the model and HF outputs go (default: a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.stage in ("all", "hf"):
            c = PRESETS[args.size]
            shape = {"vocab_size": c.vocab_size, "n_positions": c.n_positions, "n_embd": c.n_embd,
                     "n_layer": c.n_layer, "n_head": c.n_head}  # fmt: skip
            from jkv.bench import hf_torch  # torch's side: imports no JAX (jkv loads its engine lazily)

            hf_torch.hf_stage(shape, args.tokens, args.new, work)
        if args.stage in ("all", "jkv"):
            from jkv.bench.hf_parity import jkv_stage

            result = jkv_stage(args.size, args.new, work)
            print(json.dumps(result, indent=1))
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
