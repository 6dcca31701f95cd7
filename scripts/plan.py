#!/usr/bin/env python
"""Plan a model's KV cache on a device: `python scripts/plan.py --hbm 24GB [--model llama-3.1-8b] [--json]`.

The same command as `jkv plan` (planner.cli); bad input prints one line on stderr and exits with status 2.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="plan.py"))
