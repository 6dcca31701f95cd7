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
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from planner.config import PRESETS


def hf_stage(args: argparse.Namespace, work: Path) -> None:
    """torch on the CPU: save the random model to work/model, its logits and greedy tokens to work/hf.*."""
    import torch
    import transformers
    from make_hf_fixture import build_hf_model, greedy, min_gap

    c = PRESETS[args.size]
    shape = {"vocab_size": c.vocab_size, "n_positions": c.n_positions, "n_embd": c.n_embd, "n_layer": c.n_layer,
                 "n_head": c.n_head}  # fmt: skip
    rng = np.random.default_rng(0)
    ids = rng.integers(0, c.vocab_size, args.tokens).tolist()
    prompts = [rng.integers(0, c.vocab_size, 7).tolist(), rng.integers(0, c.vocab_size, 19).tolist()]
    t0 = time.time()
    with torch.no_grad():
        hf = build_hf_model(seed=0, **shape)
        hf.save_pretrained(work / "model", safe_serialization=True)
        hf32 = hf(torch.tensor([ids])).logits[0].double().numpy()
        hf = hf.double()
        hf64 = hf(torch.tensor([ids])).logits[0].numpy()
        hf_greedy = [greedy(hf, p, args.new) for p in prompts]
        gap = min(min_gap(hf, p, g) for p, g in zip(prompts, hf_greedy))
    np.savez(work / "hf.npz", hf32=hf32, hf64=hf64)
    info = {"ids": ids, "prompts": prompts, "greedy": hf_greedy, "hf_min_greedy_gap": gap,
            "transformers": transformers.__version__, "torch": torch.__version__,
            "hf_seconds": round(time.time() - t0, 1)}  # fmt: skip
    (work / "hf.json").write_text(json.dumps(info))


def jkv_stage(args: argparse.Namespace, work: Path) -> dict:
    """JAX on its default device: load work/model with jkv and compare with work/hf.*."""
    import jax

    import jkv

    t0 = time.time()
    info = json.loads((work / "hf.json").read_text())
    ids, prompts, hf_greedy = info.pop("ids"), info.pop("prompts"), info.pop("greedy")
    ref = np.load(work / "hf.npz")
    hf64 = ref["hf64"]
    result = {"size": args.size, **info, "jax": jax.__version__, "device": str(jax.devices()[0].device_kind)}
    result["max_abs_logit"] = float(np.abs(hf64).max())
    result["hf_float32_vs_float64"] = float(np.abs(ref["hf32"] - hf64).max())
    m32 = jkv.load_model(work / "model", dtype="float32")
    result["jkv_float32"] = float(np.abs(m32.logits(ids) - hf64).max())
    with jax.default_matmul_precision(
        "highest"
    ):  # jkv sets HIGHEST for float32 itself: this should not matter
        result["jkv_float32_global_highest"] = float(np.abs(m32.logits(ids) - hf64).max())
    greedy = jkv.reference_generate(m32, prompts, args.new)
    result["greedy_equal_hf"] = greedy == hf_greedy
    result["greedy_cache_equals_recompute"] = greedy == jkv.reference_generate(
        m32, prompts, args.new, use_cache=False
    )
    result["greedy_matching_prefix"] = [
        next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(greedy, hf_greedy)
    ]
    del m32
    lbf = jkv.load_model(work / "model", dtype="bfloat16").logits(ids)
    result["jkv_bfloat16_rel"] = float(np.abs(lbf - hf64).max()) / result["max_abs_logit"]
    result["jkv_bfloat16_argmax_agree"] = float((lbf.argmax(-1) == hf64.argmax(-1)).mean())
    result["jkv_seconds"] = round(time.time() - t0, 1)
    return result


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
            hf_stage(args, work)
        if args.stage in ("all", "jkv"):
            result = jkv_stage(args, work)
            print(json.dumps(result, indent=1))
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
