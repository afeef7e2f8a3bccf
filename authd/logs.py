"""``authd logs``: read the audit stream from journald or a file, filter it, show it.

Lines flow one at a time from the source (a ``journalctl`` child or a file, followed like
``tail -F``) through a :class:`Filter` to the output: the line exactly as logged (JSON), or
one aligned, optionally coloured line per event for a human. Nothing is read whole into
memory, and no line, however malformed or hostile, stops the stream or reaches the terminal
unescaped.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TextIO, cast

from authd.errors import Reason

HELP = "show and follow the audit log (journald or a file), filtered"

DESCRIPTION = textwrap.dedent("""\
    Show the audit log, one line per decision, from the systemd journal of the
    authd unit (journalctl -u authd -o cat) or from a file (--file).

    On a terminal each decision is one aligned line: local time, decision and
    status (allow green, deny yellow, error red), reason code (for an allow: the
    rule that admitted), policy, user, duration, method and URI, and for a
    refusal its detail. Piped, or with --json, the matching lines are printed
    exactly as logged, one JSON object per line (for jq); --text keeps the
    human format in a pipe. Control characters in logged values are shown
    escaped (\\x1b), never sent to the terminal.

    Filters combine with AND; a filter with several values (repeated, or
    comma-separated) matches any of them.
      --decision  allow (200); deny (401: no valid token, 403: the policy
                  refuses); error (5xx: authd could not decide, e.g. the keys
                  are unavailable)
      --user      the email of a user or the client id of a service token,
                  ignoring case; * and ? are wildcards: --user '*@example.com'
      --policy    the policy name, exactly
      --reason    a reason code: expired, bad_audience, not_allowed, ...
      --since     time of the line, see below
    Only decision events are shown; --all adds the others (starting,
    keys_fetched, keys_fetch_failed, ...), to which only --since applies.
    Lines that are not JSON objects are skipped.

    --since takes an ISO 8601 time (2026-11-28T18:00, 2026-11-28 18:00:00+01:00;
    without an offset it is local time, or UTC with --utc), a duration back from
    now (30s, 10m, 2h, 1d), "today" or "yesterday". Reading the journal, other
    forms go to journalctl as they are (systemd.time(7); write --since=-1h).

    -n N starts with the last N lines of the log, counted before filtering, as
    tail and journalctl count them. -f keeps reading as lines arrive, starting
    with the last 10 lines unless -n or --since is given. A followed file
    survives rotation like tail -F: when logrotate renames it and creates a new
    one, or truncates it (copytruncate), reading goes on with the new lines.

    examples:
      authd logs -f
      authd logs --decision deny --since 1h
      authd logs --user alice@example.com --since today
      authd logs -f --reason expired,bad_audience --policy wiki
      authd logs -f --file /var/log/authd/audit.log
      authd logs --decision error --since yesterday --json | jq .detail

    exit status: 0 done, or the output was closed (| head); 1 journalctl
    failed; 2 usage error, unreadable file, or no journalctl; 130 interrupted.""")

EXIT_OK, EXIT_JOURNAL_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
POLL_SECONDS = 0.25  # how often a followed file is checked for new lines and rotation
MAX_LINE = 1 << 20  # longer lines are skipped: an audit line is a few hundred bytes
BLOCK = 1 << 16  # read size when looking for the last lines of a file
FOLLOW_LINES = 10  # -f without -n or --since starts with this many lines, like tail -f

DECISIONS = ("allow", "deny", "error")
REASONS = tuple(r.value for r in Reason)
_RELATIVE = re.compile(r"(\d+)\s*([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class UsageError(Exception):
    """The arguments cannot work (an unreadable file, a --since a file cannot use)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--unit",
        default="authd",
        metavar="UNIT",
        help="read the journal of this systemd unit (default: authd)",
    )
    source.add_argument("--file", type=Path, metavar="PATH", help="read this file instead")
    parser.add_argument("-f", "--follow", action="store_true", help="keep reading new lines")
    parser.add_argument(
        "-n",
        "--lines",
        type=_count,
        metavar="N",
        help="start with the last N lines (before filtering)",
    )
    parser.add_argument("--since", metavar="TIME", help="only lines logged at TIME or later")
    parser.add_argument(
        "--decision",
        type=_choices(DECISIONS),
        action="extend",
        metavar="D",
        help="allow, deny (401/403) or error (5xx); comma list or repeated",
    )
    parser.add_argument(
        "--user",
        type=_choices(),
        action="extend",
        metavar="U",
        help="email or service token id, ignoring case; * and ? are wildcards",
    )
    parser.add_argument(
        "--policy",
        type=_choices(),
        action="extend",
        metavar="P",
        help="policy name; comma list or repeated",
    )
    parser.add_argument(
        "--reason",
        type=_choices(REASONS),
        action="extend",
        metavar="R",
        help="reason code (expired, not_allowed, ...); comma list or repeated",
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="also show events other than decisions (startup, key fetches)",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the lines as logged")
    output.add_argument("--text", action="store_true", help="human format even in a pipe")
    parser.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour the human format (auto: on a terminal, unless NO_COLOR is set)",
    )
    parser.add_argument("--utc", action="store_true", help="show and read times in UTC")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of lines, got {text!r}")
    return value


