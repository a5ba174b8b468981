"""The benchmark scripts work: `benchmarks/run.py --quick` measures all seven figures (small sizes).

Not a timed test: it asserts that every figure was measured and printed, never how fast.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.postgres, pytest.mark.slow, pytest.mark.own_lab]

REPO = Path(__file__).resolve().parent.parent
TITLES = ("1. engine overhead", "2. failover overhead", "3. detection", "4. fan-out", "5. evidence at scale",
          "6. start-up", "7. validating a 20,000-step runbook")


@pytest.mark.timeout(900)
def test_quick_run_prints_all_seven_figures() -> None:
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick"], capture_output=True,
                            text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    for title in TITLES:
        assert title in result.stdout, result.stdout
    assert "NOT MEASURED" not in result.stdout
    assert "target" in result.stdout
