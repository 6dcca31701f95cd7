"""Pallas GPU kernels for paged attention over jkv's K/V block pools, each with a pure-jnp reference."""
