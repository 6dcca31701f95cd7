"""Random GPT-2 models for tests whose tokens depend on the cached context."""

from jkv.model import Model
from jkv.weights import random_params
from kvspec.config import ModelConfig


def context_sensitive_gpt2(name: str, *, n_embd: int, n_head: int, n_layer: int = 2, vocab_size: int = 256,
                           n_positions: int = 128, seed: int = 3) -> Model:  # fmt: skip
    """A float32 random GPT-2. GPT-2's init (std 0.02) leaves a random model's next token almost a function of the
    current one; larger attention and value weights make every token depend on the cached context, so a wrong K/V
    shows up."""
    config = ModelConfig(name, vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                         n_head=n_head)  # fmt: skip
    params = random_params(config, "float32", seed=seed)
    for i in range(config.n_layer):
        attn = params[f"h_{i}"]["attn"]
        attn["c_attn"]["kernel"] = attn["c_attn"]["kernel"] * 10
        attn["c_proj"]["kernel"] = attn["c_proj"]["kernel"] * 20
    return Model(config, params, "float32", name)
