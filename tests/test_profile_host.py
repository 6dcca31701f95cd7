"""scripts/profile_host.py runs end to end on a small model and names the engine's host functions."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "profile_host.py"


def test_profile_host_reports_steps_and_engine_functions():
    out = subprocess.run([sys.executable, str(SCRIPT), "--layers", "2", "--rows", "4", "--requests", "6", "--top", "40"],
                         capture_output=True, text=True, timeout=600, check=True).stdout  # fmt: skip
    m = re.search(r"(\d+) steps, ([\d.]+) ms per step", out)
    assert m and int(m.group(1)) > 6 and float(m.group(2)) > 0
    assert "(step)" in out and "(run_step)" in out  # the engine loop and the jitted dispatch were profiled