def _choices(allowed: tuple[str, ...] = ()) -> Callable[[str], list[str]]:
    """An argparse type: a comma list of values, each one of ``allowed`` if given."""

    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a value, got {text!r}")
        wrong = [v for v in values if allowed and v not in allowed]
        if wrong:
            raise argparse.ArgumentTypeError(
                f"{', '.join(wrong)}: expected one of {', '.join(allowed)}",
            )
        return values

    return parse


def run(args: argparse.Namespace) -> int:
    """Show the log as ``args`` say; the exit status."""
    out = sys.stdout.buffer
    try:
        since = _since(args)
        keep = _filter(args, since)
        render = _renderer(args, sys.stdout)
        if args.file is not None:
            lines: Iterable[bytes] = tail_file(args.file, follow=args.follow, lines=_start(args))
            return _show(lines, keep, render, out, flush=args.follow)
        return _show_journal(journal_command(args, since), keep, render, out, args.follow)
    except UsageError as ex:
        sys.stderr.write(f"authd logs: {ex}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (| head): stop quietly, and keep the interpreter's final
        # flush of what is still buffered from failing again on the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return EXIT_OK


def _since(args: argparse.Namespace) -> datetime | None:
    if args.since is None:
        return None
    since = parse_since(args.since, datetime.now(UTC), utc=args.utc)
    if since is None and args.file is not None:
        raise UsageError(
            f"--since {args.since!r}: expected an ISO 8601 time, a duration such as "
            "30s, 10m, 2h or 1d, today or yesterday",
        )
    return since


def _start(args: argparse.Namespace) -> int | None:
    """How many lines from the end a file is read from; None for all of it."""
    if args.lines is None and args.follow and args.since is None:
        return FOLLOW_LINES
    return int(args.lines) if args.lines is not None else None


def _filter(args: argparse.Namespace, since: datetime | None) -> Filter:
    return Filter(
        decisions=frozenset(args.decision or ()),
        users=tuple(u.casefold() for u in args.user or ()),
        policies=frozenset(args.policy or ()),
        reasons=frozenset(args.reason or ()),
        since=since,
        everything=args.all,
    )


# --- time ---------------------------------------------------------------------------------


def parse_since(text: str, now: datetime, *, utc: bool = False) -> datetime | None:
    """``text`` as an aware datetime, or None when it is not in one of the documented forms.

    ``now`` is aware; midnight ("today") and times without an offset are local, or UTC.
    """
    word = text.strip().lower()
    zone = UTC if utc else None
    midnight = now.astimezone(zone).replace(hour=0, minute=0, second=0, microsecond=0)
    if word == "today":
        return midnight
    if word == "yesterday":
        return midnight - timedelta(days=1)
    if m := _RELATIVE.fullmatch(word):
        return now - timedelta(**{_UNITS[m[2]]: int(m[1])})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC) if utc else when.astimezone()
    return when


