"""benchmarks/mfu_compare.py runs (a tiny model on CPU) and ScaleWatch's FLOP/s agrees with ThroughputMonitor's.

The GPU figures come from the same script with a GPT-2-small-sized model; this keeps it working in CI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_scalewatch_and_throughput_monitor_agree_on_flops_per_second() -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "mfu_compare.py"), "--rounds", "1", "--steps", "12",
           "--log-every", "5", "--n-layer", "2", "--n-embd", "64", "--block-size", "64", "--batch-size", "4",
           "--threads", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-2000:]
    for arm in ("none", "scalewatch", "throughput"):
        assert re.search(rf"{arm}: median step +[\d.]+ ms", p.stdout), p.stdout
    m = re.search(r"FLOP/s per device ScaleWatch ([\d.e+]+), ThroughputMonitor ([\d.e+]+)", p.stdout)
    assert m, p.stdout
    ours, theirs = float(m.group(1)), float(m.group(2))
    # Same run, same clock; the FLOP conventions differ by a few percent (6N + attention vs measured).
    assert ours == pytest.approx(theirs, rel=0.2)
