"""jkv.prompts: the one rule for what a prompt is (shared by jkv.generate and jkv.reference_generate)."""

import numpy as np
import pytest

from jkv.prompts import as_prompt_list, as_token_ids

RNG = np.random.default_rng(20)
IDS = RNG.integers(1, 97, 7).tolist()  # one prompt of random non-zero ids below the tiny vocab of 97
ROWS = RNG.integers(1, 97, (3, 5))  # a [3, 5] batch of them


# --- as_prompt_list: what the caller meant ---


def test_a_bare_string_is_one_prompt_not_one_per_character():
    assert as_prompt_list("Hello") == ["Hello"]


@pytest.mark.parametrize(
    "flat", [IDS, tuple(IDS), np.array(IDS), np.array(IDS, np.int32), np.array(IDS, np.uint16),
             [np.int64(t) for t in IDS], range(3, 9)],
)  # fmt: skip
def test_a_flat_sequence_of_ints_is_one_prompt(flat):
    got = as_prompt_list(flat)
    assert got == [list(flat)] and len(got) == 1
    assert all(type(t) is int for t in got[0])  # numpy ints become Python ints


def test_several_prompts_text_and_ids_mixed():
    got = as_prompt_list(["Hi there", IDS, tuple(IDS[:2]), np.array(IDS[3:]), [np.int32(IDS[0])]])
    assert got == ["Hi there", IDS, IDS[:2], IDS[3:], [IDS[0]]]
    assert all(type(t) is int for p in got[1:] for t in p)
    assert as_prompt_list(("a", "b")) == ["a", "b"]


def test_a_2d_int_array_is_one_prompt_per_row():
    got = as_prompt_list(ROWS)
    assert got == [list(r) for r in ROWS.tolist()] and len(got) == 3
    assert as_prompt_list(ROWS.astype(np.uint8)) == got
    assert as_prompt_list(np.zeros((0, 4), np.int32)) == []


def test_no_prompts_and_empty_prompts():
    # An empty list or tuple is no prompts; an empty prompt inside a list is kept, for as_token_ids to reject
    # per prompt (generate reports it as that request's error and serves the others).
    assert as_prompt_list([]) == [] and as_prompt_list(()) == []
    assert as_prompt_list([[]]) == [[]]
    assert as_prompt_list([IDS, [], "x"]) == [IDS, [], "x"]


@pytest.mark.parametrize(
    "prompts, match",
    [([1.0, 2.0, 3.0], r"holds 1\.0 \(float\) at index 0"),
     ([IDS[0], 2.5], r"holds 2\.5 \(float\) at index 1"),
     ([True, False], r"holds True \(bool\)"),
     ([np.float32(IDS[0])], r"float32"),
     (np.array(IDS, np.float64), r"dtype float64"),
     (ROWS.astype(np.float32), r"2-D array of dtype float32"),
     (np.array(IDS) > 40, r"dtype bool"),
     (ROWS[None], r"3-D array"),
     (np.int64(5), r"0-D array"),
     ([[IDS, IDS]], r"prompt 0 holds \[.*\] \(list\) at index 0"),
     ([ROWS], r"prompt 0 is a 2-D array"),
     ([[1.5, 2.0]], r"prompt 0 holds 1\.5 \(float\)"),
     ([np.array([1.5])], r"prompt 0 is an array of dtype float64"),
     ([IDS[0], IDS], r"mixes token ids"),
     (["hi", 3], r"mixes token ids \(item 1 is 3\)"),
     ({"a": 1}, r"prompts is \{'a': 1\} \(dict\)"),
     (None, r"prompts is None"),
     (7, r"prompts is 7 \(int\)"),
     (b"abc", r"\(bytes\)"),
     ({1, 2}, r"\(set\)"),
     (["ok", None], r"prompt 1 is None"),
     ([{"a": 1}], r"prompt 0 is \{'a': 1\} \(dict\)")],
)  # fmt: skip
def test_rejected_prompts_name_what_was_passed(prompts, match):
    with pytest.raises(TypeError, match=match) as err:
        as_prompt_list(prompts)
    assert " pass " in str(err.value)  # and say what to pass


# --- as_token_ids: one prompt of ids ---


@pytest.mark.parametrize("prompt", [IDS, tuple(IDS), np.array(IDS), np.array(IDS, np.int16), np.array(IDS, np.uint64),
                                    [np.int64(t) for t in IDS]])  # fmt: skip
def test_token_ids_become_python_ints(prompt):
    got = as_token_ids(prompt, 97)
    assert got == IDS and all(type(t) is int for t in got)


def test_token_ids_edges_of_the_vocabulary():
    assert as_token_ids([0, 96], 97) == [0, 96]
    assert as_token_ids([5], 6) == [5]


def test_empty_prompt():
    for empty in ([], (), np.array([], np.int32)):
        with pytest.raises(ValueError, match=r"^the prompt is empty: give at least one token\.$"):
            as_token_ids(empty, 97)
    with pytest.raises(ValueError, match=r"^prompt 3 is empty"):
        as_token_ids([], 97, what="prompt 3")


@pytest.mark.parametrize(
    "prompt, match",
    [([*IDS[:2], 97, 200], r"holds id 97 at index 2, outside the vocabulary \[0, 97\)"),
     ([*IDS[:3], -1, 500], r"holds id -1 at index 3, outside"),
     (np.array([*IDS, 1000]), r"holds id 1000 at index 7, outside")],
)  # fmt: skip
def test_ids_outside_the_vocabulary_name_the_first_bad_one(prompt, match):
    with pytest.raises(ValueError, match=match):
        as_token_ids(prompt, 97)


@pytest.mark.parametrize(
    "prompt, match",
    [(np.array(IDS, np.float32), r"dtype float32"),
     (np.array([1.0, 2.0]), r"dtype float64"),
     (np.array([True, False]), r"dtype bool"),
     ([*IDS[:2], 3.0], r"holds 3\.0 \(float\) at index 2"),
     ([IDS[0], True], r"holds True \(bool\) at index 1"),
     (ROWS, r"2-D array"),
     ([IDS], r"holds \[.*\] \(list\) at index 0"),
     ("Hello", r"is a string: tokenize it first"),
     (None, r"is None"),
     (5, r"is 5 \(int\)")],
)  # fmt: skip
def test_wrong_types_are_rejected_with_the_type_named(prompt, match):
    with pytest.raises(TypeError, match=match):
        as_token_ids(prompt, 97)
