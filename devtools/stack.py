"""Real processes on loopback for the end-to-end tests and the demo.

Everything here runs on 127.0.0.1 or on unix sockets inside a temporary directory, and cleans
up after itself: each piece is a context manager, subprocesses run in their own process group and
the whole group is killed on exit. Readiness is always polled (a socket that accepts, a health
check that answers), with a bounded timeout, never guessed with a sleep.

The pieces:

- `KeyServer`: a JWKS endpoint the test steers at run time (good keys, 500, slow, hung until
  released, redirect, garbage, huge, gzip bombs, down and up again), counting the requests it gets
  and the ones it is still holding.
- `Upstream`: the protected application; records each request and echoes its headers as JSON.
  `FastCGIApp` and `UwsgiApp` do the same behind fastcgi_pass and uwsgi_pass.
- `Authd`: `authd serve --config ...` with its stdout and stderr captured line by line.
- `Nginx`: the Debian nginx with a generated nginx.conf that includes the repo's shipped snippets
  (or, with `microcache`, the micro-cache mode's).
- `StaticServer`: fixed documents by path (an OIDC provider's discovery document and key set, an
  ALB's PEM key per kid), 404 for anything else, recording every path asked for.
- `DevKey`: key material from `authd dev keygen`, tokens from `authd dev mint` or signed in-process.
- `make_config` writes an authd TOML config with one Cloudflare issuer, `write_config` one with
  any issuers and any keys; `running_stack` starts authd, the upstream and nginx.
- `FakeTime`: a clock a test moves for one process (libfaketime), `ClientLoad` and `wrk_flood`:
  load through nginx, `rss_bytes` and `metric` for what a drill measures.
"""

from __future__ import annotations

import contextlib
import grp
import gzip
import http.client
import json
import os
import pwd
import re
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import IO, Any, Self, TypeVar

import jwt

from authd.snippets import MICROCACHE_LOG, MICROCACHE_PATH

REPO_ROOT = Path(__file__).resolve().parent.parent
# The shipped snippets; AUTHD_NGINX_DIR points elsewhere (an installed package's copy, say).
NGINX_SNIPPETS = Path(os.environ.get("AUTHD_NGINX_DIR", REPO_ROOT / "nginx"))
SHIPPED_LOCATION_SNIPPET = NGINX_SNIPPETS / "authd-location.conf"
# A policy with custom headers (any of these mappings) needs a location snippet rendered for
# its configuration.
RENDERED_LOCATION_SNIPPET = "authd-location.rendered.conf"
# Micro-cache mode with issuers that read other token sources than the defaults.
RENDERED_SERVER_MICROCACHE_SNIPPET = "authd-server-microcache.rendered.conf"
CUSTOM_HEADER_KEYS = ("headers", "identity_headers", "posture_headers")
NGINX_BIN = Path("/usr/sbin/nginx")
CERTS_PATH = "/cdn-cgi/access/certs"
MOVED_PATH = "/moved/certs"
LOOPBACK = "127.0.0.1"

DEFAULT_ISSUER = "https://test.cloudflareaccess.com"
WIKI_AUD = "a" * 56 + "0000wiki"
OPS_AUD = "b" * 56 + "00000ops"
SERVICE_TOKEN_ID = "e367826f93b8d71185e03fe518aff3b4.access"
DEFAULT_POLICIES: Mapping[str, Mapping[str, Any]] = {
    "wiki": {"audience": [WIKI_AUD], "allow_email_domains": ["example.com"]},
}

POLL_INTERVAL = 0.02
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

T = TypeVar("T")


class StackError(RuntimeError):
    """A process of the stack did not start, or did not become ready in time."""


def authd_executable() -> Path:
    """The `authd` console script of the running venv, else the repo's `.venv`."""
    for candidate in (Path(sys.prefix) / "bin" / "authd", REPO_ROOT / ".venv" / "bin" / "authd"):
        if candidate.exists():
            return candidate
    raise StackError("no authd executable: run `make venv` first")


def wait_for(
    condition: Callable[[], T | None],
    *,
    what: str,
    timeout: float = READY_TIMEOUT,
    interval: float = POLL_INTERVAL,
) -> T:
    """Poll `condition` until it returns something truthy and return that; raise after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


# --- subprocesses ---------------------------------------------------------------------------------


class _Captured:
    """One output stream of a subprocess, read line by line by a daemon thread."""

    def __init__(self, stream: IO[bytes], name: str) -> None:
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, args=(stream,), name=name, daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                line = raw.decode("utf-8", errors="backslashreplace").rstrip("\n")
                with self._lock:
                    self._lines.append(line)

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class _Process:
    """A subprocess in its own process group, with stdout and stderr captured."""

    def __init__(
        self,
        argv: Sequence[str | Path],
        *,
        name: str,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(arg) for arg in argv]
        self._popen = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=None if env is None else {**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so that stop() reaches every child
        )
        assert self._popen.stdout is not None
        assert self._popen.stderr is not None
        self.stdout = _Captured(self._popen.stdout, f"{name}-stdout")
        self.stderr = _Captured(self._popen.stderr, f"{name}-stderr")

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def running(self) -> bool:
        return self._popen.poll() is None

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send `sig` to the process group, wait, then SIGKILL the group if it lingers."""
        self.signal_group(sig)
        self.signal_group(signal.SIGCONT)  # a stopped process acts on signals only once resumed
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self._popen.wait(timeout)
        # Children that ignored the signal would keep the pipes open: make sure the group is gone.
        self.signal_group(signal.SIGKILL)
        self.stdout.join(timeout)
        self.stderr.join(timeout)
        return self._popen.returncode

    def signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._popen.pid, sig)

    def output(self) -> str:
        return "\n".join([*self.stdout.lines(), *self.stderr.lines()])

    def describe(self) -> str:
        """The command, its exit status and its output, for error messages."""
        return (
            f"{self.name}: {' '.join(self.argv)}\n"
            f"exit status: {self.returncode}\n"
            f"--- stdout ---\n{chr(10).join(self.stdout.lines())}\n"
            f"--- stderr ---\n{chr(10).join(self.stderr.lines())}"
        )