def _timestamp(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


# --- filtering ----------------------------------------------------------------------------


def parse_line(line: bytes) -> dict[str, object] | None:
    """The JSON object on ``line``, or None for anything else (which is then skipped)."""
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 and huge integers
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True, slots=True)
class Filter:
    """Which events are shown. Empty sets select everything; values are ORed, filters ANDed."""

    decisions: frozenset[str] = frozenset()
    users: tuple[str, ...] = ()  # casefolded fnmatch patterns
    policies: frozenset[str] = frozenset()
    reasons: frozenset[str] = frozenset()
    since: datetime | None = None
    everything: bool = False  # events other than decisions, too

    def accepts(self, event: Mapping[str, object]) -> bool:
        if self.since is not None:
            when = _timestamp(event.get("timestamp"))
            if when is None or when < self.since:
                return False
        if event.get("event") != "decision":
            return self.everything
        return (
            _one_of(self.decisions, event.get("decision"))
            and _one_of(self.policies, event.get("policy"))
            and _one_of(self.reasons, event.get("reason"))
            and (not self.users or self._user_matches(event))
        )

    def _user_matches(self, event: Mapping[str, object]) -> bool:
        names = {event.get(k) for k in ("user", "email", "service_token")}
        return any(
            fnmatch.fnmatchcase(name.casefold(), pattern)
            for name in names
            if isinstance(name, str)
            for pattern in self.users
        )


def _one_of(allowed: frozenset[str], value: object) -> bool:
    return not allowed or value in allowed


# --- output -------------------------------------------------------------------------------

Render = Callable[[bytes, dict[str, object]], bytes]

_RESET, _DIM, _RED, _GREEN, _YELLOW = "\x1b[0m", "\x1b[2m", "\x1b[31m", "\x1b[32m", "\x1b[33m"
_DECISION_COLOURS = {"allow": _GREEN, "deny": _YELLOW, "error": _RED}
_LEVEL_COLOURS = {"debug": _DIM, "warning": _YELLOW, "error": _RED, "critical": _RED}
_ELASTIC_CAP = 32  # policy and user columns grow to the widest value seen, up to this
_VALUE_CAP = 200  # a structured value of another event is cut after this many characters


def _renderer(args: argparse.Namespace, stdout: TextIO) -> Render:
    tty = stdout.isatty()
    if args.json or not (tty or args.text):
        return lambda line, _event: line + b"\n"
    colour = use_colour(args.color, tty=tty, env=os.environ)
    text = Formatter(colour=colour, utc=args.utc)
    encoding = stdout.encoding or "utf-8"
    return lambda _line, event: (text.line(event) + "\n").encode(encoding, "replace")


def use_colour(choice: str, *, tty: bool, env: Mapping[str, str]) -> bool:
    """--color auto colours a terminal unless NO_COLOR (https://no-color.org) or TERM=dumb."""
    if choice != "auto":
        return choice == "always"
    return tty and not env.get("NO_COLOR") and env.get("TERM") != "dumb"


def clean(value: object) -> str:
    """``value`` as text safe for a terminal: control and format characters escaped."""
    text = "-" if value is None else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


