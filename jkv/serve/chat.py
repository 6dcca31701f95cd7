"""Chat templates: a model's own (`chat_template` in its tokenizer_config.json, or a file given with
`--chat-template`), rendered as Hugging Face renders them (a sandboxed Jinja2 environment, `trim_blocks` and
`lstrip_blocks`, `raise_exception`), turning chat messages into the prompt text the engine completes.

A model without a template has no chat format: `/v1/chat/completions` answers 400 saying so, rather than
inventing one.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jkv.serve.protocol import RequestError


class ChatTemplate:
    """A compiled chat template with the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(source)
        self.special_tokens = special_tokens

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)  # fmt: skip
        except jinja2.TemplateError as err:
            raise RequestError(f"the model's chat template refused these messages ({err}): fix the messages.",
                               "messages") from None  # fmt: skip


def _raise(message: str):
    raise jinja2.TemplateError(message)


def load_chat_template(model_dir: str | None, template_file: str | None = None) -> ChatTemplate | None:
    """The template from `template_file`, else the model directory's tokenizer_config.json, else None.
    Raises ValueError for a template file that does not exist or does not compile."""
    config = {}
    if model_dir and (Path(model_dir) / "tokenizer_config.json").is_file():
        config = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
    source = config.get("chat_template")
    if isinstance(source, list):  # several named templates: the default one
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    if template_file is not None:
        path = Path(template_file)
        if not path.is_file():
            raise ValueError(f"--chat-template {template_file} is not a file: pass a Jinja2 template file.")
        source = path.read_text()
    if not source:
        return None
    tokens = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    try:
        return ChatTemplate(source, {k: v for k, v in tokens.items() if v is not None})
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"the chat template does not compile ({err}): fix it or pass --chat-template.") from None


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} (AddedToken)
        return value.get("content")
    return value


def message_dicts(messages) -> list[dict]:
    """Messages as plain dicts; a content list keeps its text parts only (no images: nothing names a file)."""
    out = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError("message content parts must be {'type': 'text', 'text': ...}: this server "
                                       "takes text only.", "messages")  # fmt: skip
                texts.append(part["text"])
            content = "".join(texts)
        out.append({**(m.model_extra or {}), "role": m.role, "content": content or ""})
    return out
