"""Incremental detokenization and stop strings: each sequence's text as its tokens arrive, one token at a time.

`IncrementalDetokenizer.feed(token)` extends the text by what the new token adds; a token that ends inside a
multi-byte character (the decoded text ends in U+FFFD) adds nothing until the character completes, so the text
is always a prefix of `decode(all tokens)` and equals it once `flush()` ran. Special tokens (`<|endoftext|>`) are
skipped, as OpenAI-style servers show them.

For a `tokenizers` tokenizer the pieces come from its Rust `DecodeStream` (one call per token, or per round of
tokens when no stop string needs them one at a time); `flush()` adds what a trailing incomplete character
decodes to, as `decode` shows it.

Stop strings are matched on that text as it grows: each feed looks only at the new text and the
`longest stop - 1` characters before it, so a match that straddles tokens is found at the token completing it and
a sequence's text is searched once overall. `visible_text` holds back the tail that could still begin a stop
string, so a streamed text never shows any part of one.
"""

from __future__ import annotations

class IncrementalDetokenizer:
    """The text of a token stream, extended token by token; `stop` strings end it (`stopped_at`)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self._decode = _decoder(tokenizer)
        self._stream = _decode_stream(tokenizer)  # (tokenizers' DecodeStream, its Tokenizer), or None
        self.stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1  # chars that could begin a stop string
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # ids[_prefix:_read]: the text's last complete piece, decoded again as context
        self._read = 0
        self.stopped_at: int | None = None  # text index where the first stop string begins
        self.stop_reason: str | None = None  # the stop string that matched

    def feed(self, token: int) -> bool:
        """Add one token; True when a stop string now appears in the text (the text is cut there)."""
        if self.stopped_at is not None:
            return True
        self.ids.append(int(token))
        return self._extend(int(token))

    def feed_many(self, tokens) -> bool:
        """Add several tokens; True when a stop string now appears. Without stop strings the tokens go to the
        decoder at once (a multi-step round's tokens: one call, not one per token)."""
        if self.stop or self._stream is None:
            return any([self.feed(t) for t in tokens])
        tokens = [int(t) for t in tokens]
        if not tokens:
            return False
        self.ids.extend(tokens)
        return self._extend(tokens)

    def _extend(self, new: int | list[int]) -> bool:
        """Append what the ids just added (`new`) complete to the text; match stop strings on it."""
        if self._stream is not None:
            stream, inner = self._stream
            piece = stream.step(inner, new)  # None: an incomplete character or a skipped special token
            if not piece:
                return False
        else:
            before = self._decode(self.ids[self._prefix : self._read])
            now = self._decode(self.ids[self._prefix :])
            if len(now) <= len(before) or now.endswith("\ufffd"):
                return False  # an incomplete character (or a skipped special token): wait for more
            piece = now[len(before) :]
        searched = max(0, len(self.text) - self._hold)
        self.text += piece
        self._prefix, self._read = self._read, len(self.ids)  # the new piece is the next token's context
        return self._match(searched)

    def flush(self) -> None:
        """The stream ended: keep whatever an incomplete last character decodes to."""
        if self.stopped_at is None and self._read < len(self.ids):
            before = self._decode(self.ids[self._prefix : self._read])
            now = self._decode(self.ids[self._prefix :])
            searched = max(0, len(self.text) - self._hold)
            self.text += now[len(before) :]
            self._read = len(self.ids)
            self._match(searched)

    def _match(self, start: int) -> bool:
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        self.stopped_at, self.stop_reason = min(hits)
        self.text = self.text[: self.stopped_at]
        return True

    def visible_text(self, finished: bool) -> str:
        """The text safe to show: all of it once finished (or stopped), else without the tail that could still
        become the start of a stop string."""
        if finished or self.stopped_at is not None or not self._hold:
            return self.text
        return self.text[: max(0, len(self.text) - self._hold)]


def _decode_stream(tokenizer):
    """(a `tokenizers.decoders.DecodeStream` skipping special tokens, the `tokenizers.Tokenizer` it decodes with)
    for a jkv.tokenizer.Tokenizer; None for any other tokenizer (decoded by differences of `decode`)."""
    inner = getattr(tokenizer, "tokenizer", None)
    try:
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return None
    if not isinstance(inner, Tokenizer):
        return None
    return DecodeStream(skip_special_tokens=True), inner


def _decoder(tokenizer):
    """ids -> text without special tokens (a jkv.tokenizer.Tokenizer, or anything with a `decode`)."""
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and hasattr(inner, "decode"):
        return lambda ids: inner.decode(ids, skip_special_tokens=True)
    return tokenizer.decode