@dataclass
class Formatter:
    """The human format: one line per event, columns aligned across lines."""

    colour: bool
    utc: bool = False
    widths: dict[str, int] = field(default_factory=lambda: {"policy": 0, "user": 0})

    def line(self, event: Mapping[str, object]) -> str:
        if event.get("event") == "decision":
            return self._decision(event)
        return self._other(event)

    def _decision(self, e: Mapping[str, object]) -> str:
        decision = clean(e.get("decision"))
        status = clean(e.get("status"))
        detail = e.get("detail")
        columns = [
            self._paint(_DIM, self._time(e.get("timestamp"))),
            self._paint(_DECISION_COLOURS.get(decision, ""), f"{decision:<5} {status:>3}"),
            f"{clean(e.get('reason') or e.get('rule')):<20}",  # allow_service_tokens: 20
            self._elastic("policy", clean(e.get("policy"))),
            self._elastic("user", clean(e.get("user"))),
            f"{_duration(e.get('duration_ms')):>9}",
            f"{clean(e.get('method'))} {clean(e.get('uri'))}",
        ]
        if detail:
            columns.append(self._paint(_DIM, clean(detail)))
        return "  ".join(columns)

    def _other(self, e: Mapping[str, object]) -> str:
        level = clean(e.get("level"))
        rest = (f"{clean(k)}={_value(v)}" for k, v in e.items() if k not in _OWN_KEYS)
        return "  ".join(
            [
                self._paint(_DIM, self._time(e.get("timestamp"))),
                self._paint(_LEVEL_COLOURS.get(level, ""), f"{level:<9}"),
                " ".join([clean(e.get("event")), *rest]),
            ],
        )

    def _time(self, value: object) -> str:
        when = _timestamp(value)
        if when is None:
            return f"{clean(value):<19}"
        return when.astimezone(UTC if self.utc else None).strftime("%Y-%m-%d %H:%M:%S")

    def _elastic(self, column: str, text: str) -> str:
        width = self.widths[column] = max(self.widths[column], min(len(text), _ELASTIC_CAP))
        return f"{text:<{width}}"

    def _paint(self, colour: str, text: str) -> str:
        return f"{colour}{text}{_RESET}" if self.colour and colour else text


_OWN_KEYS = frozenset({"timestamp", "level", "event"})


