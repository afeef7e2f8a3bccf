"""`authd logs`: filters, formats, sources; real processes for following, rotation and pipes.

The journal is played by a fake `journalctl` first on PATH that records its arguments: this
machine's PID 1 is not systemd, so reading a real journal is left to the packaging tests,
which boot systemd in a container.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authd import logs

ROOT = Path(__file__).resolve().parents[2]
# The command line is wired elsewhere; this is `authd logs` in all but name.
ENTRY = (
    "import sys, argparse; from authd import logs; p = argparse.ArgumentParser(); "
    "logs.add_arguments(p); sys.exit(logs.run(p.parse_args(sys.argv[1:])))"
)
NOW = datetime(2026, 11, 28, 18, 0, tzinfo=UTC)
# The tool's processes buffer their output as they would for a user (not as under CI's
# PYTHONUNBUFFERED): what a follower or a closed pipe needs must happen in the code.
TOOL_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    logs.add_arguments(parser)
    return parser.parse_args(argv)


def decision(**fields) -> dict:
    event = {
        "decision": "allow",
        "status": 200,
        "reason": None,
        "policy": "wiki",
        "rule": "allow_email_domains",
        "user": "alice@example.com",
        "email": "alice@example.com",
        "sub": "6613a3fd",
        "service_token": None,
        "iss": "https://team.cloudflareaccess.com",
        "kid": "14330d18",
        "token_id": "350dfb7c84cec0a1",
        "method": "GET",
        "uri": "/wiki/page",
        "host": "wiki.example.com",
        "client_ip": "198.51.100.7",
        "request_id": "0d1c",
        "duration_ms": 0.412,
        "event": "decision",
        "level": "info",
        "timestamp": "2026-11-28T18:36:52.102109Z",
    }
    return event | fields


def deny(**fields) -> dict:
    return decision(decision="deny", status=401, reason="expired", rule=None) | fields


def line(event: dict) -> bytes:
    return json.dumps(event).encode()


ALLOW = decision()
DENY = deny(detail="expired 90 s ago")
FORBIDDEN = deny(
    status=403,
    reason="not_allowed",
    user="svc.access",
    email=None,
    service_token="svc.access",
    policy="ops",
)
ERROR = deny(decision="error", status=503, reason="keys_unavailable", level="error")
STARTING = {"event": "starting", "level": "info", "timestamp": "2026-11-28T18:30:00Z", "pid": 7}


# --- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "start"),
    [((), None), (("-f",), 10), (("-f", "-n", "0"), 0), (("-f", "--since", "1h"), None)],
)
def test_following_starts_with_the_last_ten_lines_like_tail(argv, start):
    assert logs._start(parse(*argv)) == start


def test_list_options_take_commas_and_repeats():
    args = parse("--reason", "expired,bad_audience", "--reason", "no_token", "--user", "A,b")
    assert args.reason == ["expired", "bad_audience", "no_token"]
    assert args.user == ["A", "b"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--reason", "expierd"],
        ["--decision", "denied"],
        ["--policy", ","],
        ["--lines", "-1"],
        ["--lines", "ten"],
        ["--file", "x", "--unit", "y"],
        ["--json", "--text"],
        ["--color", "sometimes"],
    ],
)
def test_bad_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(*argv)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_the_description_fits_a_terminal_and_explains_the_options():
    assert len(logs.HELP.splitlines()) == 1
    assert max(len(text) for text in logs.DESCRIPTION.splitlines()) <= 80
    for option in ("--file", "-f", "-n", "--since", "--decision", "--user", "--policy"):
        assert option in logs.DESCRIPTION
    for option in ("--reason", "--all", "--json", "--text", "--utc", "exit status"):
        assert option in logs.DESCRIPTION


# --- lines and filters --------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'"decision"',
        b"\xff\xfe{}",
        b'{"a": ' + b"9" * 5000 + b"}",  # int() refuses this many digits
        b"[" * 100_000,  # recursion, not a crash
        b'{"event": "decision"',
    ],
)
def test_anything_but_a_json_object_is_skipped(raw):
    assert logs.parse_line(raw) is None


def test_a_json_object_is_parsed():
    assert logs.parse_line(line(ALLOW) + b"\r") == ALLOW


def accepted(*argv: str, events=(ALLOW, DENY, FORBIDDEN, ERROR, STARTING), now=NOW) -> list:
    args = parse(*argv)
    since = logs.parse_since(args.since, now, utc=True) if args.since else None
    keep = logs._filter(args, since)
    return [e for e in events if keep.accepts(e)]


def test_only_decisions_are_shown_unless_all():
    assert accepted() == [ALLOW, DENY, FORBIDDEN, ERROR]
    assert accepted("--all") == [ALLOW, DENY, FORBIDDEN, ERROR, STARTING]


def test_decision_filter():
    assert accepted("--decision", "deny") == [DENY, FORBIDDEN]
    assert accepted("--decision", "error") == [ERROR]
    assert accepted("--decision", "allow,error") == [ALLOW, ERROR]


def test_user_filter_matches_email_or_service_token_ignoring_case_with_wildcards():
    assert accepted("--user", "ALICE@example.com") == [ALLOW, DENY, ERROR]
    assert accepted("--user", "SVC.ACCESS") == [FORBIDDEN]
    assert accepted("--user", "*@EXAMPLE.COM") == [ALLOW, DENY, ERROR]
    assert accepted("--user", "alice") == []
    nobody = deny(reason="no_token", user=None, email=None)
    assert accepted("--user", "*", events=[nobody]) == []


def test_policy_and_reason_filters_combine_with_and():
    assert accepted("--policy", "ops") == [FORBIDDEN]
    assert accepted("--reason", "expired,not_allowed") == [DENY, FORBIDDEN]
    assert accepted("--reason", "expired", "--policy", "ops") == []
    assert accepted("--reason", "expired", "--decision", "deny", "--policy", "wiki") == [DENY]


def test_decision_filters_do_not_apply_to_other_events_but_since_does():
    assert accepted("--all", "--decision", "error") == [ERROR, STARTING]
    late = NOW + timedelta(hours=1)
    assert accepted("--all", "--since", "2026-11-28T18:35:00Z", now=late) == [
        ALLOW,
        DENY,
        FORBIDDEN,
        ERROR,
    ]


def test_since_drops_lines_without_a_readable_timestamp():
    events = [decision(timestamp=None), decision(timestamp="yesterday"), decision(timestamp=3)]
    assert accepted("--since", "1d", events=events) == []


@pytest.mark.usefixtures("berlin")
def test_a_logged_time_without_an_offset_is_utc_as_authd_writes_it():
    naive = decision(timestamp="2026-11-28T17:30:00")
    assert accepted("--since", "1h", events=[naive]) == [naive]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", NOW - timedelta(seconds=30)),
        ("10m", NOW - timedelta(minutes=10)),
        (" 2H ", NOW - timedelta(hours=2)),
        ("1d", NOW - timedelta(days=1)),
        ("today", datetime(2026, 11, 28, tzinfo=UTC)),
        ("Yesterday", datetime(2026, 11, 27, tzinfo=UTC)),
        ("2026-11-28T17:00:00Z", datetime(2026, 11, 28, 17, tzinfo=UTC)),
        ("2026-11-28 19:00+02:00", datetime(2026, 11, 28, 17, tzinfo=UTC)),
        ("2026-11-28 17:00", datetime(2026, 11, 28, 17, tzinfo=UTC)),
        ("2026-11-28", datetime(2026, 11, 28, tzinfo=UTC)),
    ],
)
def test_since_forms(text, expected):
    assert logs.parse_since(text, NOW, utc=True) == expected


@pytest.mark.parametrize("text", ["-1h", "2 hours ago", "10 min", "1w", "", "soon"])
def test_other_since_forms_are_not_ours(text):
    assert logs.parse_since(text, NOW) is None


@pytest.fixture
def berlin(monkeypatch):
    monkeypatch.setenv("TZ", "CET-1")  # POSIX: UTC+1, no daylight saving
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("berlin")
def test_since_without_an_offset_is_local_time_unless_utc():
    assert logs.parse_since("2026-11-28 18:00", NOW) == NOW - timedelta(hours=1)
    assert logs.parse_since("2026-11-28 18:00", NOW, utc=True) == NOW
    assert logs.parse_since("today", NOW) == datetime(2026, 11, 27, 23, tzinfo=UTC)


# --- the human format ---------------------------------------------------------------------


def test_a_decision_line_has_every_column():
    text = logs.Formatter(colour=False, utc=True).line(DENY)
    assert text.split() == [
        "2026-11-28",
        "18:36:52",
        "deny",
        "401",
        "expired",
        "wiki",
        "alice@example.com",
        "0.4ms",
        "GET",
        "/wiki/page",
        "expired",
        "90",
        "s",
        "ago",
    ]


def test_an_allow_shows_the_rule_that_admitted():
    assert "allow 200  allow_email_domains " in logs.Formatter(colour=False).line(ALLOW)


@pytest.mark.usefixtures("berlin")
def test_times_are_local_unless_utc():
    assert logs.Formatter(colour=False).line(ALLOW).startswith("2026-11-28 19:36:52  ")
    assert logs.Formatter(colour=False, utc=True).line(ALLOW).startswith("2026-11-28 18:36:52  ")


def test_columns_line_up():
    first = decision(policy="a-long-policy", user="a.long.name@example.com", duration_ms=1234.5)
    events = [first, FORBIDDEN, ERROR, ALLOW]
    text = logs.Formatter(colour=False)
    rows = [text.line(e) for e in events]
    for column in ("policy", "user", "method"):
        starts = {row.index(str(e[column]), 40) for row, e in zip(rows, events, strict=True)}
        assert len(starts) == 1, (column, rows)


def test_colour_is_by_decision_and_only_when_asked():
    colours = logs.Formatter(colour=True)
    assert "\x1b[32mallow 200\x1b[0m" in colours.line(ALLOW)
    assert "\x1b[33mdeny  401\x1b[0m" in colours.line(DENY)
    assert "\x1b[31merror 503\x1b[0m" in colours.line(ERROR)
    assert "\x1b" not in logs.Formatter(colour=False).line(ERROR)


@pytest.mark.parametrize(
    ("choice", "tty", "env", "expected"),
    [
        ("auto", True, {}, True),
        ("auto", False, {}, False),
        ("auto", True, {"NO_COLOR": "1"}, False),
        ("auto", True, {"NO_COLOR": ""}, True),  # https://no-color.org: set and not empty
        ("auto", True, {"TERM": "dumb"}, False),
        ("always", False, {"NO_COLOR": "1"}, True),
        ("never", True, {}, False),
    ],
)
def test_when_to_colour(choice, tty, env, expected):
    assert logs.use_colour(choice, tty=tty, env=env) is expected


def test_logged_values_cannot_drive_the_terminal():
    hostile = deny(
        uri="/x\x1b]0;owned\x07",
        user="\u202eevil@example.com",
        detail="got \x1b[2J\r\n",
        policy="\x9b31m",
    )
    text = logs.Formatter(colour=False).line(hostile)
    assert text.isprintable()
    assert "/x\\x1b]0;owned\\x07" in text
    assert "\\u202eevil@example.com" in text
    assert "got \\x1b[2J\\r\\n" in text


def test_other_events_show_level_event_and_fields():
    text = logs.Formatter(colour=False, utc=True)
    assert text.line(STARTING) == "2026-11-28 18:30:00  info       starting pid=7"
    failed = {
        "event": "keys_fetch_failed",
        "level": "warning",
        "issuer": "dev",
        "error": "connect timeout",
        "exception": [{"frames": ["x" * 500]}],
    }
    shown = text.line(failed)
    assert shown.startswith("-                    warning    keys_fetch_failed issuer=dev ")
    assert 'error="connect timeout" exception=[{"frames":["xxx' in shown
    assert shown.endswith("…")
    assert len(shown) < 300


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
KEYS = st.sampled_from([*decision(), "detail", "exception"]) | st.text(max_size=5)


@given(
    st.dictionaries(KEYS, JSON, max_size=12),
    st.sampled_from([None, "decision", "starting"]),
    st.booleans(),
)
def test_no_object_breaks_the_filter_or_the_format(event, name, colour):
    if name is not None:
        event["event"] = name
    for argv in ((), ("--all",), ("--user", "*a*", "--since", "1d", "--reason", "expired")):
        accepted(*argv, events=[event])
    text = logs.Formatter(colour=colour).line(event)
    assert text.replace("\x1b", "").isprintable()


# --- reading files ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "count", "expected"),
    [
        (b"a\nbb\nccc\n", 2, b"bb\nccc\n"),
        (b"a\nbb\nccc", 2, b"bb\nccc"),
        (b"a\nbb\nccc\n", 3, b"a\nbb\nccc\n"),
        (b"a\nbb\nccc\n", 9, b"a\nbb\nccc\n"),
        (b"a\nbb\nccc\n", 0, b""),
        (b"\n\n\n", 2, b"\n\n"),
        (b"", 5, b""),
        (b"0123456789abcdef\nxyz\n", 1, b"xyz\n"),
    ],
)
def test_seek_last_lines_reads_backwards_across_blocks(
    tmp_path, monkeypatch, content, count, expected
):
    monkeypatch.setattr(logs, "BLOCK", 3)
    path = tmp_path / "log"
    path.write_bytes(content)
    with path.open("rb") as stream:
        logs.seek_last_lines(stream, count)
        assert stream.read() == expected


def test_a_line_being_written_waits_for_its_newline(tmp_path):
    path = tmp_path / "log"
    path.write_bytes(b"one\ntw")
    with path.open("ab", buffering=0) as writer, path.open("rb") as stream:
        reader = logs.LineReader(stream)
        assert list(reader.available()) == [b"one"]
        writer.write(b"o\nthr")
        assert list(reader.available()) == [b"two"]
        assert list(reader.rest()) == [b"thr"]


def test_an_overlong_line_is_dropped_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "MAX_LINE", 8)
    path = tmp_path / "log"
    path.write_bytes(b"short\n" + b"x" * 30 + b"\nnext\n" + b"y" * 20)
    with path.open("rb") as stream:
        assert list(logs.read_lines(stream)) == [b"short", b"next"]


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail instead of hanging when a followed file never yields."""

    def expire(*_):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def test_following_survives_rename_and_create_and_copytruncate(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "POLL_SECONDS", 0.01)
    path = tmp_path / "audit.log"
    path.write_bytes(b"old 1\nold 2\nold 3\n")
    lines = logs.tail_file(path, follow=True, lines=1)
    with deadline(5):
        assert next(lines) == b"old 3"
        append(path, b"new 1\n")
        assert next(lines) == b"new 1"
        # logrotate's create: rename, the writer finishes a line in the old file, new file.
        path.rename(tmp_path / "audit.log.1")
        append(tmp_path / "audit.log.1", b"late\n")
        path.write_bytes(b"rotated 1\n")
        assert [next(lines), next(lines)] == [b"late", b"rotated 1"]
        # copytruncate: the same file, emptied in place.
        with path.open("r+b") as f:
            f.truncate(0)
            f.write(b"fresh\n")
        assert next(lines) == b"fresh"
    lines.close()