def _run(argv: Sequence[str | Path], *, what: str, timeout: float = 60.0) -> str:
    """Run a short command; return its stdout, or raise with its output on failure."""
    command = [str(arg) for arg in argv]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise StackError(
            f"{what} failed ({result.returncode}): {' '.join(command)}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )
    return result.stdout


# --- HTTP over TCP or a unix socket ---------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class Listen:
    """Where a server listens: `unix:/path` or `host:port`, as in authd's `listen` setting."""

    unix_path: Path | None = None
    host: str = LOOPBACK
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> Listen:
        if text.startswith("unix:"):
            return cls(unix_path=Path(text.removeprefix("unix:")))
        host, _, port = text.rpartition(":")
        return cls(host=host.strip("[]"), port=int(port))

    def accepts(self) -> bool:
        """Whether a connection to it succeeds right now."""
        family = socket.AF_UNIX if self.unix_path else socket.AF_INET
        address: str | tuple[str, int] = (
            str(self.unix_path) if self.unix_path else (self.host, self.port)
        )
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect(address)
            except OSError:
                return False
            return True

    def connection(self, timeout: float = 5.0) -> http.client.HTTPConnection:
        if self.unix_path:
            return _UnixHTTPConnection(str(self.unix_path), timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)


@dataclass(frozen=True)
class Answer:
    """A plain HTTP answer: status, headers (names lower-cased, in order) and body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name.lower()), None)


def http_request(
    listen: Listen,
    path: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> Answer:
    conn = listen.connection(timeout)
    try:
        conn.request(method, path, headers=dict(headers or {}))
        response = conn.getresponse()
        body = response.read()
        return Answer(
            status=response.status,
            headers=tuple((k.lower(), v) for k, v in response.getheaders()),
            body=body,
        )
    finally:
        conn.close()


# --- in-process HTTP servers ----------------------------------------------------------------------


class _Server(socketserver.ThreadingTCPServer):
    """A threaded stdlib TCP server on loopback that knows the object it serves for.

    Not `http.server.HTTPServer`: its bind looks the host name up in DNS, which we do not need.
    """

    daemon_threads = True
    allow_reuse_address = True  # `KeyServer.up()` binds the same port again at once

    def __init__(
        self, port: int, handler: type[socketserver.BaseRequestHandler], owner: object
    ) -> None:
        self.owner = owner
        super().__init__((LOOPBACK, port), handler)

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that does not write an access log to stderr."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002, ARG002 - stdlib's signature
        return

    def send_body(
        self,
        status: int,
        body: bytes,
        content_type: str,
        extra: Sequence[tuple[str, str]] = (),
        *,
        declare_length: bool = True,
    ) -> None:
        """Answer; without `declare_length` the body ends when the connection closes (HTTP/1.0)."""
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            if declare_length:
                self.send_header("Content-Length", str(len(body)))
            for name, value in extra:
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a size cap or a timeout on its side): nothing to do


class LoopbackServer:
    """Owns a `_Server` on 127.0.0.1 for `handler`, and the thread that serves it."""

    handler: type[socketserver.BaseRequestHandler]

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self._port}"

    def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = _Server(self._port, self.handler, self)
        self._port = self._server.port
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}-{self._port}",
            daemon=True,
        )
        self._thread.start()

    def _close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        self._listen()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._close()


# --- the key server -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyReply:
    """What the key server answers at the certs path."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    declare_length: bool = True  # False: no Content-Length, the body ends with the connection
    hold: bool = False  # answer only once the test calls `KeyServer.release()`


class _KeyHandler(QuietHandler):
    server: _Server

    def do_GET(self) -> None:
        owner = self.server.owner
        assert isinstance(owner, KeyServer)
        reply = owner.record(self.path)  # counted, and in flight until `left()`
        try:
            self._answer(owner, reply)
        finally:
            owner.left()

    def _answer(self, owner: KeyServer, reply: KeyReply) -> None:
        if self.path == MOVED_PATH:
            # The target of `redirect()` serves the good keys: following the redirect would work.
            self.send_body(200, owner.jwks, "application/json")
            return
        if self.path != CERTS_PATH:
            self.send_body(404, b"not found\n", "text/plain")
            return
        if reply.delay and owner.closing.wait(reply.delay):
            return  # shutting down while slow: just drop the connection
        if reply.hold:
            owner.released.wait()
            if owner.closing.is_set():
                return  # shutting down while held: just drop the connection
            reply = KeyReply(body=owner.jwks)
        self.send_body(
            reply.status,
            reply.body,
            reply.content_type,
            reply.headers,
            declare_length=reply.declare_length,
        )


class KeyServer(LoopbackServer):
    """A JWKS endpoint at `CERTS_PATH` on 127.0.0.1, steerable while tests run.

    Every request is counted (`request_count`, `paths`), whatever it is answered; `in_flight`
    is how many it is answering right now (a slow or held answer included).
    """

    handler = _KeyHandler

    def __init__(self, jwks: bytes | Mapping[str, Any] = b'{"keys": []}', port: int = 0) -> None:
        super().__init__(port)
        self._lock = threading.Lock()
        self._jwks = _as_json_bytes(jwks)
        self._reply = KeyReply(body=self._jwks)
        self._paths: list[str] = []
        self._in_flight = 0
        self.closing = threading.Event()
        self.released = threading.Event()  # what a held request waits for (`hang`/`release`)

    @property
    def url(self) -> str:
        return f"{self.base_url}{CERTS_PATH}"

    @property
    def jwks(self) -> bytes:
        with self._lock:
            return self._jwks

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._paths)

    @property
    def paths(self) -> list[str]:
        with self._lock:
            return list(self._paths)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def record(self, path: str) -> KeyReply:
        with self._lock:
            self._paths.append(path)
            self._in_flight += 1
            return self._reply

    def left(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def reply(self, reply: KeyReply) -> None:
        with self._lock:
            self._reply = reply

    # Steering -----------------------------------------------------------------------------------

    def serve_jwks(
        self, jwks: bytes | Mapping[str, Any] | None = None, *, max_age: int | None = None
    ) -> None:
        """Answer 200 with `jwks` (or the keys served last), and remember them as the good set;
        `max_age` adds `Cache-Control: max-age=N`."""
        headers = (("Cache-Control", f"public, max-age={max_age}"),) if max_age is not None else ()
        with self._lock:
            if jwks is not None:
                self._jwks = _as_json_bytes(jwks)
            self._reply = KeyReply(body=self._jwks, headers=headers)

    def fail(self, status: int = 500) -> None:
        self.reply(KeyReply(status=status, body=b"internal error\n", content_type="text/plain"))

    def slow(self, seconds: float) -> None:
        """Answer the good keys, but only after `seconds`."""
        self.reply(KeyReply(body=self.jwks, delay=seconds))

    def hang(self) -> None:
        """Hold every request from now on until `release()`, then answer the good keys."""
        self.released.clear()
        self.reply(KeyReply(hold=True))

    def release(self) -> None:
        """Let held requests have the good keys, and answer them at once from now on."""
        self.serve_jwks()
        self.released.set()

    def redirect(self, status: int = 302) -> None:
        """Redirect to `MOVED_PATH`, which serves the good keys: only a client that follows wins."""
        self.reply(KeyReply(status=status, headers=(("Location", self.base_url + MOVED_PATH),)))

    def serve_html(self) -> None:
        page = b"<!DOCTYPE html><html><body><h1>Sign in</h1></body></html>\n"
        self.reply(KeyReply(body=page, content_type="text/html"))

    def serve_garbage(self) -> None:
        self.reply(KeyReply(body=bytes(range(256)) * 4, content_type="application/octet-stream"))

    def serve_truncated(self) -> None:
        self.reply(KeyReply(body=self.jwks[: len(self.jwks) // 2]))

    def serve_empty_object(self) -> None:
        self.reply(KeyReply(body=b"{}"))

    def serve_huge(self, size: int = 10 * 1024 * 1024, *, declare_length: bool = True) -> None:
        """A syntactically valid JWKS of `size` bytes, padded with a long string member;
        without `declare_length` the client only finds out by reading."""
        self.reply(KeyReply(body=_padded_jwks(size), declare_length=declare_length))

    def serve_gzipped(self) -> None:
        """The good keys, gzip-encoded (`Content-Encoding: gzip`)."""
        self.reply(KeyReply(body=gzip.compress(self.jwks), headers=_GZIP))

    def serve_gzip_bomb(self, size: int = 64 * 1024 * 1024) -> None:
        """A few KiB on the wire that decode to a `size`-byte JWKS."""
        self.reply(KeyReply(body=gzip.compress(_padded_jwks(size)), headers=_GZIP))

    def down(self) -> None:
        """Close the listener: connections are refused until `up()`."""
        self.closing.set()
        self.released.set()
        self._close()

    def up(self) -> None:
        """Listen again, on the same port."""
        self.closing.clear()
        self._listen()

    def __exit__(self, *exc_info: object) -> None:
        self.closing.set()
        self.released.set()
        super().__exit__(*exc_info)


# Every way a key endpoint can let authd down, by name: the drills run each one.
KEY_SERVER_FAULTS: dict[str, Callable[[KeyServer], None]] = {
    "down": KeyServer.down,
    "500": lambda server: server.fail(500),
    "503": lambda server: server.fail(503),
    "404": lambda server: server.fail(404),
    "redirect": KeyServer.redirect,
    "html": KeyServer.serve_html,
    "garbage": KeyServer.serve_garbage,
    "truncated-json": KeyServer.serve_truncated,
    "empty-object": KeyServer.serve_empty_object,
    "10-MiB": KeyServer.serve_huge,
    "10-MiB-undeclared": lambda server: server.serve_huge(declare_length=False),
    "gzip-bomb": KeyServer.serve_gzip_bomb,
    # Beyond any fetch timeout the drills configure (they use 1 s).
    "slower-than-the-fetch-timeout": lambda server: server.slow(5),
}

_GZIP = (("Content-Encoding", "gzip"),)


def _padded_jwks(size: int) -> bytes:
    head, tail = b'{"keys": [], "padding": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def _as_json_bytes(value: bytes | Mapping[str, Any]) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


# --- documents by path: an OIDC provider, an ALB's key endpoint -----------------------------------


class _StaticHandler(QuietHandler):
    server: _Server

    def do_GET(self) -> None:
        owner = self.server.owner
        assert isinstance(owner, StaticServer)
        found = owner.record(self.path)
        if found is None:
            self.send_body(404, b"not found\n", "text/plain")
        else:
            self.send_body(200, *found)


class StaticServer(LoopbackServer):
    """Documents by path on 127.0.0.1, 404 for any other path: an OpenID provider's discovery
    document and key set, or an AWS ALB's key endpoint (one PEM public key per kid).

    `put` changes what it serves while tests run; every request is recorded (`paths`), whatever
    it is answered.
    """

    handler = _StaticHandler

    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self._lock = threading.Lock()
        self._documents: dict[str, tuple[bytes, str]] = {}
        self._paths: list[str] = []

    def put(
        self,
        path: str,
        body: bytes | Mapping[str, Any],
        content_type: str = "application/json",
    ) -> None:
        """Serve `body` (bytes, or a document as JSON) at `path` from now on."""
        with self._lock:
            self._documents[path] = (_as_json_bytes(body), content_type)

    def put_directory(self, prefix: str, directory: Path, content_type: str) -> None:
        """Serve each file of `directory` at `prefix/<file name>` (`authd dev keygen`'s
        alb-keys, say)."""
        for file in sorted(directory.iterdir()):
            self.put(f"{prefix.rstrip('/')}/{file.name}", file.read_bytes(), content_type)

    def record(self, path: str) -> tuple[bytes, str] | None:
        with self._lock:
            self._paths.append(path)
            return self._documents.get(path)

    @property
    def paths(self) -> list[str]:
        """The path of every request so far, in order."""
        with self._lock:
            return list(self._paths)


# --- the upstream application ---------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the upstream application saw it. Header names are lower-cased."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]

    def values(self, name: str) -> list[str]:
        """Every value of header `name`, in arrival order (empty if it did not arrive)."""
        return [v for k, v in self.headers if k == name.lower()]

    def get(self, name: str) -> str | None:
        values = self.values(name)
        return values[0] if values else None

    def names(self) -> set[str]:
        return {k for k, _ in self.headers}

    def as_json(self) -> dict[str, Any]:
        merged: dict[str, str] = {}
        for name, value in self.headers:
            merged[name] = f"{merged[name]}, {value}" if name in merged else value
        return {"method": self.method, "path": self.path, "headers": merged}


class _UpstreamHandler(QuietHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as nginx may use it towards the upstream

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        received = ReceivedRequest(
            method=self.command,
            path=self.path,
            headers=tuple((k.lower(), v) for k, v in self.headers.items()),
        )
        owner = self.server.owner
        assert isinstance(owner, Upstream)
        owner.record(received)
        body = json.dumps(received.as_json(), indent=2, sort_keys=True).encode() + b"\n"
        self.send_body(200, body, "application/json")

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()


class _RecordingServer(LoopbackServer):
    """A loopback server that keeps every request it received."""

    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self._lock = threading.Lock()
        self._requests: list[ReceivedRequest] = []

    def record(self, received: ReceivedRequest) -> None:
        with self._lock:
            self._requests.append(received)

    @property
    def requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_for(self, path: str) -> list[ReceivedRequest]:
        """The requests whose path (query string included) is exactly `path`."""
        return [r for r in self.requests if r.path == path]


class Upstream(_RecordingServer):
    """The protected application: records every request, answers 200 echoing its headers as JSON."""

    handler = _UpstreamHandler


# FastCGI (the subset nginx's fastcgi_pass uses): 8-byte record headers, then content and padding.
_FCGI_HEADER = struct.Struct("!BBHHBx")
_FCGI_END_REQUEST, _FCGI_PARAMS, _FCGI_STDIN, _FCGI_STDOUT = 3, 4, 5, 6


def _cgi_request(params: Sequence[tuple[str, str]]) -> ReceivedRequest:
    """A gateway request as the application sees it: `HTTP_X_FOO` params are header `x-foo`."""
    values = dict(params)
    headers = tuple(
        (name.removeprefix("HTTP_").lower().replace("_", "-"), value)
        for name, value in params
        if name.startswith("HTTP_")
    )
    return ReceivedRequest(values.get("REQUEST_METHOD", ""), values.get("REQUEST_URI", ""), headers)


def _cgi_body(received: ReceivedRequest) -> bytes:
    return json.dumps(received.as_json(), indent=2, sort_keys=True).encode() + b"\n"


class _FastCGIHandler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        request_id, params = 0, bytearray()
        while True:
            header = self.rfile.read(_FCGI_HEADER.size)
            if len(header) < _FCGI_HEADER.size:
                return  # nginx gave up on this connection
            _, kind, request_id, length, padding = _FCGI_HEADER.unpack(header)
            content = self.rfile.read(length)
            self.rfile.read(padding)
            if kind == _FCGI_PARAMS:
                params += content
            elif kind == _FCGI_STDIN and not content:
                break  # the (empty) body is complete: answer
        received = _cgi_request(_fastcgi_pairs(bytes(params)))
        owner = self.server.owner
        assert isinstance(owner, FastCGIApp)
        owner.record(received)
        body = _cgi_body(received)
        stdout = b"Status: 200 OK\r\nContent-Type: application/json\r\n\r\n" + body
        self._record(_FCGI_STDOUT, request_id, stdout)
        self._record(_FCGI_STDOUT, request_id, b"")
        self._record(_FCGI_END_REQUEST, request_id, bytes(8))  # app status 0, request complete

    def _record(self, kind: int, request_id: int, content: bytes) -> None:
        self.wfile.write(_FCGI_HEADER.pack(1, kind, request_id, len(content), 0) + content)


def _fastcgi_pairs(data: bytes) -> list[tuple[str, str]]:
    """FastCGI name-value pairs: each length is 1 byte, or 4 with the high bit set."""

    def length(at: int) -> tuple[int, int]:
        if data[at] < 0x80:
            return data[at], at + 1
        return struct.unpack_from("!I", data, at)[0] & 0x7FFFFFFF, at + 4

    pairs, at = [], 0
    while at < len(data):
        name_length, at = length(at)
        value_length, at = length(at)
        name = data[at : at + name_length].decode("latin-1")
        value = data[at + name_length : at + name_length + value_length].decode("latin-1")
        pairs.append((name, value))
        at += name_length + value_length
    return pairs


class FastCGIApp(_RecordingServer):
    """A FastCGI application (what PHP-FPM is to nginx): records each request's `HTTP_*` params
    as headers, answers 200 echoing them as JSON."""

    handler = _FastCGIHandler


class _UwsgiHandler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        header = self.rfile.read(4)  # modifier1, size of the vars (little endian), modifier2
        if len(header) < 4:
            return
        data = self.rfile.read(struct.unpack_from("<H", header, 1)[0])
        pairs, at = [], 0
        while at < len(data):
            (name_length,) = struct.unpack_from("<H", data, at)
            name = data[at + 2 : at + 2 + name_length].decode("latin-1")
            at += 2 + name_length
            (value_length,) = struct.unpack_from("<H", data, at)
            pairs.append((name, data[at + 2 : at + 2 + value_length].decode("latin-1")))
            at += 2 + value_length
        received = _cgi_request(pairs)
        owner = self.server.owner
        assert isinstance(owner, UwsgiApp)
        owner.record(received)
        body = _cgi_body(received)
        self.wfile.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )


class UwsgiApp(_RecordingServer):
    """A uwsgi application: records each request's `HTTP_*` vars as headers, answers 200."""

    handler = _UwsgiHandler


# --- key material and tokens ----------------------------------------------------------------------


@dataclass(frozen=True)
class DevKey:
    """A signing key made by `authd dev keygen`: `private.pem` and `jwks.json` in `directory`."""

    directory: Path

    @classmethod
    def create(cls, directory: Path, *, exe: Path | None = None) -> DevKey:
        directory.mkdir(parents=True, exist_ok=True)
        _run([exe or authd_executable(), "dev", "keygen", directory], what="authd dev keygen")
        return cls(directory)

    @property
    def private_pem_path(self) -> Path:
        return self.directory / "private.pem"

    @property
    def jwks_path(self) -> Path:
        return self.directory / "jwks.json"

    @property
    def jwks(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.jwks_path.read_text())
        return loaded

    @property
    def jwk(self) -> dict[str, Any]:
        key: dict[str, Any] = self.jwks["keys"][0]
        return key

    @property
    def kid(self) -> str:
        kid: str = self.jwk["kid"]
        return kid

    def sign(
        self,
        claims: Mapping[str, Any],
        *,
        headers: Mapping[str, Any] | None = None,
        algorithm: str = "RS256",
    ) -> str:
        """Sign `claims` in-process with PyJWT; the header has this key's kid unless overridden."""
        return jwt.encode(
            dict(claims),
            self.private_pem_path.read_bytes(),
            algorithm=algorithm,
            headers={"kid": self.kid, **(headers or {})},
        )

    def mint(  # noqa: PLR0913 - one keyword per option of `authd dev mint`
        self,
        *,
        iss: str,
        aud: str,
        email: str | None = None,
        ttl: int | None = None,
        token_type: str | None = None,
        service_token: str | None = None,
        claims: Mapping[str, str] | None = None,
        exe: Path | None = None,
    ) -> str:
        """A token from `authd dev mint`, the way an operator makes one."""
        argv: list[str | Path] = [exe or authd_executable(), "dev", "mint"]
        argv += ["--key", self.private_pem_path, "--iss", iss, "--aud", aud]
        if email is not None:
            argv += ["--email", email]
        if ttl is not None:
            argv.append(f"--ttl={ttl}")  # `=` so that a negative ttl is not taken for an option
        if token_type is not None:
            argv += ["--type", token_type]
        if service_token is not None:
            argv += ["--service-token", service_token]
        for name, value in (claims or {}).items():
            argv += ["--claim", f"{name}={value}"]
        return _run(argv, what="authd dev mint").strip()


def jwks_of(*keys: DevKey) -> dict[str, Any]:
    """One Cloudflare-shaped key set with the public keys of all `keys` (the first is current)."""
    sets = [key.jwks for key in keys]
    merged: dict[str, Any] = {"keys": [jwk for s in sets for jwk in s["keys"]]}
    if "public_cert" in sets[0]:
        merged["public_cert"] = sets[0]["public_cert"]
    if all("public_certs" in s for s in sets):
        merged["public_certs"] = [cert for s in sets for cert in s["public_certs"]]
    return merged


# --- authd configuration --------------------------------------------------------------------------


def make_config(  # noqa: PLR0913 - one keyword per setting of the config file
    tmpdir: Path,
    *,
    jwks_url: str | None = None,
    jwks_file: Path | None = None,
    policies: Mapping[str, Mapping[str, Any]] = DEFAULT_POLICIES,
    issuer: str = DEFAULT_ISSUER,
    listen: str | None = None,
    leeway_seconds: int = 30,
    refetch_cooldown_seconds: int = 60,
    refresh_seconds: int = 3600,
    max_stale_seconds: int = 86400,
    fetch_timeout_seconds: int = 10,
    workers: int | str = 1,
    audit_file: Path | None = None,
    nginx_cache_seconds: int = 0,
    cache: Mapping[str, Any] | None = None,
    name: str = "authd.toml",
) -> Path:
    """Write an authd config with one Cloudflare issuer to `tmpdir/name` and return its path.

    Exactly one of `jwks_url` and `jwks_file` names where the issuer's keys come from.
    One worker unless asked (authd's default, "auto", is one per CPU): drills count per process.
    For several issuers, or issuer keys of any kind, use `write_config`.
    """
    if (jwks_url is None) == (jwks_file is None):
        raise ValueError("give exactly one of jwks_url and jwks_file")
    source = {"jwks_url": jwks_url} if jwks_url is not None else {"jwks_file": str(jwks_file)}
    issuer_table = {
        "name": "test",
        "issuer": issuer,
        **source,
        "refetch_cooldown_seconds": refetch_cooldown_seconds,
        "refresh_seconds": refresh_seconds,
        "max_stale_seconds": max_stale_seconds,
        "fetch_timeout_seconds": fetch_timeout_seconds,
    }
    return write_config(
        tmpdir,
        issuers=[issuer_table],
        policies=policies,
        cache=cache,
        name=name,
        listen=listen,
        leeway_seconds=leeway_seconds,
        workers=workers,
        audit_file=audit_file,
        nginx_cache_seconds=nginx_cache_seconds or None,
    )


def write_config(
    tmpdir: Path,
    *,
    issuers: Sequence[Mapping[str, Any]],
    policies: Mapping[str, Mapping[str, Any]] = DEFAULT_POLICIES,
    cache: Mapping[str, Any] | None = None,
    name: str = "authd.toml",
    **settings: object,
) -> Path:
    """Write an authd config to `tmpdir/name` and return its path: the top-level `settings`,
    one `[[issuers]]` table per mapping of `issuers`, `[cache]`, and a `[policies.NAME]` table
    per policy, every key written as given (so a test can say anything authd's parser reads).

    A setting that is None is left out; `listen` defaults to a unix socket in `tmpdir`, and
    `workers` to 1 (authd's default, "auto", is one per CPU: drills count per process).
    """
    top = {
        "listen": settings.pop("listen", None) or f"unix:{tmpdir / 'authd.sock'}",
        **{key: value for key, value in settings.items() if value is not None},
    }
    top.setdefault("workers", 1)
    lines = [f"{_toml_key(key)} = {_toml(value)}" for key, value in top.items()]
    for table in issuers:
        lines += ["", "[[issuers]]"]
        lines += [f"{_toml_key(key)} = {_toml(value)}" for key, value in table.items()]
    if cache is not None:
        lines += ["", "[cache]"]
        lines += [f"{_toml_key(key)} = {_toml(value)}" for key, value in cache.items()]
    for policy, policy_settings in policies.items():
        lines += ["", f"[policies.{_toml_key(policy)}]"]
        lines += [f"{_toml_key(key)} = {_toml(value)}" for key, value in policy_settings.items()]
    path = tmpdir / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: object) -> str:
    """The TOML spelling of the few value types authd's config uses."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML spelling for {value!r}")


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


# --- systemd's notify socket ---------------------------------------------------------------------


class NotifySocket:
    """The service manager's end of sd_notify: a datagram socket that records every message.

    Pass `env` to authd (as systemd sets NOTIFY_SOCKET); `messages()` are parsed into dicts.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.settimeout(0.2)
        self._messages: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="notify", daemon=True)
        self._thread.start()

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def _receive(self) -> None:
        while not self._closing.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self._messages.append(fields)

    def messages(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self._messages)

    def wait_for(
        self, field: str, value: str = "1", *, after: int = 0, timeout: float = READY_TIMEOUT
    ) -> dict[str, str]:
        """Wait until a message (from the `after`-th on) has `field=value`; return it."""

        def seen() -> dict[str, str] | None:
            for message in self.messages()[after:]:
                if message.get(field) == value:
                    return message
            return None

        return wait_for(seen, what=f"sd_notify {field}={value}", timeout=timeout)

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- authd ----------------------------------------------------------------------------------------


class Authd:
    """`authd serve --config PATH` as a subprocess, with its output captured.

    `start()` waits until the listen socket accepts and `GET /healthz` answers 200, and with
    `wait_ready` (the default) also until `GET /readyz` answers 200: every issuer has keys. A drill
    that starts authd without reachable keys passes `wait_ready=False`.
    """

    def __init__(  # noqa: PLR0913 - one keyword per way of starting authd
        self,
        config: Path,
        *,
        exe: Path | None = None,
        wait_ready: bool = True,
        ready_timeout: float = READY_TIMEOUT,
        activated: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.listen = Listen.parse(tomllib.loads(config.read_text())["listen"])
        self._exe = exe or authd_executable()
        self._wait_ready = wait_ready
        self._ready_timeout = ready_timeout
        self._activated = activated
        self._env = env
        self._process: _Process | None = None
        self._earlier_output: list[str] = []

    @property
    def process(self) -> _Process:
        if self._process is None:
            raise StackError("authd is not started")
        return self._process

    def start(self) -> Self:
        argv: list[str | Path] = [self._exe, "serve", "--config", self.config]
        if self._activated:
            argv = [*self._socket_activation(), *argv]
        self._process = _Process(argv, name="authd", env=self._env)
        try:
            wait_for(self._ready, what="authd to be ready", timeout=self._ready_timeout)
        except (TimeoutError, StackError) as ex:
            description = self.process.describe()
            self.stop()
            raise StackError(f"authd did not become ready: {ex}\n{description}") from ex
        return self

    def _socket_activation(self) -> list[str]:
        """systemd's own tool: it binds the listen address and passes it to authd as fd 3,
        with LISTEN_FDS/LISTEN_PID, as authd.socket does (`-E` passes our variables on)."""
        unix = self.listen.unix_path
        address = str(unix) if unix else f"{self.listen.host}:{self.listen.port}"
        passed = [arg for name in (self._env or {}) for arg in ("-E", name)]
        return ["systemd-socket-activate", "--listen", address, *passed]

    @property
    def pid(self) -> int:
        """The main process: the daemon, or with workers their supervisor."""
        return self.process.pid

    def worker_pids(self) -> list[int]:
        """The workers a supervisor started and has not seen exit."""
        started = [e["pid"] for e in self.events() if e.get("event") == "worker_started"]
        ended = {
            e["pid"] for e in self.events() if e.get("event") in {"worker_died", "worker_stopped"}
        }
        return [pid for pid in started if pid not in ended]

    def _ready(self) -> bool:
        if not self.process.running():
            raise StackError("authd exited during startup")
        if not self.listen.accepts():
            return False
        try:
            healthy = http_request(self.listen, "/healthz").status == 200
            return healthy and (not self._wait_ready or self.ready())
        except OSError:
            return False

    def ready(self) -> bool:
        """Whether `/readyz` says every issuer has a usable key set."""
        return http_request(self.listen, "/readyz").status == 200

    def request(self, path: str, headers: Mapping[str, str] | None = None) -> Answer:
        """A request straight to authd, bypassing nginx."""
        return http_request(self.listen, path, headers=headers)

    def running(self) -> bool:
        return self._process is not None and self._process.running()

    def freeze(self) -> None:
        """SIGSTOP: authd hangs, its socket still accepting (a deadlock, a swapped-out host)."""
        self.process.signal_group(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.signal_group(signal.SIGCONT)

    def stop(self) -> int | None:
        """SIGTERM, wait for exit; the output stays readable afterwards."""
        if self._process is None:
            return None
        code = self._process.stop(signal.SIGTERM)
        self._earlier_output.append(self._process.output())
        self._process = None
        return code

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # Output -------------------------------------------------------------------------------------

    def stdout_lines(self) -> list[str]:
        return self._process.stdout.lines() if self._process else []

    def events(self) -> list[dict[str, Any]]:
        """Every stdout line that is a JSON object, parsed."""
        parsed = []
        for line in self.stdout_lines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                parsed.append(event)
        return parsed

    def count(self, event_name: str) -> int:
        """How many events of this name authd has written so far."""
        return sum(1 for event in self.events() if event.get("event") == event_name)

    def wait_for_event(self, event_name: str, *, timeout: float = 10.0) -> dict[str, Any]:
        """Poll until authd has written an event of this name; return the first."""
        return wait_for(
            lambda: next((e for e in self.events() if e.get("event") == event_name), None),
            what=f"authd's {event_name} event",
            timeout=timeout,
        )

    def audit_lines(self) -> list[dict[str, Any]]:
        """The decision events: exactly one per `/auth` request."""
        return [event for event in self.events() if event.get("event") == "decision"]

    def wait_for_audit(
        self, predicate: Callable[[dict[str, Any]], bool], *, timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """Poll until at least one decision event matches; return all that match."""
        return wait_for(
            lambda: [line for line in self.audit_lines() if predicate(line)],
            what="a matching audit line",
            timeout=timeout,
        )

    def all_output(self) -> str:
        """All of authd's stdout and stderr so far, across restarts."""
        current = [self._process.output()] if self._process else []
        return "\n".join([*self._earlier_output, *current])

    def metrics(self) -> str:
        """`GET /metrics` on authd's socket: the Prometheus text (see `metric`)."""
        answer = http_request(self.listen, "/metrics")
        if answer.status != 200:
            raise StackError(f"/metrics answered {answer.status}")
        return answer.body.decode()

    def metric(self, name: str, **labels: str) -> float:
        """One metric from `/metrics` right now, summed over the samples matching `labels`."""
        return metric(self.metrics(), name, **labels)


# --- nginx ----------------------------------------------------------------------------------------


def protected_location(
    path: str,
    policy: str,
    upstream_url: str,
    *,
    snippet: Path = SHIPPED_LOCATION_SNIPPET,
    extra: str = "",
) -> str:
    """A location protected by authd, as the README tells operators: set the policy, include the
    location snippet, pass to the upstream. `extra` adds directives of the location's own."""
    return (
        f"location {path} {{\n"
        f"    set $authd_policy {policy};\n"
        f"    include {snippet};\n"
        f"{_indent(extra, 4)}"
        f"    proxy_pass {upstream_url};\n"
        f"}}\n"
    )


def _indent(text: str, width: int) -> str:
    if not text.strip():
        return ""
    pad = " " * width
    return "".join(pad + line + "\n" for line in text.strip("\n").splitlines())


class Nginx:
    """The Debian nginx on 127.0.0.1, configured in `workdir` with the repo's shipped snippets.

    Only the http-context `upstream authd` block is generated, by `authd nginx-snippet`; the server
    and location contexts include `nginx/authd-server.conf` and `nginx/authd-location*.conf`.
    For policies with custom headers, `authd nginx-snippet --context location` is also rendered
    to `rendered_location_snippet` in `workdir`, for locations that include it; in micro-cache
    mode, the server snippet is rendered too when the shipped one's cache key does not cover
    every token source of the configuration.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        authd_config: Path,
        locations: Sequence[str],
        port: int | None = None,
        microcache: bool = False,
    ) -> None:
        self.workdir = workdir
        self.authd_config = authd_config
        self.locations = list(locations)
        self.microcache = microcache
        self.port = port or free_port()
        self._exe = authd_executable()
        self.conf_path = workdir / "nginx.conf"
        self.error_log = workdir / "nginx-error.log"
        self.access_log = workdir / "nginx-access.log"
        self._process: _Process | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def rendered_location_snippet(self) -> Path:
        return self.workdir / RENDERED_LOCATION_SNIPPET

    def _snippet(self, context: str) -> str:
        return _run(
            [self._exe, "nginx-snippet", "--config", self.authd_config, "--context", context],
            what=f"authd nginx-snippet --context {context}",
        )

    def render(self) -> str:
        """The nginx.conf; it also writes the rendered location snippet it may include."""
        self.rendered_location_snippet.write_text(self._snippet("location"))
        http_snippet = self._snippet("http")
        server_snippet = NGINX_SNIPPETS / "authd-server.conf"
        if self.microcache:
            # The rendered http-microcache snippet, with its cache and log in the workdir.
            http_snippet += (
                self._snippet("http-microcache")
                .replace(MICROCACHE_PATH, str(self.microcache_dir))
                .replace(MICROCACHE_LOG, str(self.microcache_log))
            )
            server_snippet = NGINX_SNIPPETS / "authd-server-microcache.conf"
            # The shipped one's cache key holds the default token sources only: a configuration
            # whose issuers read other places needs its own, as operators must render it.
            rendered = self._snippet("server-microcache")
            if rendered != server_snippet.read_text():
                server_snippet = self.workdir / RENDERED_SERVER_MICROCACHE_SNIPPET
                server_snippet.write_text(rendered)
        tmp = self.workdir / "nginx-temp"
        return _NGINX_CONF.format(
            user=_nginx_user(),
            pid=self.workdir / "nginx.pid",
            lock=self.workdir / "nginx.lock",
            error_log=self.error_log,
            access_log=self.access_log,
            tmp=tmp,
            authd_http=_indent(http_snippet, 4),
            port=self.port,
            server_snippet=server_snippet,
            locations=_indent("\n".join(self.locations), 8),
        )

    @property
    def microcache_dir(self) -> Path:
        return self.workdir / "nginx-authd-cache"

    @property
    def microcache_log(self) -> Path:
        """Micro-cache mode's access log: a JSON line per request to a protected location."""
        return self.workdir / "authd-access.log"

    def microcache_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in _read_if_exists(self.microcache_log).splitlines()]

    def start(self) -> Self:
        if not NGINX_BIN.exists():
            raise StackError(f"{NGINX_BIN} is missing: run `make deps`")
        (self.workdir / "nginx-temp").mkdir(exist_ok=True)
        for _ in range(2):
            try:
                return self._start_once()
            except _PortTakenError:
                self.port = free_port()  # something took the free port we picked: pick again
        return self._start_once()

    def _start_once(self) -> Self:
        self.error_log.unlink(missing_ok=True)  # judge this attempt by its own log
        self.conf_path.write_text(self.render())
        argv: list[str | Path] = [NGINX_BIN, "-c", self.conf_path, "-p", self.workdir]
        _run([*argv, "-t", "-q"], what="nginx -t")
        self._process = _Process(argv, name="nginx")
        try:
            wait_for(self._ready, what=f"nginx on port {self.port}")
        except _PortTakenError:
            self.stop()
            raise
        except (TimeoutError, StackError) as ex:
            description = self._process.describe() + "\n--- error log ---\n" + self.error_log_text()
            self.stop()
            raise StackError(f"nginx did not start: {ex}\n{description}") from ex
        return self

    def _ready(self) -> bool:
        assert self._process is not None
        if not self._process.running():
            raise StackError("nginx exited during startup")
        if "Address already in use" in self.error_log_text():
            raise _PortTakenError(f"port {self.port} is taken")
        if not (self.workdir / "nginx.pid").exists():
            return False
        # Whoever accepts on the port must be this nginx, not a process that took the port.
        try:
            server = http_request(Listen(port=self.port), "/", timeout=1.0).header("server")
        except OSError:
            return False
        return server is not None and server.startswith("nginx")

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop(signal.SIGTERM)
            self._process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def error_log_text(self) -> str:
        return _read_if_exists(self.error_log)

    def access_log_text(self) -> str:
        return _read_if_exists(self.access_log)

    def all_output(self) -> str:
        """nginx's logs and whatever it wrote to stdout and stderr."""
        captured = self._process.output() if self._process else ""
        return f"{self.error_log_text()}\n{self.access_log_text()}\n{captured}"


class _PortTakenError(StackError):
    """nginx could not bind the port picked for it."""


def _read_if_exists(path: Path) -> str:
    return path.read_text(errors="backslashreplace") if path.exists() else ""


def _nginx_user() -> str:
    """A `user` line for a root master (workers run as us, so they reach authd's private socket)."""
    if os.geteuid() != 0:
        return ""  # nginx ignores `user` unless it runs as root, and warns about it
    return f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"


_NGINX_CONF = """\
{user}
daemon off;
worker_processes 1;
master_process on;
pid {pid};
lock_file {lock};
error_log {error_log} info;

events {{
    worker_connections 256;
}}

http {{
    access_log {access_log};
    default_type application/octet-stream;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;

    # Generated by `authd nginx-snippet --context http` for this authd's listen address.
{authd_http}
    server {{
        listen 127.0.0.1:{port};
        server_name localhost;

        include {server_snippet};

{locations}
        location / {{
            return 404;
        }}
    }}
}}
"""


# --- the whole stack ------------------------------------------------------------------------------


@dataclass
class Stack:
    """authd, the upstream application and nginx in front of both, all running."""

    workdir: Path
    config: Path
    authd: Authd
    upstream: Upstream
    nginx: Nginx

    @property
    def url(self) -> str:
        return self.nginx.url


@contextlib.contextmanager
def running_stack(  # noqa: PLR0913 - as Authd, plus nginx's locations
    workdir: Path,
    config: Path,
    *,
    extra_locations: Callable[[str], Sequence[str]] | None = None,
    wait_ready: bool = True,
    activated: bool = False,
    env: Mapping[str, str] | None = None,
    microcache: bool = False,
) -> Iterator[Stack]:
    """Start authd, the upstream and nginx; stop them all on exit, in reverse order.

    With `microcache`, nginx runs the micro-cache snippets (authd needs nginx_cache_seconds).

    nginx gets one protected location `/<policy>/` per policy of `config`, proxying to the upstream
    (with the shipped location snippet, or for a policy with custom headers, `CUSTOM_HEADER_KEYS`,
    the rendered one), plus
    the `location` blocks that `extra_locations(upstream_url)` returns (see
    `protected_location`).
    """
    policies = tomllib.loads(config.read_text()).get("policies", {})
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(Upstream())
        authd = stack.enter_context(
            Authd(config, wait_ready=wait_ready, activated=activated, env=env),
        )
        rendered = workdir / RENDERED_LOCATION_SNIPPET
        locations = [
            protected_location(
                f"/{name}/",
                name,
                upstream.base_url,
                snippet=rendered
                if any(settings.get(key) for key in CUSTOM_HEADER_KEYS)
                else SHIPPED_LOCATION_SNIPPET,
            )
            for name, settings in policies.items()
        ]
        if extra_locations is not None:
            locations += extra_locations(upstream.base_url)
        nginx = stack.enter_context(
            Nginx(workdir, authd_config=config, locations=locations, microcache=microcache),
        )
        yield Stack(workdir=workdir, config=config, authd=authd, upstream=upstream, nginx=nginx)


@contextlib.contextmanager
def temporary_workdir(prefix: str = "authd-stack-") -> Iterator[Path]:
    """A private temporary directory, removed on exit."""
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        yield Path(name)


# --- drills: a clock a test moves, load, measurements ---------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` in Prometheus text whose labels include `labels`
    (0 when there is none): with every label given, the one sample's value."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith((name + "{", name + " ")):
            continue
        sample, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="([^"]*)"', sample))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def rss_bytes(pid: int) -> int:
    """The resident set size of a process (VmRSS in /proc/PID/status), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise StackError(f"no VmRSS for pid {pid}")


def libfaketime() -> Path:
    """libfaketime's preload library (Debian's `faketime` package; `make deps` installs it)."""
    for pattern in ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib*/faketime/libfaketime.so.1"):
        found = sorted(Path("/").glob(pattern.lstrip("/")))
        if found:
            return found[0]
    raise StackError("libfaketime is missing: run `make deps` (Debian package faketime)")


class FakeTime:
    """A clock a test moves for one process: libfaketime, preloaded through `env`, reads an
    offset from true time out of a file on every clock call (`FAKETIME_NO_CACHE`).

    With `monotonic=False` only the wall clock moves (token times); with `monotonic=True`
    the monotonic clock moves by the same offset, which is time passing for everything that
    ages (key set staleness, refresh schedules, cooldowns): only ever move it forward.
    Offsets are whole seconds. Only the process started with `env` is affected.
    """

    def __init__(self, directory: Path, *, monotonic: bool) -> None:
        self.path = directory / "faketime.offset"
        self.monotonic = monotonic
        self.offset = 0
        self._write()

    @property
    def env(self) -> dict[str, str]:
        env = {
            "LD_PRELOAD": str(libfaketime()),
            "FAKETIME_TIMESTAMP_FILE": str(self.path),
            "FAKETIME_NO_CACHE": "1",
        }
        if not self.monotonic:
            env |= {"FAKETIME_DONT_FAKE_MONOTONIC": "1", "DONT_FAKE_MONOTONIC": "1"}
        return env

    def set(self, offset: int) -> None:
        """The process's clock is now `offset` seconds ahead of true time (behind if < 0)."""
        if self.monotonic and offset < self.offset:
            raise ValueError("the monotonic clock only moves forward")
        self.offset = offset
        self._write()

    def advance(self, seconds: int) -> None:
        self.set(self.offset + seconds)

    def _write(self) -> None:
        # Atomically: libfaketime reads the file on every clock call and must never see it
        # half written.
        new = self.path.with_suffix(".new")
        new.write_text(f"{self.offset:+d}\n")
        new.replace(self.path)


@dataclass(frozen=True)
class Sent:
    """One request of a `ClientLoad`: whether its token was valid, and what the client saw."""

    path: str
    valid: bool
    status: int | None  # None: no HTTP answer at all (`error` says why)
    error: str | None = None


class ClientLoad:
    """Threads that send requests through nginx without pause until stopped, alternating a
    valid and an invalid token (only the valid one if `invalid_token` is None), each to a fresh
    path under `location`, and record every answer.

    A context manager: the threads start on entry and stop on exit (or `stop()`).
    """

    def __init__(  # noqa: PLR0913 - what the load is made of
        self,
        port: int,
        *,
        valid_token: str,
        invalid_token: str | None,
        location: str = "/wiki/",
        threads: int = 4,
        timeout: float = 15.0,
    ) -> None:
        self.port = port
        self.tokens = {True: valid_token, False: invalid_token or valid_token}
        self.alternate = invalid_token is not None
        self.location = location
        self.threads = threads
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sent: list[Sent] = []
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), name=f"load-{n}", daemon=True)
            for n in range(threads)
        ]

    def _run(self, n: int) -> None:
        conn: http.client.HTTPConnection | None = None
        count = 0
        while not self._stopping.is_set():
            valid = not self.alternate or count % 2 == 0
            path = f"{self.location}load-{n}-{count}-{'valid' if valid else 'invalid'}"
            count += 1
            if conn is None:
                conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=self.timeout)
            try:
                conn.request("GET", path, headers={"Cf-Access-Jwt-Assertion": self.tokens[valid]})
                response = conn.getresponse()
                response.read()
                sent = Sent(path, valid, response.status)
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as ex:
                sent = Sent(path, valid, None, f"{type(ex).__name__}: {ex}")
                conn.close()
                conn = None
            with self._lock:
                self._sent.append(sent)
        if conn is not None:
            conn.close()

    def sent(self) -> list[Sent]:
        with self._lock:
            return list(self._sent)

    def count(self) -> int:
        with self._lock:
            return len(self._sent)

    def wait_for_more(self, n: int, *, timeout: float = 30.0) -> None:
        """Wait until `n` more requests than now have been answered (or failed)."""
        target = self.count() + n
        wait_for(lambda: self.count() >= target, what=f"{n} more requests", timeout=timeout)

    def start(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Sent]:
        self._stopping.set()
        for thread in self._threads:
            thread.join(self.timeout + STOP_TIMEOUT)
        return self.sent()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# wrk's script: every request carries `header.payload.signature` of a real token with the
