"""The README quick start's first command, run for real: `falco-gitlab demo --once`.

It starts its own broker, ingest, enrich and the replay evaluator as subprocesses, sends the sample
payloads over HTTP and must print the expected alerts, then leave nothing running.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.kafka


def test_demo_once_shows_alerts_and_stops_everything(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "FALCO_BIN"}
    result = subprocess.run(
        [sys.executable, "-m", "falco_gitlab", "demo", "--once", "--no-falco", "--work-dir", str(work)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "26 x HTTP 200" in out
    # One original-plugin detection, one GeoIP-driven rule (needs enrich's City database), one
    # audit-tampering rule: the three stages all worked.
    assert "GitLab User Granted Administrator" in out
    assert "GitLab Git Clone Or Fetch From Unknown Country" in out and "country=CN" in out
    assert "GitLab Audit Streaming Destination Deleted" in out
    assert "instance=demo-gitlab" in out
    summary = [line for line in out.splitlines() if line.endswith("events. Stopping.")]
    assert summary and int(summary[0].split()[0]) >= 20, summary

    leftovers = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", f"processes left running: {leftovers.stdout}"
