"""A pytest plugin: no token the suite makes may show up in any log line or response.

Loaded for every run by pyproject's ``addopts`` (``-p tests.leakcheck``). It keeps a
session-wide registry of every token the suite builds or sends, watches every output a
test can see, and fails the run at the end if any of it carries token material.

**Registered** (wrapped for the session, restored at its end; a wrapper only records
what the original returned or was given, it changes nothing):

- what the factories return: every method of ``tests.conftest.Forge`` and of its
  subclasses (``Mint`` in test_verify: ``signed_by`` and ``hmac`` build their tokens
  without ``raw``), ``authd.dev.mint`` and ``mint_alb``, PyJWT's ``PyJWS.encode`` (under
  ``jwt.encode``, ``DevKey.sign`` and ``authd.dev.mint``), ``devtools.stack.DevKey.sign``
  and ``mint``;
- what reaches authd as a token, hand-built ones included: the argument of
  ``authd.verify.split`` when it is JWT-shaped, and the JWT-shaped values of the
  token-carrying request headers (``Cf-Access-Jwt-Assertion``, ``x-goog-iap-jwt-assertion``,
  ``x-amzn-oidc-data``, ``Authorization``, ``Cookie``), ``X-Original-URI`` and the request
  target of every HTTP request the tests send with httpx or ``devtools.stack.http_request``.

**A leak** is a run of at least ``MIN_RUN`` (24) base64url characters in an output that is
also a substring of one of a registered token's dot-separated segments: the whole token,
or any 24-character piece of its header, payload or signature. Not leaks:

- a run with fewer than ``MIN_DISTINCT`` (8) different characters (``AAAA...``, the
  base64 of ``"x" * 4600``): it is in no sense a token's, and random base64url has ~20;
- a run that is part of a string value of the token's own *decoded* header or payload
  (kid, aud, sub, email, a claim): those are logged by design. A base64url segment of
  JSON never contains them verbatim, so this only matters for hand-made garbage tokens
  (a kid used as a signature, say);
- ``token_id`` (16 hex digits) and other short values: below 24 characters.

**Watched**: every captured section of every report (stdout, stderr and log of setup,
call and teardown, passing tests included; collection too), what tests read with
``capsys``/``capfd``, ``caplog``'s text, structlog's ``capture_logs`` entries, every JSON
line authd renders in process (``structlog.processors.JSONRenderer``), every response
(status, headers, body) seen through httpx, ``devtools.stack.http_request`` and Falcon's
test client, the stdout and stderr of every ``subprocess.run`` and of every
``devtools.stack._Process`` (authd, nginx) and nginx's error and access logs (after each
test, so that a leak is charged to the test that caused it, and when they stop), authd's
``audit_file`` when authd stops, and every collected test id.

**Allowed by design**, and nothing else: the upstream test double echoes the request it
received; the request target and header values *the client itself sent* are removed from
that echo before it is scanned (headers authd added are still scanned), and
``authd dev mint`` prints the token it minted: a stdout line that is exactly a token the
mint command printed (in process through ``authd.cli._mint``, or as a subprocess) is
skipped.

The report names the test, the output and what precedes the run, then a 12-character
excerpt, never more of a token. Not watched: output with capturing off (``-s``), raw
sockets (a test reading bytes from a socket by hand), files a subprocess writes other than
the above. Token material is matched as text: another process's token (the fuzz target's,
say) whose plaintext shares 18 bytes at the same alignment with one of the suite's shares
its base64url too, and is reported; keep such claim values apart.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import contextvars
import functools
import json
import os
import re
import subprocess
import sys
import threading
import time
import tomllib
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

MIN_RUN = 24
MIN_DISTINCT = 8
_ANCHOR = MIN_RUN // 2  # any common run of MIN_RUN holds a whole anchor-aligned block
_RUN = re.compile(rf"[A-Za-z0-9_-]{{{MIN_RUN},}}")
# "=" padding: an AWS ALB's tokens are padded base64url.
_TOKEN_SHAPED = re.compile(r"[A-Za-z0-9_-]+=*\.[A-Za-z0-9_-]+=*\.[A-Za-z0-9_-]*=*")
_TOKEN_HEADERS = frozenset(
    {
        "cf-access-jwt-assertion",
        "x-goog-iap-jwt-assertion",
        "x-amzn-oidc-data",
        "authorization",
        "cookie",
        "x-original-uri",
    },
)
_MAX_SCAN = 64 * 1024 * 1024  # a file or body beyond this is scanned up to it
EXCERPT = 12


def _b64decode(segment: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        return None


def _strings(value: object) -> Iterator[str]:
    """Every string (member names too) in a decoded JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)


