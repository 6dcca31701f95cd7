"""`jkv serve`: an OpenAI-compatible HTTP server over the paged engine, with live KV-cache metrics.

`main(argv)` is the command (`jkv serve --model NAME|DIR ...`, also `python -m jkv.serve`); `create_app` builds
the FastAPI app over a running `EngineLoop`. See docs/serving.md.
"""

from __future__ import annotations

from jkv.serve.cli import main

__all__ = ["main"]