def test_a_line_written_to_the_old_file_while_it_is_replaced_is_not_lost(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "POLL_SECONDS", 0.01)
    path = tmp_path / "audit.log"
    path.write_bytes(b"")
    lines = logs.tail_file(path, follow=True, lines=None)
    replacement = logs._replacement

    def racing(*args):
        # The writer's last line lands after the end was read, before the new file opens.
        if not path.exists():
            append(tmp_path / "audit.log.1", b"last old\n")
            path.write_bytes(b"first new\n")
        return replacement(*args)

    monkeypatch.setattr(logs, "_replacement", racing)
    with deadline(5):
        path.rename(tmp_path / "audit.log.1")
        assert [next(lines), next(lines)] == [b"last old", b"first new"]
    lines.close()


def test_following_waits_for_a_renamed_file_to_come_back(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "POLL_SECONDS", 0.01)
    path = tmp_path / "audit.log"
    path.write_bytes(b"")
    lines = logs.tail_file(path, follow=True, lines=None)
    path.rename(tmp_path / "gone")
    threading.Timer(0.2, path.write_bytes, [b"back\n"]).start()
    with deadline(5):
        assert next(lines) == b"back"
    lines.close()


# --- run(): files -------------------------------------------------------------------------


@pytest.fixture
def audit_log(tmp_path):
    path = tmp_path / "audit.log"
    raw = [line(ALLOW), b"Traceback (most recent call last):", line(STARTING), line(DENY)]
    path.write_bytes(b"\n".join(raw) + b"\n")
    return path


