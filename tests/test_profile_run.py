"""scripts/profile_run.py end to end on the tiny fixture: a PNG, a history that tells the truth, a trace."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny_gpt2"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "profile_run.py"


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_profile_run_writes_timeline_history_and_trace(tmp_path, decode_steps):
    png, hist, trace = tmp_path / "t.png", tmp_path / "h.json", tmp_path / "trace"
    argv = [
        sys.executable,
        str(SCRIPT),
        "--model",
        str(FIXTURE),
        "--requests",
        "10",
        "--max-tokens",
        "12",
        "--num-blocks",
        "40",
        "--block-size",
        "4",
        "--max-num-seqs",
        "8",
        "--png",
        str(png),
        "--json",
        str(hist),
        "--trace",
        str(trace),
        "--decode-steps",
        str(decode_steps),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads(hist.read_text())
    assert history and all(0 <= h["blocks_used"] <= 39 for h in history)
    assert all(h["blocks_used"] + h["blocks_free"] == h["blocks_total"] == 39 for h in history)
    assert history[-1]["blocks_used"] == 0 and history[-1]["running"] == 0
    assert any(trace.rglob("*.xplane.pb"))
    # every request's tokens were generated, whatever the steps per call (12 at most each, 10 requests)
    assert 10 <= history[-1]["tokens_generated"] <= 120
