"""Convert GPT-2 weights between a Hugging Face directory and jkv's orbax checkpoint, either way.

    python scripts/convert.py DIR OUT [--dtype float32|bfloat16|float16]

DIR a Hugging Face GPT-2 directory (config.json + model.safetensors, a sharded index or flax_model.msgpack)
    -> OUT/config.json + OUT/params/ (orbax), loadable with `jkv.load_model(OUT)`.
DIR a jkv orbax checkpoint (config.json + params/)
    -> OUT/config.json + OUT/model.safetensors (torch layout, loadable by transformers' GPT2LMHeadModel).
Tokenizer files (tokenizer.json, vocab.json, merges.txt) are copied along. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jkv.weights import DTYPES, ORBAX_DIR, load_model, save_orbax, save_safetensors

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def convert(src: str | Path, out: str | Path, dtype: str = "float32") -> str:
    """Convert `src` into `out` (direction from what `src` holds); returns "orbax" or "safetensors"."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ValueError(
            f"{src} is not a directory: pass a Hugging Face GPT-2 directory or a jkv orbax checkpoint."
        )
    if src.resolve() == out.resolve():
        raise ValueError("DIR and OUT are the same directory: pick a new OUT.")
    model = load_model(src, dtype=dtype)
    to_hf = (src / ORBAX_DIR).is_dir() and not any(
        (src / f).is_file()
        for f in ("model.safetensors", "model.safetensors.index.json", "flax_model.msgpack")
    )
    if to_hf:
        save_safetensors(model.params, model.config, out)
    else:
        save_orbax(model.params, model.config, out)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return "safetensors" if to_hf else "orbax"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="Hugging Face GPT-2 directory, or a jkv orbax checkpoint")
    parser.add_argument("out", help="output directory (new, or without weights in it)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="weight dtype to write")
    args = parser.parse_args(argv)
    try:
        kind = convert(args.dir, args.out, args.dtype)
    except ValueError as err:
        print(f"convert.py: {err}", file=sys.stderr)
        return 2
    print(f"wrote {kind} checkpoint to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