def _decoded_strings(segment: str) -> Iterator[str]:
    raw = _b64decode(segment)
    if raw is None:
        return
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return
    yield from _strings(value)


class Registry:
    """Registered token segments, indexed by aligned blocks, and the checks against them.

    Memory stays proportional to the registered text: each distinct segment is kept once,
    and indexed by its blocks of ``_ANCHOR`` characters at positions 0, 12, 24, ...; a
    common run of 24 characters always contains one whole such block.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.segments: list[str] = []
        self._whole_only: set[int] = set()  # header segments: a leak only when whole
        self._ids: dict[str, int] = {}
        self._anchors: dict[str, list[int]] = {}
        self._public: set[str] = set()
        self.printed: set[str] = set()  # tokens `authd dev mint` printed by design
        self.registered = 0
        self._clean: dict[str, int] = {}  # run -> number of segments it was checked against

    def add(self, token: object) -> None:
        if isinstance(token, bytes):
            token = token.decode("latin-1")
        if not isinstance(token, str):
            return
        parts = token.split(".")
        with self._lock:
            self.registered += 1
            for n, part in enumerate(parts):
                for run in _RUN.findall(part):
                    self._add_segment(run, whole_only=n == 0 and len(parts) > 1)
            for part in parts[:2]:
                self._public.update(s for s in _decoded_strings(part) if len(s) >= MIN_RUN)

    def _add_segment(self, segment: str, *, whole_only: bool = False) -> None:
        """``whole_only``: a JOSE header (alg, kid, typ) counts only whole. Its first 24
        characters, ``{"alg": "RS256", "`` in base64url, are the same in countless tokens,
        the fuzzer's own included, and say nothing about any one of them; the payload and
        the signature count by any 24-character run."""
        if segment in self._ids:
            if not whole_only:
                self._whole_only.discard(self._ids[segment])
            return
        sid = self._ids[segment] = len(self.segments)
        if whole_only:
            self._whole_only.add(sid)
        self.segments.append(segment)
        for at in range(0, len(segment) - _ANCHOR + 1, _ANCHOR):
            self._anchors.setdefault(segment[at : at + _ANCHOR], []).append(sid)

    def find(self, text: str) -> list[tuple[str, str]]:
        """The leaks in ``text``: (the offending 24-character window, what precedes its run)."""
        found = []
        with self._lock:
            if len(self._clean) > 200_000:
                self._clean.clear()
            for match in _RUN.finditer(text[:_MAX_SCAN]):
                run = match.group()
                since = self._clean.get(run, 0)
                if since == len(self.segments):
                    continue
                leaked = self._check_run(run, since)
                if leaked is None:
                    self._clean[run] = len(self.segments)
                else:
                    found.append((leaked, text[max(0, match.start() - 40) : match.start()]))
        return found

    def _check_run(self, run: str, since: int) -> str | None:
        # Only a window of MIN_DISTINCT characters or more can be reported: look up a block
        # only if such a window holds it (another block of a longer common run is looked
        # up on its own). This keeps `AAAA...` runs, in thousands of segments, cheap.
        last = len(run) - MIN_RUN
        diverse = [len(set(run[s : s + MIN_RUN])) >= MIN_DISTINCT for s in range(last + 1)]
        if not any(diverse):
            return None
        for i in range(len(run) - _ANCHOR + 1):
            if not any(diverse[max(0, i + _ANCHOR - MIN_RUN) : min(i, last) + 1]):
                continue
            block = run[i : i + _ANCHOR]
            for sid in self._anchors.get(block, ()):
                if sid < since or (sid in self._whole_only and self.segments[sid] not in run):
                    continue
                leaked = self._common_runs(run, i, self.segments[sid], block)
                if leaked is not None:
                    return leaked
        return None

    def _common_runs(self, run: str, i: int, segment: str, block: str) -> str | None:
        at = segment.find(block)
        while at >= 0:
            left = 0
            while left < min(i, at) and run[i - left - 1] == segment[at - left - 1]:
                left += 1
            right = 0
            limit = min(len(run) - i, len(segment) - at) - _ANCHOR
            while right < limit and run[i + _ANCHOR + right] == segment[at + _ANCHOR + right]:
                right += 1
            if left + _ANCHOR + right >= MIN_RUN:
                leaked = self._reportable(run[i - left : i + _ANCHOR + right])
                if leaked is not None:
                    return leaked
            at = segment.find(block, at + 1)
        return None

    def _reportable(self, common: str) -> str | None:
        for start in range(len(common) - MIN_RUN + 1):
            window = common[start : start + MIN_RUN]
            if len(set(window)) >= MIN_DISTINCT and not any(window in p for p in self._public):
                return window
        return None


# --- the session's state ----------------------------------------------------------------------


class _State:
    def __init__(self) -> None:
        self.registry = Registry()
        self.leaks: dict[tuple[str, str, str], None] = {}  # (test, where, excerpt), in order
        self.test = "<session start>"
        self.scanned_sections: set[tuple[str, str]] = set()
        self.scanned: collections.Counter[str] = collections.Counter()  # by kind of output
        self.seconds = 0.0  # spent registering and scanning
        self.undo: list[Callable[[], None]] = []
        self.wrapped: set[int] = set()


STATE = _State()
_in_cli_mint: contextvars.ContextVar[bool] = contextvars.ContextVar("in_cli_mint", default=False)


def register(token: object) -> None:
    started = time.perf_counter()
    STATE.registry.add(token)
    STATE.seconds += time.perf_counter() - started


def scan(text: object, where: str, *, stdout: bool = False) -> None:
    """Record every leak in ``text`` against the running test; ``stdout``: a stream on which
    `authd dev mint` may have printed its token."""
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8", "replace")
    if not isinstance(text, str) or not text:
        return
    started = time.perf_counter()
    if stdout and STATE.registry.printed:
        printed = STATE.registry.printed
        text = "\n".join(line for line in text.splitlines() if line.strip() not in printed)
    STATE.scanned[re.sub(r" to (?:[A-Z]+ )?\S+| file \S+", "", where)] += 1
    for window, before in STATE.registry.find(text):
        # What precedes the run names the field; longer runs in it (the token's other
        # segments, say) are masked, so that the report shows no more than the excerpt.
        context = re.sub(r"[A-Za-z0-9_-]{13,}", "...", before.rsplit("\n", 1)[-1])[-30:]
        STATE.leaks.setdefault((STATE.test, where, f"{context!r} then {window[:EXCERPT]}"), None)
    STATE.seconds += time.perf_counter() - started


def _register_sent(headers: Any, target: str) -> list[tuple[str, str]]:
    """Register the JWT-shaped values a request carries; return its headers as pairs."""
    pairs = [(str(k).lower(), str(v)) for k, v in headers]
    for name, value in pairs:
        if name in _TOKEN_HEADERS:
            for token in _TOKEN_SHAPED.findall(value):
                register(token)
    for token in _TOKEN_SHAPED.findall(target):
        register(token)
    return pairs


def _without_reflection(body: str, sent: list[tuple[str, str]], target: str) -> str:
    """The upstream echo (``{"method", "path", "headers"}``) less what the client itself sent."""
    try:
        echoed = json.loads(body)
    except ValueError:
        return body
    if not (isinstance(echoed, dict) and isinstance(echoed.get("headers"), dict)):
        return body
    if echoed.get("path") == target:
        echoed.pop("path")
    for name, value in list(echoed["headers"].items()):
        values = [v for k, v in sent if k == name]
        if values and value in {*values, ", ".join(values)}:
            del echoed["headers"][name]
    return json.dumps(echoed)


def scan_response(
    where: str,
    *,
    status: object,
    headers: Any,
    body: bytes | str,
    sent: list[tuple[str, str]] | None = None,
    target: str = "",
) -> None:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    if sent is not None:
        text = _without_reflection(text, sent, target)
    header_text = "\n".join(f"{k}: {v}" for k, v in headers)
    scan(f"{status}\n{header_text}\n\n{text}", where)


# --- patching ---------------------------------------------------------------------------------


def _patch(owner: object, name: str, wrapper: Callable[[Any], Any]) -> None:
    """Replace ``owner.name`` by ``wrapper(original)`` until the session ends."""
    original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    if id(original) in STATE.wrapped:
        return
    replacement = wrapper(original)
    STATE.wrapped.add(id(replacement))
    setattr(owner, name, replacement)
    STATE.undo.append(lambda: setattr(owner, name, original))


def _returns_registered(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if isinstance(result, str | bytes):
            register(result)
        return result

    return wrapper


def _wrap_factory_class(cls: type) -> None:
    for name, attr in list(vars(cls).items()):
        if not name.startswith("__") and isinstance(attr, types.FunctionType):
            _patch(cls, name, _returns_registered)


def _wrap_forges() -> None:
    conftest = sys.modules.get("tests.conftest")
    forge = getattr(conftest, "Forge", None)
    if not isinstance(forge, type):
        return
    pending = [forge]
    while pending:
        cls = pending.pop()
        _wrap_factory_class(cls)
        pending.extend(cls.__subclasses__())


def _wrap_dev_mint(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def mint(*args: Any, **kwargs: Any) -> Any:
        token = original(*args, **kwargs)
        register(token)
        if _in_cli_mint.get():
            STATE.registry.printed.add(token)
        return token

    return mint


def _wrap_cli_mint(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def cli_mint(*args: Any, **kwargs: Any) -> Any:
        reset = _in_cli_mint.set(True)
        try:
            return original(*args, **kwargs)
        finally:
            _in_cli_mint.reset(reset)

    return cli_mint


def _wrap_split(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def split(token: object, *args: Any, **kwargs: Any) -> Any:
        if isinstance(token, str) and token.isascii() and _TOKEN_SHAPED.fullmatch(token):
            register(token)
        return original(token, *args, **kwargs)

    return split


def _wrap_json_renderer(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def render(self: object, *args: Any, **kwargs: Any) -> Any:
        line = original(self, *args, **kwargs)
        scan(line, "log line rendered in process (structlog JSONRenderer)")
        return line

    return render


def _wrap_capture_logs(original: Callable[..., Any]) -> Callable[..., Any]:
    @contextlib.contextmanager
    @functools.wraps(original)
    def capture_logs(*args: Any, **kwargs: Any) -> Iterator[Any]:
        with original(*args, **kwargs) as entries:
            try:
                yield entries
            finally:
                scan(repr(entries), "structlog capture_logs entries")

    return capture_logs


def _wrap_readouterr(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def readouterr(self: object) -> Any:
        result = original(self)
        scan(result.out, "stdout read with capsys/capfd", stdout=True)
        scan(result.err, "stderr read with capsys/capfd")
        return result

    return readouterr


def _wrap_caplog_finalize(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def finalize(self: Any) -> Any:
        with contextlib.suppress(Exception):
            scan(self.text, "caplog text")
        return original(self)

    return finalize


def _httpx_sent(request: Any) -> tuple[list[tuple[str, str]], str]:
    target = request.url.raw_path.decode("ascii", "replace")
    return _register_sent(request.headers.multi_items(), target), target


def _shown(path: str) -> str:
    """A request path for a report line: printable, short."""
    return re.sub(r"[^\x21-\x7e]", "?", path)[:80]


def _httpx_seen(request: Any, sent: Any, target: str, response: Any, streamed: bool) -> None:
    scan_response(
        f"response to {request.method} {_shown(request.url.path)} (httpx)",
        status=response.status_code,
        headers=response.headers.multi_items(),
        body=b"" if streamed else response.content,  # a streamed body is the caller's to read
        sent=sent,
        target=target,
    )


def _wrap_httpx_send(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def send(self: object, request: Any, *args: Any, **kwargs: Any) -> Any:
        sent, target = _httpx_sent(request)
        response = original(self, request, *args, **kwargs)
        _httpx_seen(request, sent, target, response, bool(kwargs.get("stream")))
        return response

    return send


def _wrap_httpx_async_send(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def send(self: object, request: Any, *args: Any, **kwargs: Any) -> Any:
        sent, target = _httpx_sent(request)
        response = await original(self, request, *args, **kwargs)
        _httpx_seen(request, sent, target, response, bool(kwargs.get("stream")))
        return response

    return send


def _wrap_http_request(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def http_request(*args: Any, **kwargs: Any) -> Any:
        path = str(args[1] if len(args) > 1 else kwargs.get("path", ""))
        sent = _register_sent((kwargs.get("headers") or {}).items(), path)
        answer = original(*args, **kwargs)
        scan_response(
            f"response to {_shown(path.partition('?')[0])} (devtools.stack.http_request)",
            status=answer.status,
            headers=answer.headers,
            body=answer.body,
            sent=sent,
            target=path,
        )
        return answer

    return http_request


def _wrap_falcon_result(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        scan_response(
            "response (falcon.testing)",
            status=self.status,
            headers=self.headers.items(),
            body=self.content,
        )

    return init


class _Watched:
    """A live process's output and a live nginx's logs, scanned a piece at a time: after each
    test (so that a leak is charged to the test that caused it) and when they stop."""

    def __init__(self) -> None:
        self.lines: dict[tuple[int, str], tuple[Any, int]] = {}  # (process, stream) -> seen
        self.files: dict[Path, tuple[int, int]] = {}  # path -> (inode, bytes scanned)

    def process(self, process: Any) -> None:
        for stream in ("stdout", "stderr"):
            self.lines[id(process), stream] = (process, 0)

    def scan(self, only: Any = None) -> None:
        for key, (process, seen) in list(self.lines.items()):
            if only is None or process is only:
                lines = getattr(process, key[1]).lines()
                where = f"{process.name}'s {key[1]}"
                scan("\n".join(lines[seen:]), where, stdout=key[1] == "stdout")
                self.lines[key] = (process, len(lines))
                if only is not None:
                    del self.lines[key]
        for path, done in list(self.files.items()):
            self._scan_file(path, done)

    def _scan_file(self, path: Path, done: tuple[int, int]) -> None:
        try:
            with path.open("rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                offset = done[1] if done[0] == inode else 0  # nginx recreates its error log
                f.seek(offset)
                chunk = f.read(_MAX_SCAN)
        except OSError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written: next time
        scan(complete, f"nginx's log {path.name}")
        self.files[path] = (inode, offset + len(complete))

    def stop_files(self, *paths: Path) -> None:
        for path in paths:
            self._scan_file(path, self.files.pop(path, (-1, 0)))
            self.files.pop(path, None)


WATCHED = _Watched()


def _wrap_process_init(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        WATCHED.process(self)

    return init


def _wrap_process_stop(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def stop(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        finally:
            WATCHED.scan(only=self)

    return stop


def _scan_file(path: Path, where: str) -> None:
    with contextlib.suppress(OSError):
        if path.is_file():
            with path.open("rb") as f:
                scan(f.read(_MAX_SCAN), where)


def _wrap_nginx_start(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def start(self: Any, *args: Any, **kwargs: Any) -> Any:
        for path in (Path(self.error_log), Path(self.access_log)):
            WATCHED.files.setdefault(path, (-1, 0))
        return original(self, *args, **kwargs)

    return start


def _wrap_nginx_stop(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def stop(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        finally:
            WATCHED.stop_files(Path(self.error_log), Path(self.access_log))

    return stop


def _wrap_authd_stop(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def stop(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        finally:
            with contextlib.suppress(OSError, ValueError):
                audit = tomllib.loads(Path(self.config).read_text()).get("audit_file")
                if audit:
                    for path in sorted(Path(audit).parent.glob(Path(audit).name + "*")):
                        _scan_file(path, f"authd's audit file {path.name}")

    return stop


def _is_dev_mint(argv: object) -> bool:
    """`authd dev mint ...`, also wrapped (`nsenter ... sh -c "authd dev mint ..."`)."""
    words = [str(a) for a in argv] if isinstance(argv, list | tuple) else [str(argv)]
    words = [w for word in words for w in word.split()]
    return any(words[i : i + 2] == ["dev", "mint"] for i in range(len(words)))


def _wrap_subprocess_run(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def run(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        argv = args[0] if args else kwargs.get("args", ())
        out = result.stdout
        if _is_dev_mint(argv) and out:
            # `authd dev mint` prints the token: that is its job, and its only line.
            text = out.decode() if isinstance(out, bytes) else out
            STATE.registry.printed.add(text.strip())
            register(text.strip())  # printed here by design; anywhere else it is a leak
        name = Path(str(argv[0] if isinstance(argv, list | tuple) else argv).split()[0]).name
        scan(out, f"stdout of subprocess {name}", stdout=True)
        scan(result.stderr, f"stderr of subprocess {name}")
        return result

    return run


def _install() -> None:
    import falcon.testing  # noqa: PLC0415 -- imported once the session starts
    import httpx  # noqa: PLC0415
    import jwt.api_jws  # noqa: PLC0415
    import structlog.processors  # noqa: PLC0415
    import structlog.testing  # noqa: PLC0415
    from _pytest.capture import CaptureFixture  # noqa: PLC0415
    from _pytest.logging import LogCaptureFixture  # noqa: PLC0415

    from authd import cli, dev, verify  # noqa: PLC0415
    from devtools import stack  # noqa: PLC0415

    _patch(jwt.api_jws.PyJWS, "encode", _returns_registered)
    _patch(jwt.api_jws, "encode", _returns_registered)
    _patch(dev, "mint", _wrap_dev_mint)
    _patch(dev, "mint_alb", _wrap_dev_mint)
    _patch(cli, "_mint", _wrap_cli_mint)
    _patch(verify, "split", _wrap_split)
    _patch(stack.DevKey, "sign", _returns_registered)
    _patch(stack.DevKey, "mint", _returns_registered)
    _patch(structlog.processors.JSONRenderer, "__call__", _wrap_json_renderer)
    _patch(structlog.testing, "capture_logs", _wrap_capture_logs)
    _patch(CaptureFixture, "readouterr", _wrap_readouterr)
    _patch(LogCaptureFixture, "_finalize", _wrap_caplog_finalize)
    _patch(httpx.Client, "send", _wrap_httpx_send)
    _patch(httpx.AsyncClient, "send", _wrap_httpx_async_send)
    _patch(stack, "http_request", _wrap_http_request)
    _patch(falcon.testing.Result, "__init__", _wrap_falcon_result)
    _patch(stack._Process, "__init__", _wrap_process_init)
    _patch(stack._Process, "stop", _wrap_process_stop)
    _patch(stack.Nginx, "start", _wrap_nginx_start)
    _patch(stack.Nginx, "stop", _wrap_nginx_stop)
    _patch(stack.Authd, "stop", _wrap_authd_stop)
    _patch(subprocess, "run", _wrap_subprocess_run)
    _wrap_forges()


def _uninstall() -> None:
    while STATE.undo:
        STATE.undo.pop()()
    STATE.wrapped.clear()


# --- hooks ------------------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:  # noqa: ARG001
    _install()


def pytest_collection_finish(session: pytest.Session) -> None:  # noqa: ARG001
    _wrap_forges()  # the subclasses in test modules exist now


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    STATE.test = item.nodeid
    try:
        return (yield)
    finally:
        WATCHED.scan()  # what the stacks wrote during this test
        STATE.test = f"<after {item.nodeid}>"


def _scan_sections(nodeid: str, sections: list[tuple[str, str]]) -> None:
    for title, content in sections:
        if (nodeid, title) not in STATE.scanned_sections:
            STATE.scanned_sections.add((nodeid, title))
            scan(content, title, stdout="stdout" in title)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    previous, STATE.test = STATE.test, report.nodeid
    try:
        _scan_sections(report.nodeid, report.sections)
    finally:
        STATE.test = previous


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _scan_sections(report.nodeid or "<collection>", report.sections)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    STATE.test = "<session end>"
    WATCHED.scan()  # processes never stopped
    for item in session.items:
        scan(item.nodeid, "the test id")
    _uninstall()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    stats = (
        f"{STATE.registry.registered} tokens registered "
        f"({len(STATE.registry.segments)} distinct segments), "
        f"{sum(STATE.scanned.values())} outputs scanned in {STATE.seconds:.1f}s"
    )
    if session.config.option.verbose > 0:
        stats += "".join(f"\n  {n:6d}  {kind.strip()}" for kind, n in STATE.scanned.most_common())
    if reporter is not None and reporter._tw.width_of_current_line:
        reporter._tw.line()  # after the progress dots
    if not STATE.leaks:
        if reporter is not None:
            reporter.write_line(f"leakcheck: no token in any output; {stats}")
        return
    lines = [f"{test}: in {where}: {excerpt}..." for test, where, excerpt in STATE.leaks]
    if reporter is not None:
        reporter.write_sep("=", f"leakcheck: {len(lines)} token leak(s)", red=True, bold=True)
        for line in lines:
            reporter.write_line(line)
        reporter.write_line(stats)
    else:
        print("\n".join(lines), file=sys.stderr)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