# header swapped for one naming a random kid (base64url in Lua), and every answer's status
# is counted; `done` prints the counts of all threads as one JSON line.
_RANDOM_KID_LUA = """\
local header_prefix, header_suffix = '{"alg":"RS256","kid":"', '","typ":"JWT"}'
local rest = "%(rest)s"
local alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'
local threads, counter = {}, 0

local function b64url(s)
  local out = {}
  for i = 1, #s, 3 do
    local x, y, z = s:byte(i, i + 2)
    local n = x * 65536 + (y or 0) * 256 + (z or 0)
    local chars = (z and 4) or (y and 3) or 2
    for j = 1, chars do
      local index = math.floor(n / 2 ^ (6 * (4 - j))) %% 64
      out[#out + 1] = alphabet:sub(index + 1, index + 1)
    end
  end
  return table.concat(out)
end

function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(os.time() * 100 + id)
  statuses = {}
end

function request()
  local kid = {}
  for i = 1, 8 do kid[i] = string.format("%%04x", math.random(0, 65535)) end
  local token = b64url(header_prefix .. table.concat(kid) .. header_suffix) .. "." .. rest
  return wrk.format("GET", "%(path)s", {["Cf-Access-Jwt-Assertion"] = token})
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do total[status] = (total[status] or 0) + n end
  end
  local parts = {}
  for status, n in pairs(total) do parts[#parts + 1] = string.format('"%%s": %%d', status, n) end
  io.write("STATUSES {" .. table.concat(parts, ", ") .. "}\\n")
end
"""


def wrk_flood(  # noqa: PLR0913 - wrk's knobs
    url: str,
    path: str,
    token: str,
    *,
    workdir: Path,
    seconds: int,
    connections: int = 16,
    threads: int = 2,
) -> dict[int, int]:
    """Flood `url` + `path` with wrk for `seconds`: every request `token`'s payload and
    signature under a header with a random kid. Returns how many answers had each status."""
    header, _, rest = token.partition(".")
    if not header or not rest:
        raise ValueError("not a JWS compact token")
    script = workdir / "random-kid.lua"
    script.write_text(_RANDOM_KID_LUA % {"rest": rest, "path": path})
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "-s", script]
    output = _run([*argv, url], what="wrk", timeout=seconds + 60)
    for line in output.splitlines():
        if line.startswith("STATUSES "):
            return {int(k): v for k, v in json.loads(line.removeprefix("STATUSES ")).items()}
    raise StackError(f"wrk printed no status counts:\n{output}")
