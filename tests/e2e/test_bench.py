"""`make bench` keeps working: devtools/bench.py --smoke, end to end (wrk, two nginx, authd).

A smoke run measures nothing, and nothing here looks at a timing or a ratio (the machine is
shared and noisy): only that every row ran and was answered correctly, that the cold row never
sent more requests than it had tokens, and that the other figures were taken.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BENCH = Path(__file__).resolve().parents[2] / "devtools" / "bench.py"
ROWS = {"baseline", "asgi_floor", "warm", "cold", "cache_off", "microcache"}


def test_the_smoke_run_measures_every_row_correctly(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, BENCH, "--smoke", "--json", out],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    report = json.loads(out.read_text())

    assert set(report["rows"]) == ROWS
    runs = [run for row in report["rows"].values() for run in row["rounds"]]
    runs += [report["latency_1_connection"][name] for name in ("baseline", "asgi_floor", "warm")]
    for run in runs:
        assert run["requests"] > 0, run
        assert run["non_2xx"] == 0, run
        assert not any(run["socket_errors"].values()), run
    for cold in report["rows"]["cold"]["rounds"]:
        assert cold["each_token_once"]
        assert cold["requests"] <= cold["tokens_taken"] <= cold["distinct_tokens"]
        assert cold["cache_hits"] == 0

    memory = report["memory"]
    assert memory["cache_entries"] == memory["decisions"] > 0
    assert memory["after_decisions"]
    for resident in memory["after_decisions"].values():
        assert resident["VmRSS"] > 0
        assert resident["RssAnon"] > 0
    assert report["start_to_ready_s"]["median"] > 0
