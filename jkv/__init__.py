"""jkv: paged KV-cache engine for GPT-2 on JAX (model, block manager, scheduler, engine)."""
