"""The one shape and bucketing policy of the engine's device steps, shared by the scheduler, the runner, warm-up
and the planner.

Every jitted step has static shapes, so each distinct (rows, chunk, block-table width) compiles once. The policy:

- rows: the next power of two of the sequences in the step, at most `max_num_seqs` (the planner sizes the step
  workspace for that many rows);
- decode chunk 1; prefill chunk: the next power of two of the longest chunk, at least PREFILL_MIN_CHUNK;
- block-table width: the next power of two of the longest row's blocks. The Pallas prefill kernel loops only up to
  each row's own length, so with it every prefill takes the longest sequence's width (one shape per (rows, chunk)
  instead of one per width as well); the reference prefill gathers the whole table, so its width is bucketed.
- a prefill step's padded size (rows x chunk) never exceeds `padded_prefill_tokens(budget)`: the scheduler adds a
  chunk only while that holds, and the planner prices that many query positions.

Pure Python: no JAX, no device.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFILL_MIN_CHUNK = 16  # smallest prefill chunk bucket


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return 1 << max(0, (max(n, minimum, 1) - 1).bit_length())


def padded_prefill_tokens(prefill_chunk: int) -> int:
    """The most query positions (padded rows x padded chunk) a prefill step of a `prefill_chunk`-token budget runs:
    the budget rounded up to a power of two (and to at least PREFILL_MIN_CHUNK)."""
    return bucket(prefill_chunk, PREFILL_MIN_CHUNK)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class StepShape:
    """One compiled step: its kind ('decode', 'steps' for a multi-step decode round, 'prefill'), sampling variant,
    and bucketed (rows, chunk, width)."""

    kind: str
    greedy: bool
    rows: int
    chunk: int
    width: int

    @property
    def dims(self) -> tuple[int, int, int]:
        return self.rows, self.chunk, self.width


@dataclass(frozen=True, slots=True)
class ShapePolicy:
    """The bucketed shapes of one engine's steps (see the module docstring)."""

    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int  # the prefill budget per step
    max_seq_len: int
    decode_steps: int = 1  # multi-step decode rounds of this many steps ('steps' shapes when > 1)
    full_width_prefill: bool = False  # True with the Pallas prefill kernel (loops stop at each row's length)

    def rows(self, n: int) -> int:
        """Rows of a step over n sequences."""
        return min(bucket(n), self.max_num_seqs)

    def width(self, tokens: int) -> int:
        """Block-table width of a decode step whose longest row holds `tokens` tokens (the decode kernel splits
        its work by this width, so it stays tight)."""
        return bucket(cdiv(tokens, self.block_size))

    def prefill_chunk(self, longest: int) -> int:
        return bucket(longest, PREFILL_MIN_CHUNK)

    def prefill_width(self, tokens: int) -> int:
        """A prefill's block-table width, its longest row ending at `tokens` tokens."""
        return self.width(self.max_seq_len if self.full_width_prefill else tokens)

    def prefill_positions(self, rows: int, longest: int) -> int:
        """Query positions a prefill step of `rows` chunks, the longest `longest` tokens, computes after padding."""
        return self.rows(rows) * self.prefill_chunk(longest)

    @property
    def max_prefill_positions(self) -> int:
        """The padded prefill size the scheduler keeps every prefill step within (the planner prices it)."""
        return padded_prefill_tokens(self.max_num_batched_tokens)

    def all_shapes(self, greedy: bool | None = None) -> list[StepShape]:
        """Every step this policy can produce, as the scheduler and the runner bucket them.

        greedy None lists both the greedy and the sampling variant of each shape. A prefill (rows, chunk) pair is
        listed only when the token budget can fill it (one chunk long enough for the chunk bucket plus one token
        for each other row) and its padded size is within `max_prefill_positions`.
        """
        modes = (True, False) if greedy is None else (bool(greedy),)
        budget = self.max_num_batched_tokens
        first_n: dict[int, int] = {}  # rows bucket -> the fewest sequences that make it
        for n in range(1, self.max_num_seqs + 1):
            first_n.setdefault(self.rows(n), n)
        widths = sorted({self.width(t) for t in range(1, self.max_seq_len + 1)})
        first_len: dict[int, int] = {}  # chunk bucket -> the shortest chunk that makes it
        for n in range(1, min(budget, self.max_seq_len) + 1):
            first_len.setdefault(self.prefill_chunk(n), n)
        prefill = [(b, c, w) for c, n_min in first_len.items() for b, k_min in first_n.items()
                   if n_min + (k_min - 1) <= budget and b * c <= self.max_prefill_positions
                   for w in sorted({self.prefill_width(t) for t in range(n_min, self.max_seq_len + 1)})]  # fmt: skip
        shapes = []
        for g in modes:
            for b in first_n:
                for w in widths:
                    shapes.append(StepShape("decode", g, b, 1, w))
                    if self.decode_steps > 1:
                        shapes.append(StepShape("steps", g, b, 1, w))
            shapes += [StepShape("prefill", g, b, c, w) for b, c, w in prefill]
        return shapes

    def copy_buckets(self) -> list[int]:
        """Sizes of copy-on-write calls (at most one copy per decode row per round)."""
        return sorted({bucket(n) for n in range(1, self.max_num_seqs + 1)})
