"""Make tests/fixtures/hf_tiny_llama/: tiny random Llama-family models (llama, mistral, qwen2, qwen3, llama_yarn)
written by Hugging Face transformers, with their outputs, tokenizers and chat templates, and rope.json.

Runs OUTSIDE jkv's environment, in a throwaway venv that has torch (never a jkv dependency):

    python3.11 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors tokenizers jinja2 numpy
    /tmp/hfvenv/bin/python scripts/make_llama_fixtures.py [OUT] [--only NAME ...] [--no-check]

Each OUT/<name>/ holds:
- config.json, model.safetensors (bfloat16; every weight was rounded to bfloat16 before the reference ran, so the
  file is the reference model exactly), generation_config.json (eos_token_id: a list for llama and llama_yarn).
- tokenizer.json (a byte-level BPE of 384 ids trained on a fixed paragraph with the `tokenizers` library) and
  tokenizer_config.json (bos / eos tokens and the family's Jinja2 chat template).
- expected.json: ids, two prompts and their float64 greedy continuations (equal in float32), min_gap,
  mean_max_attention, the chat template rendered and tokenized by transformers, versions.
- logits.npz: `logits`, float64 [T, vocab], HF's logits for expected.json's `ids`.
OUT/rope.json: transformers' inv_freq and attention_scaling for a set of RoPE configurations.
After writing, each directory is loaded back with transformers (float64) and checked (see `check_fixture`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "hf_tiny_llama"
sys.path.insert(0, str(REPO))

from jkv.bench import hf_llama_torch

SUMMARY_KEYS = ("mean_max_attention", "min_gap", "hf_float32_vs_float64_max_abs", "transformers", "torch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=str(FIXTURES))
    ap.add_argument("--only", nargs="*", choices=list(hf_llama_torch.FIXTURES), help="write only these")
    ap.add_argument("--no-check", action="store_true", help="skip loading each fixture back")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.only or hf_llama_torch.FIXTURES:
        expected = hf_llama_torch.write_fixture(name, out / name)
        summary = {k: expected[k] for k in SUMMARY_KEYS}
        if not args.no_check:
            summary["check"] = hf_llama_torch.check_fixture(out / name)
        sizes = {p.name: p.stat().st_size for p in sorted((out / name).iterdir())}
        print(
            name, json.dumps({**summary, "bytes": sum(sizes.values()), "files": sizes}, indent=1), flush=True
        )
    (out / "rope.json").write_text(json.dumps(hf_llama_torch.rope_table(), indent=1) + "\n")
    print("rope.json:", len(json.loads((out / "rope.json").read_text())), "configurations")


if __name__ == "__main__":
    main()
