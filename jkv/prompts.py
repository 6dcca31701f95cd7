"""What counts as a prompt: the one rule `jkv.generate`, `Engine.add_request` and `reference_generate` share.

`as_prompt_list` turns what a caller passed as "the prompts" into a list of prompts, each a `str` (the engine
tokenizes it) or a list of Python int token ids:

    "Hello"                        one text prompt            -> ["Hello"]
    [1, 2, 3], (1, 2, 3), 1-D int array                       -> [[1, 2, 3]]
    ["Hi", [1, 2], np.array([3])]  several prompts, mixed     -> ["Hi", [1, 2], [3]]
    2-D int array [B, T]           one prompt per row         -> B lists of T ids
    [] / () / a [0, T] int array   no prompts                 -> []
    [[]]                           one empty prompt           -> [[]]

NOTE: the two functions split the checks by who is at fault. `as_prompt_list` raises (TypeError) when the call
itself is malformed: floats or bools as ids, a 3-D nesting, a dict, None, ids mixed with prompts. Those are
programming errors, so the whole call fails. It keeps empty prompts and does not look at the vocabulary:
whether one prompt is usable (non-empty, ids in range) is that prompt's problem, which `as_token_ids` reports as
a ValueError, and `generate` turns into that request's `.error` while it serves the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

_WHAT_TO_PASS = "pass a string, a list of int token ids, or a list of those (one per prompt)"


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_array(x: Any) -> bool:
    """numpy arrays and anything that converts like one (jax arrays), but not lists, tuples or scalars."""
    return isinstance(x, np.ndarray) or (hasattr(x, "__array__") and hasattr(x, "dtype") and hasattr(x, "ndim"))


def _is_scalar(x: Any) -> bool:
    """A number or bool (Python or numpy): what a flat list of token ids holds, right type or not."""
    return isinstance(x, (int, float, complex, np.generic)) and not isinstance(x, (str, bytes))


def _describe(x: Any) -> str:
    if _is_array(x):
        return f"a {np.ndim(x)}-D array of dtype {np.asarray(x).dtype}"
    if x is None:
        return "None"
    text = repr(x)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(x).__name__})"


def _ids(prompt: Any, what: str) -> list[int]:
    """One prompt of token ids (list, tuple, range, 1-D integer array) as Python ints; no range or length check."""
    if isinstance(prompt, str):
        raise TypeError(f"{what} is a string: tokenize it first and pass its int token ids.")
    if _is_array(prompt):
        arr = np.asarray(prompt)
        if arr.ndim != 1:
            raise TypeError(f"{what} is {_describe(prompt)}: pass a 1-D array of int token ids.")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(
                f"{what} is an array of dtype {arr.dtype}: token ids must be integers; pass an int array "
                "(e.g. arr.astype(np.int32) if the values are whole numbers)."
            )
        return arr.tolist()
    if isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        for i, t in enumerate(prompt):
            if not _is_int(t):
                raise TypeError(
                    f"{what} holds {t!r} ({type(t).__name__}) at index {i}: token ids must be ints; pass a list "
                    "of ints or an int numpy array."
                )
        return [int(t) for t in prompt]
    raise TypeError(f"{what} is {_describe(prompt)}: pass a list of int token ids or a 1-D int array.")


def as_prompt_list(prompts: Any) -> list[str | list[int]]:
    """The prompts a caller passed, as a list of prompts (each a `str` or a list of Python int token ids).

    A bare `str` is one prompt. A flat sequence or 1-D integer array of ids is one prompt. A sequence of strings
    and/or id sequences is several prompts. A 2-D integer array is one prompt per row. An empty list or tuple is
    no prompts (returns []). Anything else raises TypeError naming what was passed (its dtype, for an array).
    Empty prompts inside a list are kept (`as_token_ids` rejects them, per prompt).
    """
    if isinstance(prompts, str):
        return [prompts]
    if _is_array(prompts):
        arr = np.asarray(prompts)
        if arr.ndim not in (1, 2) or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(
                f"prompts is {_describe(prompts)}: pass a 1-D (one prompt) or 2-D (one per row) int array."
            )
        return [arr.tolist()] if arr.ndim == 1 else [row.tolist() for row in arr]
    if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
        raise TypeError(f"prompts is {_describe(prompts)}: {_WHAT_TO_PASS}.")
    if len(prompts) == 0:
        return []
    scalars = [_is_scalar(p) for p in prompts]
    if all(scalars):  # one prompt of ids: _ids names a float or bool among them
        return [_ids(prompts, "the prompt")]
    if any(scalars):
        i = scalars.index(True)
        raise TypeError(
            f"prompts mixes token ids (item {i} is {prompts[i]!r}) with other items: pass one prompt as a flat "
            "list of ints, or several prompts as a list of lists."
        )
    out: list[str | list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append(p)
        elif _is_array(p) or (isinstance(p, Sequence) and not isinstance(p, (bytes, bytearray))):
            out.append(_ids(p, f"prompt {i}"))
        else:
            raise TypeError(f"prompt {i} is {_describe(p)}: {_WHAT_TO_PASS}.")
    return out


def as_token_ids(prompt: Any, vocab_size: int, *, what: str = "the prompt") -> list[int]:
    """One prompt of token ids (list, tuple, 1-D array; Python or numpy ints) as a list of Python ints.

    Raises TypeError for a string, a float or bool dtype, or a nested prompt (`what` names the prompt), and
    ValueError for an empty prompt or an id outside [0, vocab_size) (the first bad id is named).
    """
    assert _is_int(vocab_size) and vocab_size > 0, vocab_size
    ids = _ids(prompt, what)
    if not ids:
        raise ValueError(f"{what} is empty: give at least one token.")
    if min(ids) < 0 or max(ids) >= vocab_size:
        i, t = next((i, t) for i, t in enumerate(ids) if not 0 <= t < vocab_size)
        raise ValueError(
            f"{what} holds id {t} at index {i}, outside the vocabulary [0, {vocab_size}): pass ids in that range."
        )
    return ids