def _duration(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return f"{value:.1f}ms"


def _value(value: object) -> str:
    if isinstance(value, str):
        text = clean(value)
        return json.dumps(text, ensure_ascii=False) if not text or " " in text else text
    text = clean(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
    return text if len(text) <= _VALUE_CAP else text[: _VALUE_CAP - 1] + "…"


# --- sources ------------------------------------------------------------------------------


def _show(
    lines: Iterable[bytes],
    keep: Filter,
    render: Render,
    out: IO[bytes],
    *,
    flush: bool,
) -> int:
    """Write each accepted line; when following, flush every line: a reader waits for it."""
    for line in lines:
        event = parse_line(line)
        if event is not None and keep.accepts(event):
            out.write(render(line, event))
            if flush:
                out.flush()
    out.flush()
    return EXIT_OK


def journal_command(args: argparse.Namespace, since: datetime | None) -> list[str]:
    """The journalctl argument list: one element per option, values attached, no shell."""
    argv = ["journalctl", f"--unit={args.unit}", "--output=cat", "--no-pager"]
    if args.follow:
        argv.append("--follow")
    if args.lines is not None:
        argv.append(f"--lines={args.lines}")
    if since is not None:
        argv.append(f"--since=@{int(since.timestamp())}")  # the filter then cuts exactly
    elif args.since is not None:
        argv.append(f"--since={args.since}")  # journalctl's own syntax
    return argv


def _show_journal(
    argv: list[str],
    keep: Filter,
    render: Render,
    out: IO[bytes],
    follow: bool,
) -> int:
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)  # noqa: S603 -- an argument list, no shell
    except OSError as ex:
        raise UsageError(
            f"cannot run journalctl ({ex.strerror}): on a system without systemd's journal, "
            "read the log file with --file PATH",
        ) from ex
    stream = cast("IO[bytes]", proc.stdout)  # stdout=PIPE
    try:
        _show(read_lines(stream), keep, render, out, flush=follow)
    except BaseException:
        proc.terminate()  # Ctrl-C, or our reader went away: journalctl must not linger
        raise
    finally:
        stream.close()
        code = proc.wait()
    if code != 0:
        sys.stderr.write(f"authd logs: journalctl exited with status {code}\n")
        return EXIT_JOURNAL_FAILED
    return EXIT_OK


class LineReader:
    """Complete lines of a binary stream, without their newline.

    A line still being written stays pending until its newline arrives, so a followed file
    never yields half a line; a line longer than :data:`MAX_LINE` is dropped whole.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.pending = b""
        self.dropping = False

    def available(self) -> Iterator[bytes]:
        """The complete lines up to the current end of the stream."""
        while chunk := self.stream.readline(MAX_LINE):
            if not chunk.endswith(b"\n"):
                self.pending += chunk
                if len(self.pending) > MAX_LINE:
                    self.pending, self.dropping = b"", True
                continue
            line, self.pending = self.pending + chunk[:-1], b""
            if self.dropping:
                self.dropping = False
            else:
                yield line

    def rest(self) -> Iterator[bytes]:
        """The unterminated last line, once the stream has ended."""
        if self.pending and not self.dropping:
            yield self.pending
        self.pending, self.dropping = b"", False


def read_lines(stream: IO[bytes]) -> Iterator[bytes]:
    reader = LineReader(stream)
    yield from reader.available()
    yield from reader.rest()


def tail_file(path: Path, *, follow: bool, lines: int | None) -> Iterator[bytes]:
    """The lines of ``path`` (the last ``lines`` of them if given), then, following, new ones.

    Opens at once, so an unreadable file is a :class:`UsageError` before anything is shown.
    """
    try:
        stream = path.open("rb")
    except OSError as ex:
        raise UsageError(f"cannot read {path}: {ex.strerror}") from ex
    if lines is not None:
        seek_last_lines(stream, lines)
    return _follow(path, stream) if follow else _read_and_close(stream)


def _read_and_close(stream: IO[bytes]) -> Iterator[bytes]:
    with stream:
        yield from read_lines(stream)


def seek_last_lines(stream: IO[bytes], count: int) -> None:
    """Position ``stream`` at the start of its last ``count`` lines, reading backwards."""
    end = stream.seek(0, os.SEEK_END)
    if count == 0:
        return
    # A newline at the very end closes the last line; every other one starts a line.
    pos, found = max(end - 1, 0), 0
    while pos > 0:
        start = max(pos - BLOCK, 0)
        stream.seek(start)
        block = stream.read(pos - start)
        at = len(block)
        while (at := block.rfind(b"\n", 0, at)) >= 0:
            found += 1
            if found == count:
                stream.seek(start + at + 1)
                return
        pos = start
    stream.seek(0)


def _follow(path: Path, stream: IO[bytes]) -> Iterator[bytes]:
    """Like ``tail -F``: read to the end, wait, and reopen ``path`` when it is replaced."""
    reader = LineReader(stream)
    try:
        while True:
            yield from reader.available()
            if os.fstat(stream.fileno()).st_size < stream.tell():  # truncated in place
                stream.seek(0)
                reader = LineReader(stream)
                continue
            replacement = _replacement(path, stream)
            if replacement is None:
                time.sleep(POLL_SECONDS)
                continue
            yield from reader.available()  # written to the old file before it was renamed
            yield from reader.rest()
            stream.close()
            stream, reader = replacement, LineReader(replacement)
    finally:
        stream.close()


def _replacement(path: Path, stream: IO[bytes]) -> IO[bytes] | None:
    """A newly opened ``path`` if it is no longer the file ``stream`` reads, else None."""
    try:
        now = path.stat()
    except OSError:
        return None  # renamed, its successor not created yet
    held = os.fstat(stream.fileno())
    if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
        return None
    try:
        return path.open("rb")
    except OSError:
        return None
