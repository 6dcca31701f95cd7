"""The torch side of the Hugging Face comparisons for the Llama family (llama, mistral, qwen2, qwen3): random
models scaled so attention is peaked, their float64 logits and greedy continuations, an offline byte-level BPE
tokenizer with each family's chat template, the tiny fixtures (tests/fixtures/hf_tiny_llama/) and the `hf` stage
of scripts/check_llama_parity.py at any size.

Runs where torch and transformers are installed, OUTSIDE jkv's environment (a throwaway venv, Python 3.11 will
do): it imports neither JAX nor jkv's engine.

Every weight is rounded to a bfloat16 value (and kept in float32 / float64), so the checkpoint is stored in
bfloat16 exactly and the float64 reference is the same model. q/k projections are drawn large (for qwen3, whose
q_norm / k_norm rescale q and k, the norm weights are) so that attention is far from uniform; RMSNorm weights are
1 + 0.2·N(0, 1) and biases 0.1·N(0, 1), so a tensor loaded into the wrong slot moves the logits.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

QK_SCALE = 2.0  # q, k entries of std ~2 after the projection: q.k / sqrt(D) of std ~4, a peaked softmax
QK_NORM_SCALE = 2.0  # the same for qwen3, where q_norm / k_norm set the scale of q and k
EMBED_SCALE = 0.5
TIED_EMBED_SCALE = 0.1  # tied: a small embedding keeps the residual from predicting the input token again
N_IDS = 32  # random ids in the logits comparison
# two prompts; with MAX_NEW_TOKENS each sequence runs past 30 tokens (far past mistral's window of 8)
PROMPT_LENS = (7, 13)
MAX_NEW_TOKENS = 24
VOCAB_SIZE = 384  # the fixtures' BPE, special tokens included

SPECIAL_TOKENS = {  # family -> (special tokens in id order after the byte alphabet's merges, bos, eos list)
    "llama": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
              "<|begin_of_text|>", ["<|end_of_text|>", "<|eot_id|>"]),
    "mistral": (["<s>", "</s>", "[INST]", "[/INST]"], "<s>", ["</s>"]),
    "qwen": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, ["<|im_end|>"]),
}  # fmt: skip

# Short versions of the templates the models ship (Llama-3.1, Mistral-7B-Instruct, Qwen2.5 / Qwen3's ChatML).
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] + '\\n\\n' %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first %}{{- '[INST] ' + system_message + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported after a system message.') }}"
    "{%- endif %}"
    "{%- endfor %}"
)
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Where does the river meet the sea?"},
]
TOKENIZE_TEXT = "The old mill stood by the river, and its wheel turned slowly in the cold water."

CORPUS = """\
The river rises in the hills above the town and runs for many miles before it reaches the sea. In spring the water
is high and fast, and the old mill by the bridge turns its wheel from morning until night. The miller and his
daughter keep the stones sharp and the grain dry; they sell flour to the bakers in the market square, where the
church clock strikes the hours and the children play between the stalls. In summer the river is slow and warm.
Boys swim under the bridge, fishermen sit on the bank with their long rods, and the herons stand in the shallows,
still as stones, waiting for a fish to come near. When the autumn rains return, the water turns brown and cold,
leaves drift past the mill, and the wheel turns faster again. In winter the edges of the river freeze, the
market is quiet, and the town waits for the light to come back. People say that the river has changed its course
three times in a thousand years, and that the oldest houses once stood on its other side. Nobody knows if that is
true, but the stories are told every year at the harvest feast, when the whole town eats bread made from the
mill's flour and sings the old songs about the water, the hills, and the long road down to the sea. Where does the
river meet the sea? Far to the south, past the marshes and the salt flats, where the gulls cry over the grey
waves and the ships wait in the harbour for the tide. 0123456789 + - * / = ( ) [ ] ? ! ; : ' " , .
"""

FAMILIES = {  # family -> (model_type, tokenizer/chat family, chat template)
    "llama": ("llama", "llama", LLAMA3_TEMPLATE),
    "mistral": ("mistral", "mistral", MISTRAL_TEMPLATE),
    "qwen2": ("qwen2", "qwen", CHATML_TEMPLATE),
    "qwen3": ("qwen3", "qwen", CHATML_TEMPLATE),
}

BASE = {
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
}
GQA64 = {"hidden_size": 64, "head_dim": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
FIXTURES = {  # name -> (family, config kwargs); vocab_size is the tokenizer's
    "llama": ("llama", {**BASE, **GQA64, "tie_word_embeddings": False, "attention_bias": False,
                        "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 16}}),
    "mistral": ("mistral", {**BASE, **GQA64, "sliding_window": 8, "tie_word_embeddings": False,
                            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "qwen2": ("qwen2", {**BASE, "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
                        "tie_word_embeddings": True, "use_sliding_window": False,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    "qwen3": ("qwen3", {**BASE, **GQA64, "tie_word_embeddings": False, "attention_bias": False,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    "llama_yarn": ("llama", {**BASE, **GQA64, "max_position_embeddings": 64, "tie_word_embeddings": True,
                             "attention_bias": True, "mlp_bias": True,
                             "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                 "original_max_position_embeddings": 16}}),
}  # fmt: skip


def build_hf_model(family: str, seed: int = 0, **shape) -> torch.nn.Module:
    """A random `family` model (float32 holding bfloat16 values) with peaked attention (module docstring).
    `shape` is the family's config kwargs (hidden_size, num_hidden_layers, vocab_size, rope_parameters, ...)."""
    if family not in FAMILIES:
        raise ValueError(f"{family=} must be one of {sorted(FAMILIES)}")
    torch.manual_seed(seed)
    config = AutoConfig.for_model(FAMILIES[family][0], **shape)
    # sdpa, not eager: HF's eager attention takes its softmax in float32 even in a float64 model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(QK_NORM_SCALE * (1.0 + 0.2 * torch.randn_like(p)))
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith(("q_proj.weight", "k_proj.weight")) and family != "qwen3":
                p.copy_(QK_SCALE * torch.randn_like(p) / p.shape[1] ** 0.5)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(
                    torch.randn_like(p) * (TIED_EMBED_SCALE if config.tie_word_embeddings else EMBED_SCALE)
                )
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)  # [out, in]: fan_in is dim 1
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model


