"""The `jkv` command: `jkv plan ...` (the static planner) and `jkv serve ...` (the OpenAI-compatible server).

Each subcommand's module is imported only when it runs, so `jkv plan` needs no JAX.
"""

from __future__ import annotations

import sys

USAGE = "usage: jkv {plan,serve} [options] (jkv plan --help, jkv serve --help)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "plan":
        from planner.cli import main as plan_main

        return plan_main(rest, prog="jkv plan")
    if command == "serve":
        from jkv.serve import main as serve_main

        return serve_main(rest, prog="jkv serve")
    print(f"jkv: unknown command {command!r}: use `jkv plan` or `jkv serve`.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
