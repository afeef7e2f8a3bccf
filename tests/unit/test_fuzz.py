"""The atheris fuzz target of the token path (fuzz/fuzz_auth.py), a short run of it for CI.

The long run is `make fuzz` (FUZZ_SECONDS, an hour by default). Here: a bounded run from the
committed seed corpus must end without a crash; the target must catch a verifier bug planted
on purpose (invariants that cannot fail would prove nothing); and the committed corpus is
exactly what fuzz/make_corpus.py writes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="atheris is installed on Linux only (pyproject's test extra)"
)

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
RUNS = 30_000  # about 5 s; the seeds alone reach every mode and a 200 for every policy


def fuzz(tmp_path: Path, *flags: str, env: dict[str, str] | None = None):
    new = tmp_path / "new"  # libFuzzer adds what it finds to the first directory: not the seeds
    new.mkdir(exist_ok=True)
    limits = ["-timeout=20", f"-artifact_prefix={tmp_path}/"]
    # libFuzzer's report goes to a file, not through the test's captured output: its
    # "Recommended dictionary" quotes fragments of the fuzzer's own synthetic tokens, which
    # can coincide with a run of a test token's payload (the leak check would flag them).
    # authd inside the target logs nothing (the target drops structlog's output).
    report = tmp_path / "libfuzzer.log"
    with report.open("w") as stderr:
        result = subprocess.run(
            [sys.executable, FUZZ / "fuzz_auth.py", new, FUZZ / "corpus", *flags, *limits],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=180,
            check=False,
            env={**os.environ, **(env or {})},
        )
    result.stderr = report.read_text()
    return result


def test_a_short_run_finds_nothing(tmp_path):
    result = fuzz(tmp_path, f"-runs={RUNS}", "-max_total_time=40")

    assert result.returncode == 0, result.stderr[-5000:]
    assert "Done" in result.stderr
    assert not list(tmp_path.glob("crash-*"))


@pytest.mark.parametrize("bug", ["audience", "expiry"])
def test_a_planted_verifier_bug_is_caught(tmp_path, bug):
    result = fuzz(tmp_path, "-runs=5000", env={"AUTHD_FUZZ_PLANT": bug})

    output = result.stdout + result.stderr  # atheris prints the exception to stdout
    assert result.returncode != 0, output[-3000:]
    assert "200 for a token the reference refuses" in output
    assert list(tmp_path.glob("crash-*"))


def test_the_committed_corpus_is_what_make_corpus_writes(tmp_path):
    subprocess.run(
        [sys.executable, FUZZ / "make_corpus.py", tmp_path],
        capture_output=True,
        timeout=120,
        check=True,
    )

    written = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    committed = {p.name: p.read_bytes() for p in (FUZZ / "corpus").iterdir()}
    assert written == committed
