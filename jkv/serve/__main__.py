"""`python -m jkv.serve ARGS`: the same as `jkv serve ARGS`."""

import sys

from jkv.serve.cli import main

if __name__ == "__main__":  # not when a spawned process (the engine's) imports it
    sys.exit(main(prog="python -m jkv.serve"))
