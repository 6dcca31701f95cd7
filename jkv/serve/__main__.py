"""`python -m jkv.serve ARGS`: the same as `jkv serve ARGS`."""

import sys

from jkv.serve.cli import main

sys.exit(main(prog="python -m jkv.serve"))