def test_piped_output_is_the_lines_exactly_as_logged(capsys, audit_log):
    assert logs.run(parse("--file", str(audit_log))) == 0
    assert capsys.readouterr().out.encode() == line(ALLOW) + b"\n" + line(DENY) + b"\n"


def test_filters_and_lines_apply_to_a_file(capsys, audit_log):
    assert logs.run(parse("--file", str(audit_log), "--decision", "deny", "--json")) == 0
    assert capsys.readouterr().out.encode() == line(DENY) + b"\n"
    assert logs.run(parse("--file", str(audit_log), "-n", "2", "--all")) == 0
    assert capsys.readouterr().out.encode() == line(STARTING) + b"\n" + line(DENY) + b"\n"


def test_text_in_a_pipe_is_the_human_format_without_colour(capsys, audit_log):
    assert logs.run(parse("--file", str(audit_log), "--text", "--utc")) == 0
    out = capsys.readouterr().out.splitlines()
    assert [row.split()[2] for row in out] == ["allow", "deny"]
    assert "\x1b" not in "".join(out)


def test_an_unreadable_file_or_a_since_a_file_cannot_use_is_exit_2(capsys, tmp_path, audit_log):
    assert logs.run(parse("--file", str(tmp_path / "missing"))) == 2
    assert "authd logs: cannot read" in capsys.readouterr().err
    assert logs.run(parse("--file", str(audit_log), "--since=-1h")) == 2
    err = capsys.readouterr().err
    assert "--since '-1h': expected an ISO 8601 time" in err