def next_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]  # [T, V]


def greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """`generate(do_sample=False)` for exactly n tokens, checked against a plain argmax loop (full recompute), so
    no eos suppression or other processor changed a token."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
        pad_token_id=0, eos_token_id=None,
    )[0, len(prompt) :].tolist()  # fmt: skip
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(next_logits(model, seq)[-1].argmax()))
    assert seq[len(prompt) :] == out, ("generate and the argmax loop disagree", out, seq[len(prompt) :])
    return out


def min_gap(model: torch.nn.Module, prompt: list[int], continuation: list[int]) -> float:
    """Smallest top-1 minus top-2 logit along the greedy path: how safe the argmax is."""
    logits = next_logits(model, prompt + continuation)[len(prompt) - 1 : -1].double()
    top = torch.topk(logits, 2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


def mean_max_attention(model: torch.nn.Module, ids: list[int]) -> float:
    """Mean over layers, heads and query positions (past the 4th) of the largest attention probability."""
    model.set_attn_implementation("eager")  # the only one that returns attention probabilities
    with torch.no_grad():
        att = model(torch.tensor([ids]), output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    return float(torch.stack([a[0, :, 4:].max(-1).values.mean() for a in att]).mean())


def manual_logits(model: torch.nn.Module, ids: list[int], window: int | None = None,
                  window_inclusive: bool = False, hf_float32: bool = False) -> np.ndarray:  # fmt: skip
    """An independent float64 forward of `model` from its weights and its rotary embedding's inv_freq and
    attention_scaling. Query i sees keys j <= i with j > i - window (or j >= i - window when `window_inclusive`).
    With `hf_float32`, the two steps that HF runs in float32 even in a float64 model are float32 here too: RoPE's
    angles, cos and sin, and RMSNorm's x * rsqrt(mean(x^2) + eps) (the weight multiplies after the cast back).
    Pins down HF's sliding-window semantics and how far HF's float64 is from float64 throughout."""
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    w = lambda n: sd[n]
    b = lambda n: sd.get(n)

    def lin(x, n):
        y = x @ w(n + ".weight").T
        return y if b(n + ".bias") is None else y + b(n + ".bias")

    def rms(x, n):
        x = x.float() if hf_float32 else x
        return (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + c.rms_norm_eps)).double() * w(n + ".weight")

    def rope(x, cos, sin):  # x [H, T, D]
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    rot = model.model.rotary_emb
    T = len(ids)
    H, K = c.num_attention_heads, c.num_key_value_heads
    D = getattr(c, "head_dim", None) or c.hidden_size // H
    dt = torch.float32 if hf_float32 else torch.float64
    ang = torch.arange(T, dtype=dt)[:, None] * rot.inv_freq.to(dt)[None]  # [T, D/2]
    cos = (torch.cat([ang, ang], -1).cos() * rot.attention_scaling).double()  # [T, D]
    sin = (torch.cat([ang, ang], -1).sin() * rot.attention_scaling).double()
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    allowed = j <= i
    if window is not None:
        allowed &= (j >= i - window) if window_inclusive else (j > i - window)
    x = w("model.embed_tokens.weight")[torch.tensor(ids)]  # [T, E]
    for layer in range(c.num_hidden_layers):
        p = f"model.layers.{layer}."
        h = rms(x, p + "input_layernorm")
        q = lin(h, p + "self_attn.q_proj").view(T, H, D).transpose(0, 1)  # [H, T, D]
        k = lin(h, p + "self_attn.k_proj").view(T, K, D).transpose(0, 1)  # [K, T, D]
        v = lin(h, p + "self_attn.v_proj").view(T, K, D).transpose(0, 1)
        if p + "self_attn.q_norm.weight" in sd:
            q, k = rms(q, p + "self_attn.q_norm"), rms(k, p + "self_attn.k_norm")
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k, v = k.repeat_interleave(H // K, 0), v.repeat_interleave(H // K, 0)  # [H, T, D]
        s = (q @ k.transpose(1, 2)) / D**0.5  # [H, T, T]
        a = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v  # [H, T, D]
        x = x + lin(a.transpose(0, 1).reshape(T, H * D), p + "self_attn.o_proj")
        h = rms(x, p + "post_attention_layernorm")
        act = torch.nn.functional.silu(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj")
        x = x + lin(act, p + "mlp.down_proj")
    x = rms(x, "model.norm")
    head = sd.get("lm_head.weight", w("model.embed_tokens.weight"))
    return (x @ head.T).numpy()  # [T, V]


def train_tokenizer(chat_family: str) -> tuple[tokenizers.Tokenizer, str | None, list[str]]:
    """A byte-level BPE of VOCAB_SIZE ids (256 bytes, merges, then the family's special tokens) trained on CORPUS;
    deterministic. Returns it with its bos token and eos tokens."""
    specials, bos, eos = SPECIAL_TOKENS[chat_family]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False, min_frequency=1,
    )  # fmt: skip
    tok.train_from_iterator([CORPUS], trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE - len(specials), tok.get_vocab_size()
    tok.add_special_tokens(specials)  # ids VOCAB_SIZE - len(specials) ... VOCAB_SIZE - 1
    if bos is not None:  # like Llama-3's tokenizer.json: encode(add_special_tokens=True) prepends bos
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok, bos, eos


def write_tokenizer(out: Path, family: str) -> dict:
    """tokenizer.json + tokenizer_config.json (with the chat template inline, as Llama-3.1 and Qwen2.5 ship it);
    returns the HF-rendered chat and tokenization for expected.json."""
    _, chat_family, template = FAMILIES[family]
    tok, bos, eos = train_tokenizer(chat_family)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos[0],
        "pad_token": None, "unk_token": None, "add_bos_token": bos is not None, "model_max_length": 256,
        "clean_up_tokenization_spaces": False, "chat_template": template,
    }  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    hf_tok = PreTrainedTokenizerFast.from_pretrained(out)
    text = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    chat_ids = hf_tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)
    if isinstance(chat_ids, dict):  # a BatchEncoding on some versions
        chat_ids = chat_ids["input_ids"]
    assert chat_ids == hf_tok(text, add_special_tokens=False)["input_ids"], "chat ids != encode(text)"
    assert hf_tok.decode(chat_ids) == text
    return {
        "chat": {"messages": CHAT, "add_generation_prompt": True, "text": text, "ids": list(chat_ids)},
        "tokenize": {"text": TOKENIZE_TEXT, "ids_add_special_tokens": hf_tok(TOKENIZE_TEXT)["input_ids"],
                     "ids_no_special_tokens": hf_tok(TOKENIZE_TEXT, add_special_tokens=False)["input_ids"]},
        "bos_token_id": None if bos is None else tok.token_to_id(bos),
        "eos_token_ids": [tok.token_to_id(e) for e in eos],
        "special_tokens": {t: tok.token_to_id(t) for t in SPECIAL_TOKENS[chat_family][0]},
    }  # fmt: skip


def reference(model: torch.nn.Module, ids: list[int], prompts: list[list[int]], new: int) -> dict:
    """float64 logits for `ids`, float64 greedy continuations of `prompts` (checked equal in float32), min gap."""
    model64 = copy.deepcopy(model).double()
    window = getattr(model.config, "sliding_window", None)
    logits64 = next_logits(model64, ids).numpy()
    logits32 = next_logits(model, ids).double().numpy()
    continuations = [greedy(model64, p, new) for p in prompts]
    assert continuations == [greedy(model, p, new) for p in prompts], "float32 and float64 greedy disagree"
    return {
        "logits64": logits64,
        "logits32": logits32,
        "greedy": continuations,
        "min_gap": min(min_gap(model64, p, g) for p, g in zip(prompts, continuations)),
        "mean_max_attention": mean_max_attention(model64, ids),
        "hf_float32_vs_float64_max_abs": float(np.abs(logits32 - logits64).max()),
        "hf_float64_vs_all_float64_max_abs": float(
            np.abs(manual_logits(model64, ids, window) - logits64).max()
        ),
    }


def random_inputs(vocab: int, n_ids: int, prompt_lens: tuple[int, ...], seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, n_ids).tolist()
    return ids, [rng.integers(0, vocab, n).tolist() for n in prompt_lens]


def write_fixture(name: str, out: Path) -> dict:
    """tests/fixtures/hf_tiny_llama/<name>/ into `out` (scripts/make_llama_fixtures.py lists the files);
    returns its expected.json."""
    family, shape = FIXTURES[name]
    out.mkdir(parents=True, exist_ok=True)
    tok_info = write_tokenizer(out, family)
    eos = tok_info["eos_token_ids"]
    eos_id = eos if len(eos) > 1 else eos[0]
    shape = {
        **shape,
        "vocab_size": VOCAB_SIZE,
        "bos_token_id": tok_info["bos_token_id"],
        "eos_token_id": eos_id,
    }
    model = build_hf_model(family, seed=0, **shape)
    n_regular = min(tok_info["special_tokens"].values())  # random ids avoid the special tokens
    ids, prompts = random_inputs(n_regular, N_IDS, PROMPT_LENS)
    ref = reference(model, ids, prompts, MAX_NEW_TOKENS)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    gen = transformers.GenerationConfig(bos_token_id=tok_info["bos_token_id"], eos_token_id=eos_id)
    gen.save_pretrained(out)
    np.savez_compressed(out / "logits.npz", logits=ref.pop("logits64"))
    ref.pop("logits32")
    expected = {"name": name, "family": family, "ids": ids, "prompts": prompts, **ref, **tok_info,
                "transformers": transformers.__version__, "torch": torch.__version__,
                "tokenizers": tokenizers.__version__}  # fmt: skip
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    return expected


def hf_stage(family: str, shape: dict, tokens: int, new: int, work: Path, seed: int = 0) -> dict:
    """torch on the CPU: save a random `family` model of `shape` (config kwargs, vocab_size included) in bfloat16
    to work/model, HF's logits for `tokens` random ids (float32 and float64) to work/hf.npz, and the ids, two
    prompts, their float64 greedy continuations (`new` each) and the min gap to work/hf.json."""
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = build_hf_model(family, seed=seed, **shape)
    ids, prompts = random_inputs(shape["vocab_size"], tokens, (7, 19), seed=seed)
    ref = reference(model, ids, prompts, new)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(work / "model", safe_serialization=True)
    np.savez(work / "hf.npz", hf32=ref.pop("logits32"), hf64=ref.pop("logits64"))
    info = {"family": family, "shape": shape, "ids": ids, "prompts": prompts, **ref,
            "hf_min_greedy_gap": ref["min_gap"], "transformers": transformers.__version__,
            "torch": torch.__version__, "hf_seconds": round(time.time() - t0, 1)}  # fmt: skip
    (work / "hf.json").write_text(json.dumps(info))
    return info


def check_fixture(out: Path) -> dict:
    """Load a written fixture back with transformers in float64 and compare with what it stores: logits (sdpa and
    eager), greedy tokens through `generate` (with its KV cache: a sliding-window cache for mistral), and the
    independent `manual_logits` forward; for a sliding window also which window convention matches HF."""
    expected = json.loads((out / "expected.json").read_text())
    stored = np.load(out / "logits.npz")["logits"]
    ids = expected["ids"]
    result = {"max_abs_logit": float(np.abs(stored).max())}
    for impl in ("eager", "sdpa"):  # sdpa last: `m` below is the reference's own implementation
        m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64, attn_implementation=impl).eval()
        result[f"reload_{impl}_max_abs"] = float(np.abs(next_logits(m, ids).numpy() - stored).max())
        greedy_now = [greedy(m, p, MAX_NEW_TOKENS) for p in expected["prompts"]]
        result[f"reload_{impl}_greedy_equal"] = greedy_now == expected["greedy"]
    window = getattr(m.config, "sliding_window", None)
    diff = lambda **kw: float(np.abs(manual_logits(m, ids, **kw) - stored).max())
    result["manual_hf_float32_max_abs"] = diff(window=window, hf_float32=True)
    result["manual_float64_max_abs"] = diff(window=window)
    if window is not None:
        result["window"] = window
        result["manual_window_inclusive_max_abs"] = diff(
            window=window, window_inclusive=True, hf_float32=True
        )
        result["manual_no_window_max_abs"] = diff(hf_float32=True)
    return result


def rope_table() -> list[dict]:
    """transformers' own inv_freq and attention_scaling (float32, as its rotary embeddings hold them) for a set
    of RoPE configurations, from `ROPE_INIT_FUNCTIONS` (and Llama's `compute_default_rope_parameters`) called on a
    LlamaConfig as the rotary-embedding modules call them; `seq_len` is passed only for `dynamic`."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    llama31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    tiny_yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    cases = [  # name, head_dim, rope_theta, max_position_embeddings, rope_parameters (less rope_theta), seq_len
        ("default_theta_1e4", 64, 10000.0, 256, {"rope_type": "default"}, None),
        ("default_theta_5e5_d128", 128, 500000.0, 131072, {"rope_type": "default"}, None),
        ("linear_factor_2", 64, 10000.0, 256, {"rope_type": "linear", "factor": 2.0}, None),
        ("llama3_llama31_8b", 128, 500000.0, 131072, llama31, None),
        ("llama3_tiny", 64, 10000.0, 256, {**llama31, "factor": 4.0, "original_max_position_embeddings": 16}, None),
        ("yarn_tiny", 64, 10000.0, 64, tiny_yarn, None),
        ("yarn_tiny_attention_factor_beta", 64, 10000.0, 64,
         {**tiny_yarn, "attention_factor": 0.8, "beta_fast": 16.0, "beta_slow": 2.0}, None),
        ("yarn_tiny_no_truncate", 64, 10000.0, 64, {**tiny_yarn, "truncate": False}, None),
        ("yarn_tiny_mscale", 64, 10000.0, 64, {**tiny_yarn, "mscale": 1.0, "mscale_all_dim": 0.5}, None),
        ("yarn_qwen25_style", 128, 1000000.0, 131072,
         {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, None),
        ("dynamic_factor_2_within", 64, 10000.0, 256, {"rope_type": "dynamic", "factor": 2.0}, 200),
        ("dynamic_factor_2_at_max", 64, 10000.0, 256, {"rope_type": "dynamic", "factor": 2.0}, 256),
        ("dynamic_factor_2_past_512", 64, 10000.0, 256, {"rope_type": "dynamic", "factor": 2.0}, 512),
    ]  # fmt: skip
    table = []
    for name, head_dim, theta, max_pos, params, seq_len in cases:
        rope_parameters = {**params, "rope_theta": theta}
        config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                             max_position_embeddings=max_pos, rope_parameters=dict(rope_parameters))  # fmt: skip
        if params["rope_type"] == "default":
            inv_freq, scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None, seq_len=seq_len)
        table.append({
            "name": name, "head_dim": head_dim, "rope_theta": theta, "max_position_embeddings": max_pos,
            "rope_parameters": rope_parameters, "seq_len": seq_len,
            "rope_parameters_as_config_holds_them": dict(config.rope_parameters),
            "inv_freq": [float(f) for f in inv_freq.to(torch.float32)], "inv_freq_dtype": str(inv_freq.dtype),
            "attention_scaling": float(scaling),
        })  # fmt: skip
    return table
