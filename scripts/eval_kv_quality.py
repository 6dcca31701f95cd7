#!/usr/bin/env python
"""KV-cache quality measured through the cache: perplexity, ΔPPL, KL and top-1 agreement per kv dtype and window.

    python scripts/eval_kv_quality.py [--model DIR | --train] [--smoke] [--json FILE]

Method (docs/kv_quality.md): every held-out sequence's prefix is prefilled into the paged pool of the kv dtype
under test, then each continuation token is fed through the decode path with teacher forcing
(`jkv.scoring.score_through_cache`), so every next-token distribution is computed from K/V that were written to
and read back from the (quantized, windowed) cache. The bfloat16 cache is the reference: ΔPPL, mean
KL(bf16 || this) and top-1 agreement are against it, token by token on the same text.

Model: `--model DIR`, a Hugging Face GPT-2 checkpoint, or (default, `--train`) a GPT-2-architecture model trained
in the same command, fixed seed: 6 layers x 384 wide x 6 heads (head_dim 64, so the Pallas kernels serve it),
512 positions, GPT-2's 50,257-token vocabulary, on English text that ships in every Python: the CPython
documentation topics (`pydoc_data.topics`) and the docstrings of the standard library outside the evaluation
modules (read with `ast`), with every 10th document held out for early stopping. Evaluation text: the docstrings
of a fixed list of other standard-library modules (`inspect.getdoc`), never trained on.

Prints a table last; writes the results as JSON (--json, default $OUT/kv_quality.json when $OUT is set).
`--smoke` runs the whole pipeline on a tiny model in seconds (CPU test).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jkv.bench.kv_quality import EvalOptions, evaluate  # noqa: E402


def fmt_table(rows: list[dict], bf16_bytes: int) -> str:
    head = (f"{'cache':26s} {'attention':9s} {'PPL':>9s} {'ΔPPL %':>8s} {'mean KL':>9s} {'top-1 %':>8s} "
            f"{'B/token':>8s} {'x bf16':>6s} {'tokens/GB':>10s} {'KV/seq MiB':>10s}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['label']:26s} {r['attention']:9s} {r['ppl']:9.3f} {r['delta_ppl_pct']:+8.3f} {r['mean_kl']:9.2e} "
            f"{100 * r['top1_agreement']:8.2f} {r['kv_bytes_per_token']:8d} {r['kv_bytes_per_token'] / bf16_bytes:6.3f} "
            f"{r['tokens_per_gb']:10,d} {r['kv_bytes_per_seq'] / 2**20:10.2f}"
        )  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> EvalOptions:
    D = EvalOptions  # every default lives there
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model", help="a Hugging Face GPT-2 checkpoint directory (config.json + model.safetensors)"
    )
    src.add_argument(
        "--train", action="store_true", help="train a GPT-2-architecture model first (the default)"
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny model, few steps, few sequences: a CPU test in seconds"
    )
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument("--n-layer", type=int, default=D.n_layer, help="trained model: layers")
    p.add_argument("--n-embd", type=int, default=D.n_embd, help="trained model: width")
    p.add_argument(
        "--n-head", type=int, default=D.n_head, help="trained model: heads (head_dim 64 suits the kernels)"
    )
    p.add_argument("--n-positions", type=int, default=D.n_positions, help="trained model: context")
    p.add_argument(
        "--steps", type=int, default=D.steps, help="most training steps (early stopping may end sooner)"
    )
    p.add_argument("--batch", type=int, default=D.batch, help="training sequences per step")
    p.add_argument("--train-seq-len", type=int, default=D.train_seq_len)
    p.add_argument("--lr", type=float, default=D.lr)
    p.add_argument("--warmup", type=int, default=D.warmup)
    p.add_argument("--eval-every", type=int, default=D.eval_every)
    p.add_argument(
        "--patience", type=int, default=D.patience, help="evaluations without improvement before stopping"
    )
    p.add_argument("--max-train-seconds", type=float, default=D.max_train_seconds)
    p.add_argument("--num-seqs", type=int, default=D.num_seqs, help="held-out sequences scored")
    p.add_argument("--prefix", type=int, default=D.prefix, help="tokens prefilled into the cache")
    p.add_argument(
        "--continuation", type=int, default=D.continuation, help="tokens scored through decode steps"
    )
    p.add_argument("--block-size", type=int, default=D.block_size)
    p.add_argument("--kv-dtypes", default=D.kv_dtypes)
    p.add_argument("--windows", default=D.windows, help="sliding windows to score with a bfloat16 cache")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the bf16 cache with jnp attention (the measurement's noise floor)")  # fmt: skip
    p.add_argument("--json", help="write results here (default: $OUT/kv_quality.json when $OUT is set)")
    # --smoke: tiny everything; explicit options given after --smoke do not override these (EvalOptions.smoke).
    return EvalOptions(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        result = evaluate(args, command=" ".join(sys.argv))
    except ValueError as err:
        raise SystemExit(str(err)) from None
    rows, targets_out = result["rows"], result["targets"]
    bf16_bytes = rows[0]["kv_bytes_per_token"]  # the reference row: the bfloat16 cache
    print("\ntargets (issue 6):")
    for c in targets_out:
        print(
            f"  {c['kv']:14s} {c['metric']:18s} {c['value']:.4g} {c['target']:9s} {'hit' if c['hit'] else 'MISS'}"
        )
    print(f"\nKV cache quality through the cache, reference = bfloat16 cache; {result['eval_text']['tokens_scored']:,} "
          f"tokens scored; {result['device']}, JAX {result['jax']}, {result['date']}:\n")  # fmt: skip
    print(fmt_table(rows, bf16_bytes))
    return result


if __name__ == "__main__":
    main()
