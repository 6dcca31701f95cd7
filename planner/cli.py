"""The planner's command line: `jkv plan --hbm 24GB [--model llama-3.1-8b] [--json]` (also `scripts/plan.py`).

Bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from kvspec.layout import DTYPE_BYTES, KV_DTYPES
from kvspec.config import preset_names
from planner import PlanError, PlanOptions, load_config, make_plan, parse_size, plan_to_dict


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2, no usage dump
        print(f"{self.prog}: {message} (see --help).", file=sys.stderr)
        sys.exit(2)


def _parser(prog: str) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Static KV-cache plan for a model's config.json on a device of a given memory.")
    p.add_argument("--hbm", required=True, help="device memory: 24GB (powers of 10) or 24GiB (powers of 2)")
    p.add_argument("--model", default="gpt2", help=f"a preset ({', '.join(preset_names())}) or a checkpoint dir "
                   "holding config.json")
    p.add_argument("--dtype", default=None, help=f"weights/compute: {', '.join(DTYPE_BYTES)} (default: the config's "
                   "torch_dtype, else bfloat16)")
    p.add_argument("--kv-dtype", default=None, help=f"KV cache: {', '.join(KV_DTYPES)} (default: --dtype)")
    p.add_argument("--block-size", default="16", help="tokens per KV block, a power of two (default 16)")
    p.add_argument("--max-seq-len", default=None, help="longest sequence (default: the model's positions)")
    p.add_argument("--utilization", default="0.9", help="fraction of the device jkv may use (default 0.9)")
    p.add_argument("--tp", default="1", help="tensor-parallel degree: per-device figures (default 1)")
    p.add_argument("--max-num-seqs", default=None, help="engine's decode batch cap (default: solved for)")
    p.add_argument("--prefill-chunk", default="2048", help="tokens per prefill step (default 2048)")
    p.add_argument("--reserve", default=None, help="memory outside JAX's pool (default: 636MiB + 0.25MiB per layer, measured on an H200; "
                   "measure_memory.py prints your machine's)")
    p.add_argument("--sliding-window", default=None, help="attend to the last W tokens only")
    p.add_argument("--seq-lens", default=None, help="comma-separated lengths: exact fragmentation for them")
    p.add_argument("--naive-attention", action="store_true", help="size a naive prefill's B*H*T^2 score workspace")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    return p


def _int(name: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise PlanError(f"{name} {text!r} must be a whole number.") from None


def _glue_negative_values(argv: list[str]) -> list[str]:
    """`--hbm -3GB` -> `--hbm=-3GB`, so a negative size reaches our own check instead of argparse's."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and arg[:1] == "-" and arg[1:2].isdigit():
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None, prog: str = "jkv plan") -> int:
    args = _parser(prog).parse_args(_glue_negative_values(sys.argv[1:] if argv is None else argv))
    try:
        config = load_config(args.model)
        window = _int("--sliding-window", args.sliding_window)
        if window is not None:
            if not 1 <= window <= config.n_positions:
                raise PlanError(
                    f"--sliding-window {window} must be between 1 and the model's {config.n_positions} positions (a "
                    "longer window never limits attention: leave the flag out)."
                )
            config = config.replace(sliding_window=window)
        try:
            utilization = float(args.utilization)
        except ValueError:
            raise PlanError(f"--utilization {args.utilization!r} must be a number in (0, 1].") from None
        seq_lens = None
        if args.seq_lens:
            seq_lens = tuple(_int("--seq-lens entry", s.strip()) for s in args.seq_lens.split(",") if s.strip())
            if not seq_lens or min(seq_lens) < 1:
                raise PlanError("--seq-lens must list positive lengths, like 100,700,1024.")
        options = PlanOptions(
            hbm_bytes=parse_size(args.hbm),
            dtype=args.dtype,
            kv_dtype=args.kv_dtype,
            block_size=_int("--block-size", args.block_size),
            max_seq_len=_int("--max-seq-len", args.max_seq_len),
            utilization=utilization,
            tp=_int("--tp", args.tp),
            max_num_seqs=_int("--max-num-seqs", args.max_num_seqs),
            prefill_chunk=_int("--prefill-chunk", args.prefill_chunk),
            reserve_bytes=None if args.reserve is None else parse_size(args.reserve),
            naive_attention=args.naive_attention,
            seq_lens=seq_lens,
        )
        plan = make_plan(config, options)
    except PlanError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan_to_dict(plan), indent=2))
    else:
        from planner.report import print_report

        print_report(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