# --- run(): the journal -------------------------------------------------------------------

FAKE_JOURNALCTL = """\
#!{python}
import json, os, sys, time
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "argv.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
with open(os.path.join(here, "pid"), "w") as f:
    f.write(str(os.getpid()))
with open(os.path.join(here, "output"), "rb") as f:
    for chunk in iter(lambda: f.read(65536), b""):
        sys.stdout.buffer.write(chunk)
sys.stdout.flush()
if "--follow" in sys.argv:
    time.sleep(60)
sys.exit(int(os.environ.get("FAKE_JOURNALCTL_EXIT", "0")))
"""


@pytest.fixture
def journal(tmp_path, monkeypatch):
    """A fake journalctl, alone on PATH: `output` is what it prints, `argv.jsonl` what it got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "journalctl"
    script.write_text(FAKE_JOURNALCTL.format(python=sys.executable))
    script.chmod(0o755)
    (bin_dir / "output").write_bytes(
        b"-- No entries --\n" + line(STARTING) + b"\n" + line(ALLOW) + b"\n" + line(DENY) + b"\n",
    )
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


def calls(journal: Path) -> list[list[str]]:
    text = (journal / "argv.jsonl").read_text()
    return [json.loads(row) for row in text.splitlines()]


def test_the_journal_is_read_with_an_argument_list(capsys, journal):
    assert logs.run(parse("--decision", "allow")) == 0
    assert capsys.readouterr().out.encode() == line(ALLOW) + b"\n"
    assert calls(journal) == [["--unit=authd", "--output=cat", "--no-pager"]]


def test_journal_options_are_passed_through_each_in_one_argument(journal):
    unit = "authd; rm -rf / $(x) --since=0"
    assert logs.run(parse("--unit", unit, "-n", "5", "--since=-1h")) == 0
    assert logs.run(parse("--since", "2 hours ago")) == 0
    assert calls(journal) == [
        [f"--unit={unit}", "--output=cat", "--no-pager", "--lines=5", "--since=-1h"],
        ["--unit=authd", "--output=cat", "--no-pager", "--since=2 hours ago"],
    ]


def test_a_since_authd_understands_reaches_journalctl_as_epoch_seconds(journal):
    before = time.time()
    assert logs.run(parse("--since", "10m")) == 0
    (argv,) = calls(journal)
    since = argv[-1]
    assert since.startswith("--since=@")
    assert before - 601 <= int(since.removeprefix("--since=@")) <= time.time() - 599


@pytest.mark.usefixtures("journal")
def test_journalctl_failing_is_exit_1(capsys, monkeypatch):
    monkeypatch.setenv("FAKE_JOURNALCTL_EXIT", "1")
    assert logs.run(parse()) == 1
    assert "journalctl exited with status 1" in capsys.readouterr().err


def test_no_journalctl_is_a_clear_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert logs.run(parse("-f")) == 2
    err = capsys.readouterr().err
    assert "cannot run journalctl" in err
    assert "--file PATH" in err


# --- real processes -----------------------------------------------------------------------


class Tool:
    """`authd logs ARGV` as a process, its stdout a pipe read line by line in the background."""

    def __init__(self, *argv: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ENTRY, *argv],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**TOOL_ENV, **(env or {})},
        )
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for row in self.proc.stdout:
            self.lines.put(row)

    def expect(self, *rows: bytes, timeout: float = 10) -> None:
        for row in rows:
            assert self.lines.get(timeout=timeout) == row + b"\n"

    def quiet_for(self, seconds: float) -> None:
        with pytest.raises(queue.Empty):
            self.lines.get(timeout=seconds)

    def interrupt(self) -> tuple[int, bytes]:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=10)
        return code, self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def tool():
    started: list[Tool] = []

    def start(*argv: str, env: dict | None = None) -> Tool:
        started.append(Tool(*argv, env=env))
        return started[-1]

    yield start
    for t in started:
        t.kill()


def test_a_followed_file_survives_logrotate_and_ctrl_c_ends_it_quietly(tool, tmp_path):
    path = tmp_path / "audit.log"
    path.write_bytes(line(ALLOW) + b"\nnot json\n" + line(STARTING) + b"\n")
    logs_ = tool("-f", "--file", str(path))
    logs_.expect(line(ALLOW))
    append(path, line(DENY) + b"\n")
    logs_.expect(line(DENY))
    half = line(FORBIDDEN)
    append(path, half[:40])
    logs_.quiet_for(1)  # half a line is not shown, not even half
    append(path, half[40:] + b"\n")
    logs_.expect(half)
    # logrotate's default: rename, create a new file; authd reopens it on SIGHUP.
    path.rename(tmp_path / "audit.log.1")
    append(tmp_path / "audit.log.1", line(ERROR) + b"\n")
    time.sleep(0.6)
    # Longer than the line written after the truncation below: even a tool that missed the
    # empty file (a loaded machine) sees the file shrink below its position.
    rotated = line(ALLOW | {"uri": "/after-rotation" + "-" * 300})
    path.write_bytes(rotated + b"\n")
    logs_.expect(line(ERROR), rotated)
    # copytruncate: emptied in place, and written again.
    with path.open("r+b") as f:
        f.truncate(0)
    time.sleep(0.6)
    append(path, line(DENY | {"uri": "/after-truncation"}) + b"\n")
    logs_.expect(line(DENY | {"uri": "/after-truncation"}))
    assert logs_.interrupt() == (130, b"")


def test_a_closed_pipe_ends_the_tool_quietly(tmp_path):
    path = tmp_path / "audit.log"
    with path.open("wb") as f:
        for i in range(20_000):  # far more than a pipe holds
            f.write(line(DENY | {"request_id": str(i)}) + b"\n")
    head = subprocess.run(
        f"{sys.executable} -c '{ENTRY}' --file {path} | head -n 1",
        shell=True,
        cwd=ROOT,
        env=TOOL_ENV,
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert head.stdout == line(DENY | {"request_id": "0"}) + b"\n"
    assert head.stderr == b""
    tool = subprocess.Popen(
        [sys.executable, "-c", ENTRY, "--file", str(path)],
        cwd=ROOT,
        env=TOOL_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    tool.stdout.readline()
    tool.stdout.close()
    assert tool.wait(timeout=60) == 0
    assert tool.stderr.read() == b""


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_following_the_journal_and_ctrl_c_stops_journalctl_too(tool, journal):
    logs_ = tool("-f", "--decision", "deny", env={"PATH": str(journal)})
    logs_.expect(line(DENY))
    assert calls(journal) == [["--unit=authd", "--output=cat", "--no-pager", "--follow"]]
    pid = int((journal / "pid").read_text())
    assert not gone(pid)
    assert logs_.interrupt() == (130, b"")
    assert gone(pid)


def test_a_closed_pipe_stops_journalctl_too(journal):
    with (journal / "output").open("wb") as f:
        for i in range(20_000):
            f.write(line(DENY | {"request_id": str(i)}) + b"\n")
    tool = subprocess.Popen(
        [sys.executable, "-c", ENTRY, "-f"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**TOOL_ENV, "PATH": str(journal)},
    )
    assert json.loads(tool.stdout.readline())["request_id"] == "0"
    tool.stdout.close()
    assert tool.wait(timeout=30) == 0
    assert tool.stderr.read() == b""
    assert gone(int((journal / "pid").read_text()))
