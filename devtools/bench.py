"""`make bench`: authd's speed through real nginx, as ratios to a zero-cost auth server measured
in the same run.

    .venv/bin/python devtools/bench.py                     # 3 rounds of 10 s runs: ~5 minutes
    .venv/bin/python devtools/bench.py --smoke             # a minute; measures nothing (CI)
    make bench BENCH_ARGS="--rounds 5 --json bench.json"

Not part of `make test` (tests/e2e/test_bench.py runs --smoke). Needs nginx and wrk (`make deps`);
run as root or as a user nginx can run as. Everything stays on this machine: loopback and unix
sockets in a temporary directory, every process stopped on exit (Ctrl-C and failures included).

The stack: wrk (Debian's 4.1, a generated Lua script) -> the front nginx on 127.0.0.1, whose
protected location `/bench/` is written as the README tells operators (`set $authd_policy bench;
include authd-location.conf;`) with the http, server and location snippets `authd nginx-snippet`
renders for each row's configuration; it proxies to an app server block of the same nginx (on a
unix socket, `return 200 "ok"`). The auth subrequests go, through the snippets' `upstream authd`
(keepalive 64), over a unix socket to:

  baseline    a second nginx whose only job is `return 200;` (empty body): an auth server that
              costs nothing. Same front nginx, same snippets; only the socket's owner differs.
  asgi_floor  uvicorn, set up as authd sets it up (authd.server.UVICORN_SETTINGS), serving an
              ASGI app that answers 200 at once (devtools/asgi_floor.py): the most any Python
              auth server on uvicorn can reach here, since authd's own work only adds to it.
  warm        authd with its defaults (decision cache on, audit lines to a file, metrics), 8
              valid tokens of 8 users cycled: after the warm-up every decision is a cache hit.
  cold        the same authd, restarted (empty cache) before the run, every request a distinct
              valid RS256 token from a pool minted beforehand (--cold-tokens): a full signature
              check per request. No token is sent twice: a wrk thread whose share of the pool runs
              out stops (the row is then flagged: its req/s understates authd); and authd's
              /metrics must show no cache hit during the run.
  cache_off   warm's 8 tokens, [cache] enabled = false: a full verification per request.
  microcache  warm's 8 tokens, authd with nginx_cache_seconds = 30 and the front nginx with the
              http-microcache and server-microcache snippets: nginx reuses allows itself.

Every run starts its stack afresh (authd, the zero-cost server, the front nginx), sends warm's
tokens for --warmup seconds (this also fills the caches), waits until authd's decision count stops
moving, then measures for --duration seconds with wrk -t/-c (--threads, --connections). The rows
are interleaved: round 1 runs baseline, warm, cold, cache_off, microcache, round 2 the same, and
so on (--rounds), so that whatever else the machine does spreads over all rows. Every run must
answer every request 200 with no socket error (wrk's connect/read/write/timeout errors), the
warm-up too; anything else fails the benchmark (exit status 1).

Also measured:

- added latency at 1 connection: wrk -t1 -c1 for baseline, asgi_floor and warm, one run each:
  p50 and p99, and authd's p50 minus the baseline's, which is what one request waits for authd
  when the machine is otherwise idle (asgi_floor's shows how much of it is uvicorn's);
- memory after --rss-decisions (100000) distinct cached decisions: sent straight to authd's
  socket (no nginx) on 8 connections; each worker's VmRSS and RssAnon (/proc/PID/status), right
  after start and after the decisions, and the authd_decision_cache_entries gauge (the sum over
  workers: each worker has its own cache, and holds the tokens of the connections it accepted,
  rarely an even share). So the figure that compares is the growth of RssAnon, summed over the
  workers, per cached decision;
- start to ready: seconds from spawning `authd serve` until GET /readyz answers 200 (keys from a
  local file), the median over every authd start of the benchmark;
- authd CPU per request: utime + stime (/proc/PID/stat) of authd's processes (the supervisor and
  its workers) over a measured run, divided by that run's requests.

How to read it: on one box, nginx, wrk and authd share the CPUs, so absolute numbers say as much
about the box as about authd. The ratio to the baseline of the same round is the figure to
compare between runs and machines: 1.0 is an auth server that costs nothing, 0.5 means the stack
serves half the requests it could. Micro-cache mode may pass 1.0: a hit spares nginx the
subrequest itself, which even the zero-cost server costs. Each row's figures are the medians over
the rounds; the JSON (--json) has every round. A spread between rounds of more than a few percent
means the machine was busy with something else: run again, or more rounds. The p99 of a
saturated run is mostly queueing (--connections requests in flight); the 1-connection latencies
are the per-request cost. authd's CPU per request depends least on what shares the box: a
million divided by it is roughly what authd could answer per second on a core of its own.

Output: the table on standard output (per row: req/s, p50, p99, the ratio to the baseline,
authd's CPU per request), then the other measurements; progress on standard error; with --json
PATH, all of it as JSON too, every round's runs included (statuses, socket errors, tokens).
Exit status: 0 when every run was correct; 1 when one was not (an answer other than 2xx, a socket
error, a cold run with a cache hit or with more requests than tokens), and the output says which;
2 when the stack could not run (a process that did not start, wrk failing); 130 on Ctrl-C.

Connections and threads: on a 2-core box (nproc 2), the baseline reached 20400 req/s with
-t1 -c32 and 1 front nginx worker, 19900 with -t1 -c16, 19100 with -t1 -c32 and 2 nginx workers,
17900 with -t2 -c64 and 1 worker, 13700 with -t2 -c64 and 2 workers (5 s runs, 2 rounds each):
hence the defaults, -t1 -c32 and --nginx-workers 1. A second wrk thread or nginx worker only
competes for the same 2 cores. The zero-cost server runs 1 worker. authd runs its own default
(workers = "auto": one per CPU) unless --workers says otherwise. Everything else is the snippets
as shipped, keepalive 64 to the auth server included.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Self

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from authd import dev, snippets
from devtools.soak import lua_string, run_wrk_script
from devtools.stack import (
    DEFAULT_ISSUER,
    NGINX_BIN,
    WIKI_AUD,
    Authd,
    DevKey,
    Listen,
    Nginx,
    StackError,
    _indent,
    _nginx_user,
    _Process,
    authd_executable,
    make_config,
    protected_location,
    temporary_workdir,
    wait_for,
)

POLICY = "bench"
POLICIES = {POLICY: {"audience": [WIKI_AUD], "allow_email_domains": ["example.com"]}}
PROTECTED = "/bench/"
# What a wrk thread sends once its share of the token pool is used up, as it stops: the front
# nginx answers it without authd (and wrk never reads the answer).
SPARE = "/_bench_spare"
WARM_USERS = 8
TOKEN_TTL = 4 * 3600  # outlives any run
FILL_CLIENTS = 8  # connections: the kernel shares them among the workers, unevenly
MICROCACHE_SECONDS = 30
MIB = 1024 * 1024


class BenchError(RuntimeError):
    """A run answered something other than 200, had socket errors, or broke a rule."""


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- what is measured -------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the table: who answers the auth subrequests, with which tokens."""

    name: str
    description: str
    authd: bool = True
    floor: bool = False  # uvicorn serving an ASGI app that does nothing (devtools/asgi_floor.py)
    cold: bool = False  # every request a new token (else warm's few, cycled)
    cache: bool = True  # authd's [cache] enabled
    nginx_cache_seconds: int = 0  # > 0: micro-cache mode, in authd and in the front nginx


BASELINE = Row("baseline", "zero-cost auth server: nginx `return 200;`", authd=False)
FLOOR = Row("asgi_floor", "uvicorn as authd runs it, an app doing nothing", authd=False, floor=True)
WARM = Row("warm", f"authd, {WARM_USERS} tokens cycled, decision cache on (the defaults)")
ROWS = (
    BASELINE,
    FLOOR,
    WARM,
    Row("cold", "authd restarted, every request a new token (RS256 check each)", cold=True),
    Row("cache_off", f"authd, {WARM_USERS} tokens cycled, [cache] enabled = false", cache=False),
    Row(
        "microcache",
        f"authd + nginx micro-cache, nginx_cache_seconds = {MICROCACHE_SECONDS}",
        nginx_cache_seconds=MICROCACHE_SECONDS,
    ),
)


@dataclass(frozen=True)
class Shape:
    """wrk's -t and -c."""

    threads: int
    connections: int

    def __str__(self) -> str:
        return f"-t{self.threads} -c{self.connections}"


# --- tokens -----------------------------------------------------------------------------------

_signing_key: Any = None  # each minting process's own copy, loaded once


def _load_signing_key(pem: Path) -> None:
    global _signing_key  # noqa: PLW0603 - per-process state of a multiprocessing pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _signing_key = dev.load_private_key(pem)


def _mint(email: str, now: float) -> str:
    """A token shaped as `authd dev mint` makes it, for our issuer and audience."""
    claims = dev.claims(now=now, iss=DEFAULT_ISSUER, aud=[WIKI_AUD], email=email, ttl=TOKEN_TTL)
    return dev.mint(_signing_key, claims)


def mint_tokens(key: DevKey, emails: Sequence[str]) -> list[str]:
    """One token per email (each distinct: `identity_nonce`), signed on every CPU."""
    processes = len(os.sched_getaffinity(0))
    with multiprocessing.Pool(processes, _load_signing_key, (key.private_pem_path,)) as pool:
        return pool.map(functools.partial(_mint, now=time.time()), emails, chunksize=500)


@dataclass(frozen=True)
class Load:
    """What wrk sends: thread N reads `<prefix>-N.txt`, one token a line, and either cycles
    through them or sends each once (the threads' files then share the pool out)."""

    prefix: Path
    cycle: bool
    distinct: int

    @classmethod
    def write(cls, prefix: Path, tokens: Sequence[str], threads: int, *, cycle: bool) -> Load:
        for n in range(threads):
            # Cycled, each thread has every token, starting at a different one.
            mine = [*tokens[n:], *tokens[:n]] if cycle else tokens[n::threads]
            prefix.with_name(f"{prefix.name}-{n + 1}.txt").write_text("\n".join(mine) + "\n")
        return cls(prefix, cycle, len(tokens))


# --- wrk --------------------------------------------------------------------------------------

# Thread stats are flat, as in soak.py (wrk 4.1's thread:get crashes on nested tables), and keyed
# "kind|<kind>|<status>" so that soak's WrkResult reads the status counts.
KIND = "bench"
LUA = r"""
-- Generated by devtools/bench.py: tokens from this thread's file, every answer's status counted.
local TOKENS = "@TOKENS@"  -- thread N reads TOKENS .. "-" .. N .. ".txt"
local CYCLE = @CYCLE@      -- false: each token once, then the thread stops
local PATH, SPARE, OUT = "@PATH@", "@SPARE@", "@OUT@"

local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("id", #threads)
end

stats = { taken = 0, exhausted = 0 }
local tokens, keys = {}, {}

function init(args)
  for line in io.lines(TOKENS .. "-" .. id .. ".txt") do tokens[#tokens + 1] = line end
end

function request()
  if not CYCLE and stats.taken >= #tokens then
    -- wrk sends what this returns, but the stopped thread never reads the answer.
    stats.exhausted = 1
    wrk.thread:stop()
    return wrk.format("GET", SPARE)
  end
  stats.taken = stats.taken + 1
  local token = tokens[(stats.taken - 1) % #tokens + 1]
  return wrk.format("GET", PATH, { ["Cf-Access-Jwt-Assertion"] = token })
end

function response(status, headers, body)
  local key = keys[status]
  if key == nil then
    key = "kind|@KIND@|" .. status
    keys[status] = key
  end
  stats[key] = (stats[key] or 0) + 1
end

function done(summary, latency, requests)
  local parts = {}
  for _, thread in ipairs(threads) do
    local fields = {}
    for key, value in pairs(thread:get("stats")) do
      fields[#fields + 1] = string.format('"%s": %d', key, value)
    end
    parts[#parts + 1] = "{" .. table.concat(fields, ", ") .. "}"
  end
  local e = summary.errors
  local file = assert(io.open(OUT, "w"))
  file:write(string.format(
    '{"requests": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, '
      .. '"status": %d, "timeout": %d}, "latency_us": {"p50": %d, "p99": %d, "max": %d, '
      .. '"mean": %.3f}, "threads": [%s]}',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, latency.mean,
    table.concat(parts, ", ")))
  file:close()
end
"""


@dataclass(frozen=True)
class Run:
    """One wrk run of one row, and what authd spent on it."""

    row: str
    shape: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    statuses: dict[int, int]
    socket_errors: dict[str, int]
    distinct_tokens: int
    each_token_once: bool
    tokens_taken: int  # by the script's threads: at least the requests answered
    pool_exhausted: bool
    authd_cpu_us_per_request: float | None = None
    cache_hits: int | None = None  # authd's allows from its decision cache during the run

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def non_2xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if not 200 <= status < 300)

    def problems(self) -> list[str]:
        found = []
        if self.requests == 0:
            found.append("no request was answered")
        if self.non_2xx:
            found.append(f"{self.non_2xx} answers were not 2xx: {self.statuses}")
        if any(self.socket_errors.values()):
            found.append(f"socket errors: {self.socket_errors}")
        if self.each_token_once and self.requests > self.distinct_tokens:
            found.append(f"{self.requests} requests for a pool of {self.distinct_tokens} tokens")
        if self.each_token_once and self.cache_hits:
            found.append(f"every token new, yet {self.cache_hits} decisions were cache hits")
        return found

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "requests_per_s": self.rate, "non_2xx": self.non_2xx}


def run_wrk(  # noqa: PLR0913 - where, what and how
    workdir: Path, url: str, *, row: str, load: Load, shape: Shape, seconds: int
) -> Run:
    script, out = workdir / "bench.lua", workdir / "wrk.json"
    out.unlink(missing_ok=True)
    script.write_text(
        LUA.replace("@TOKENS@", lua_string(str(load.prefix)))
        .replace("@CYCLE@", "true" if load.cycle else "false")
        .replace("@PATH@", PROTECTED)
        .replace("@SPARE@", SPARE)
        .replace("@OUT@", lua_string(str(out)))
        .replace("@KIND@", KIND)
    )
    result = run_wrk_script(
        script,
        out,
        url,
        threads=shape.threads,
        connections=shape.connections,
        seconds=seconds,
        extra=("--latency",),
    )
    raw = json.loads(out.read_text())
    return Run(
        row=row,
        shape=str(shape),
        requests=result.requests,
        seconds=result.seconds,
        p50_ms=result.latency_us["p50"] / 1000,
        p99_ms=result.latency_us["p99"] / 1000,
        statuses=dict(result.kinds.get(KIND, {})),
        socket_errors={k: v for k, v in result.errors.items() if k != "status"},
        distinct_tokens=load.distinct,
        each_token_once=not load.cycle,
        tokens_taken=sum(int(t["taken"]) for t in raw["threads"]),
        pool_exhausted=any(int(t["exhausted"]) for t in raw["threads"]),
    )


# --- nginx ------------------------------------------------------------------------------------

_NGINX_CONF = """\
{user}
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 8192;
pid {workdir}/nginx.pid;
lock_file {workdir}/nginx.lock;
error_log {error_log} warn;

events {{
    worker_connections 4096;
}}

http {{
    default_type application/octet-stream;
    client_body_temp_path {workdir}/nginx-temp/client_body;
    proxy_temp_path {workdir}/nginx-temp/proxy;
    fastcgi_temp_path {workdir}/nginx-temp/fastcgi;
    uwsgi_temp_path {workdir}/nginx-temp/uwsgi;
    scgi_temp_path {workdir}/nginx-temp/scgi;

{http}
}}
"""

_ZERO_COST_HTTP = """\
access_log off;
server {{
    listen unix:{socket};
    listen 127.0.0.1:{port};  # where stack.Nginx checks that it is up
    location / {{
        return 200;
    }}
}}
"""

_FRONT_HTTP = """\
{access_log}
include {workdir}/{http_snippet};
{microcache_include}
upstream bench_app {{
    server unix:{app_socket};
    keepalive 64;
}}

server {{
    listen 127.0.0.1:{port};
    include {workdir}/{server_snippet};

{locations}
    location = {spare} {{
        return 204;
    }}
    location / {{
        return 404;
    }}
}}

# The protected application: nothing but an answer.
server {{
    listen unix:{app_socket};
    access_log off;
    location / {{
        return 200 "ok";
    }}
}}
"""


class _BenchNginx(Nginx):
    """stack.Nginx (start, readiness, port retries, stop) with an nginx.conf of our own, whose
    http context is `http_block()`."""

    def __init__(
        self,
        workdir: Path,
        *,
        authd_config: Path,
        workers: int,
        locations: Sequence[str] = (),
        microcache: bool = False,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(
            workdir, authd_config=authd_config, locations=locations, microcache=microcache
        )
        self.workers = workers

    def http_block(self) -> str:
        raise NotImplementedError

    def render(self) -> str:
        return _NGINX_CONF.format(
            user=_nginx_user(),
            workers=self.workers,
            workdir=self.workdir,
            error_log=self.error_log,
            http=_indent(self.http_block(), 4),
        )


class ZeroCostAuth(_BenchNginx):
    """The baseline's auth server: `return 200;` on the socket `authd_config` says authd is on."""

    def http_block(self) -> str:
        listen = Listen.parse(tomllib.loads(self.authd_config.read_text())["listen"])
        return _ZERO_COST_HTTP.format(socket=listen.unix_path, port=self.port)


class AsgiFloor:
    """devtools/asgi_floor.py on the socket `authd_config` names: what uvicorn costs by itself."""

    def __init__(self, authd_config: Path) -> None:
        self.listen = Listen.parse(tomllib.loads(authd_config.read_text())["listen"])
        self._process: _Process | None = None

    def __enter__(self) -> Self:
        assert self.listen.unix_path is not None
        self.listen.unix_path.unlink(missing_ok=True)
        script = Path(__file__).resolve().parent / "asgi_floor.py"
        self._process = _Process([sys.executable, script, self.listen.unix_path], name="floor")
        wait_for(self.listen.accepts, what="the ASGI floor's socket")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None


class FrontNginx(_BenchNginx):
    """The nginx wrk talks to: `/bench/` protected by the snippets `authd nginx-snippet` renders
    for `row`'s configuration, proxying to the app server block of the same nginx."""

    def __init__(self, workdir: Path, *, row: Row, authd_config: Path, workers: int) -> None:
        # Keepalive to the app as to authd; the location snippet's proxy_set_header lines stay.
        keepalive = 'proxy_http_version 1.1;\nproxy_set_header Connection "";'
        protected = protected_location(
            PROTECTED,
            POLICY,
            "http://bench_app",
            snippet=workdir / snippets.file_name("location"),
            extra=keepalive,
        )
        super().__init__(
            workdir,
            authd_config=authd_config,
            workers=workers,
            locations=[protected],
            microcache=row.nginx_cache_seconds > 0,
        )

    @functools.cached_property
    def snippet_files(self) -> dict[str, str]:
        """This row's snippets, rendered once into files in the workdir: context -> file name."""
        contexts: list[snippets.Context] = ["http", "location"]
        contexts += ["http-microcache", "server-microcache"] if self.microcache else ["server"]
        files: dict[str, str] = {}
        for context in contexts:
            text = self._snippet(context)
            if context == "http-microcache":
                text = self._localised(text)
            files[context] = snippets.file_name(context)
            (self.workdir / files[context]).write_text(text)
        return files

    def _localised(self, text: str) -> str:
        """The micro-cache snippet with its cache and log in the workdir, not /run and /var/log."""
        moves = {
            snippets.MICROCACHE_PATH: self.microcache_dir,
            snippets.MICROCACHE_LOG: self.microcache_log,
        }
        for shipped, ours in moves.items():
            if shipped not in text:
                raise StackError(f"the http-microcache snippet no longer names {shipped}")
            text = text.replace(shipped, str(ours))
        return text

    def http_block(self) -> str:
        files = self.snippet_files
        microcache = files.get("http-microcache")
        return _FRONT_HTTP.format(
            # The micro-cache snippet has an access_log at the http level, which `off` there would
            # cancel: only the app server block turns its own off.
            access_log="" if microcache else "access_log off;",
            workdir=self.workdir,
            http_snippet=files["http"],
            microcache_include=f"include {self.workdir}/{microcache};" if microcache else "",
            app_socket=self.workdir / "app.sock",
            port=self.port,
            server_snippet=files.get("server-microcache") or files["server"],
            locations=_indent("\n".join(self.locations), 4),
            spare=SPARE,
        )

    def start(self) -> Self:
        # Every run starts with an empty micro-cache and access log.
        shutil.rmtree(self.microcache_dir, ignore_errors=True)
        self.microcache_log.unlink(missing_ok=True)
        return super().start()


# --- authd ------------------------------------------------------------------------------------


def write_config(directory: Path, key: DevKey, row: Row, workers: int | None) -> Path:
    return make_config(
        directory,
        jwks_file=key.jwks_path,
        policies=POLICIES,
        listen=f"unix:{directory / row.name}.sock",
        workers=workers or "auto",
        audit_file=audit_file(directory, row),
        nginx_cache_seconds=row.nginx_cache_seconds,
        cache=None if row.cache else {"enabled": False},
        name=f"{row.name}.toml",
    )


def audit_file(directory: Path, row: Row) -> Path:
    return directory / f"{row.name}-audit.log"


def authd_pids(authd: Authd) -> list[int]:
    """The processes that serve: the workers, or the one process when it has none."""
    return authd.worker_pids() or [authd.pid]


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of these processes so far (/proc/PID/stat, fields 14 and 15)."""
    ticks = 0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def resident(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon of a process, in bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in {"VmRSS", "RssAnon"}:
            found[name] = int(value.split()[0]) * 1024
    return found


@dataclass(frozen=True)
class Usage:
    """What authd has spent so far: CPU seconds of all its processes, and cache hits."""

    cpu: float
    cache_hits: float

    @classmethod
    def read(cls, authd: Authd) -> Usage:
        hits = authd.metric("authd_allows_total", source="cache")
        return cls(cpu_seconds([authd.pid, *authd.worker_pids()]), hits)

    def charge(self, run: Run, *, since: Usage) -> Run:
        """`run`, with what authd spent between `since` and this reading."""
        return replace(
            run,
            authd_cpu_us_per_request=(self.cpu - since.cpu) * 1e6 / max(run.requests, 1),
            cache_hits=round(self.cache_hits - since.cache_hits),
        )


def steady(read: Callable[[], float], *, what: str, interval: float) -> float:
    """Poll `read` every `interval` seconds until it gives the same value twice; return it."""
    seen: list[float] = []

    def repeated() -> tuple[float] | None:
        seen.append(read())
        return (seen[-1],) if len(seen) > 1 and seen[-2] == seen[-1] else None

    return wait_for(repeated, what=what, interval=interval)[0]


def settle(authd: Authd) -> None:
    """Wait until authd's decision count stops moving: the last requests of a run, which wrk
    stopped waiting for, are done and not charged to the next."""
    steady(lambda: authd.metric("authd_decisions_total"), what="authd to go quiet", interval=0.2)


def send_directly(listen: Listen, tokens: Sequence[str]) -> list[int]:
    """Ask authd for `tokens` one by one on one keepalive connection; the statuses not 200."""
    refused = []
    connection = listen.connection(timeout=30)
    try:
        for token in tokens:
            connection.request("GET", f"/auth/{POLICY}", headers={"Cf-Access-Jwt-Assertion": token})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                refused.append(response.status)
    finally:
        connection.close()
    return refused


# --- the benchmark ----------------------------------------------------------------------------


@dataclass
class Bench:
    """Every row's configuration and front nginx, the token loads, and authd's start times."""

    args: argparse.Namespace
    workdir: Path
    configs: dict[str, Path]
    fronts: dict[str, FrontNginx]
    zero_cost: ZeroCostAuth
    warm: Load
    cold: Load
    pool: list[str]  # the cold tokens; the memory measurement takes its own from them
    starts: list[float] = field(default_factory=list)  # authd's start-to-ready, in seconds
    workers: set[int] = field(default_factory=set)  # authd's serving processes, as seen

    @property
    def shape(self) -> Shape:
        return Shape(self.args.threads, self.args.connections)

    @contextlib.contextmanager
    def authd(self, row: Row) -> Iterator[Authd]:
        """authd with `row`'s configuration, timed from spawn to ready; stopped on exit."""
        config = self.configs[row.name]
        audit_file(config.parent, row).unlink(missing_ok=True)  # only the last run's lines
        began = time.monotonic()
        with Authd(config) as authd:
            self.starts.append(time.monotonic() - began)
            self.workers.add(len(authd_pids(authd)))
            yield authd

    @contextlib.contextmanager
    def serving(self, row: Row) -> Iterator[Authd | None]:
        """`row`'s auth server (authd, or the zero-cost one) and front nginx, started afresh."""
        with contextlib.ExitStack() as stack:
            authd = stack.enter_context(self.authd(row)) if row.authd else None
            if row.floor:
                stack.enter_context(AsgiFloor(self.configs[row.name]))
            elif authd is None:
                stack.enter_context(self.zero_cost)
            stack.enter_context(self.fronts[row.name])
            yield authd

    def wrk(self, row: Row, load: Load, shape: Shape, seconds: int) -> Run:
        url = self.fronts[row.name].url
        return run_wrk(self.workdir, url, row=row.name, load=load, shape=shape, seconds=seconds)

    def check(self, run: Run) -> Run:
        problems = run.problems()
        if problems:
            log = self.fronts[run.row].error_log_text().splitlines()[-20:]
            raise BenchError(
                f"{run.row} ({run.shape}): {'; '.join(problems)}\n"
                "--- the front nginx's error log, last lines ---\n" + "\n".join(log)
            )
        return run

    def measure(self, row: Row, shape: Shape, seconds: int) -> Run:
        """One run of `row` on a fresh stack, after the warm-up, checked."""
        load = self.cold if row.cold else self.warm
        with self.serving(row) as authd:
            if self.args.warmup:
                self.check(self.wrk(row, self.warm, shape, self.args.warmup))
            if authd is None:
                return self.check(self.wrk(row, load, shape, seconds))
            settle(authd)
            before = Usage.read(authd)
            run = self.wrk(row, load, shape, seconds)
            settle(authd)
            return self.check(Usage.read(authd).charge(run, since=before))


def prepare(workdir: Path, args: argparse.Namespace) -> Bench:
    """Key, tokens, token files, a configuration and a front nginx per row."""
    key = DevKey.create(workdir / "key")
    pool_size = max(args.cold_tokens, args.rss_decisions)
    emails = [f"warm{n}@example.com" for n in range(WARM_USERS)]
    emails += [f"user{n}@example.com" for n in range(pool_size)]
    progress(f"minting {len(emails)} RS256 tokens on {len(os.sched_getaffinity(0))} CPUs")
    began = time.monotonic()
    tokens = mint_tokens(key, emails)
    progress(f"  minted in {time.monotonic() - began:.1f} s")
    warm_tokens, pool = tokens[:WARM_USERS], tokens[WARM_USERS:]
    (workdir / "tokens").mkdir()
    warm = Load.write(workdir / "tokens" / "warm", warm_tokens, args.threads, cycle=True)
    cold = Load.write(
        workdir / "tokens" / "cold", pool[: args.cold_tokens], args.threads, cycle=False
    )
    (workdir / "authd").mkdir()
    configs = {row.name: write_config(workdir / "authd", key, row, args.workers) for row in ROWS}
    fronts = {
        row.name: FrontNginx(
            workdir / f"nginx-{row.name}",
            row=row,
            authd_config=configs[row.name],
            workers=args.nginx_workers,
        )
        for row in ROWS
    }
    # It listens where the baseline's configuration says authd does.
    zero_cost = ZeroCostAuth(workdir / "zero-cost", authd_config=configs[BASELINE.name], workers=1)
    return Bench(args, workdir, configs, fronts, zero_cost, warm, cold, pool)


def run_rounds(bench: Bench) -> list[dict[str, Run]]:
    rounds = []
    for number in range(1, bench.args.rounds + 1):
        runs = {}
        for row in ROWS:
            progress(f"round {number}/{bench.args.rounds}: {row.name}")
            runs[row.name] = run = bench.measure(row, bench.shape, bench.args.duration)
            progress(f"  {describe(run)}, {run.rate / runs[BASELINE.name].rate:.2f} x baseline")
        rounds.append(runs)
    return rounds


def run_latency(bench: Bench) -> dict[str, Run]:
    """Baseline and warm with one connection: what one request waits for, with no queue."""
    runs = {}
    for row in (BASELINE, FLOOR, WARM):
        progress(f"1 connection: {row.name}")
        runs[row.name] = run = bench.measure(row, Shape(1, 1), bench.args.duration)
        progress(f"  {describe(run)}")
    return runs


def describe(run: Run) -> str:
    return f"{run.rate:.0f} req/s, p50 {run.p50_ms:.2f} ms, p99 {run.p99_ms:.2f} ms"


@dataclass(frozen=True)
class Memory:
    """authd's workers after start and after `decisions` distinct allows were cached."""

    decisions: int
    cache_entries: int  # authd_decision_cache_entries: the sum over the workers
    after_start: dict[int, dict[str, int]]  # pid -> VmRSS and RssAnon, in bytes
    after_decisions: dict[int, dict[str, int]]

    @property
    def growth_per_decision(self) -> float:
        """RssAnon gained by all workers together, per cached decision, in bytes."""
        grown = sum(
            after["RssAnon"] - self.after_start[pid]["RssAnon"]
            for pid, after in self.after_decisions.items()
        )
        return grown / max(self.cache_entries, 1)


def measure_memory(bench: Bench) -> Memory:
    tokens = bench.pool[: bench.args.rss_decisions]
    with bench.authd(WARM) as authd:
        pids = authd_pids(authd)
        after_start = {pid: resident(pid) for pid in pids}
        progress(f"memory: {len(tokens)} distinct tokens straight to authd ({len(pids)} workers)")
        shares = [tokens[n::FILL_CLIENTS] for n in range(FILL_CLIENTS)]
        with ThreadPoolExecutor(FILL_CLIENTS) as clients:
            refused = [
                s
                for got in clients.map(functools.partial(send_directly, authd.listen), shares)
                for s in got
            ]
        if refused:
            raise BenchError(f"memory: {len(refused)} tokens were not allowed: {set(refused)}")
        # The gauge is set by each worker's heartbeat (every 2 s): read it until it holds still.
        entries = steady(
            lambda: authd.metric("authd_decision_cache_entries"),
            what="the cache gauge to settle",
            interval=2.5,
        )
        return Memory(
            len(tokens), round(entries), after_start, {pid: resident(pid) for pid in pids}
        )


# --- the report -------------------------------------------------------------------------------


def first_line(argv: Sequence[str | Path]) -> str:
    """The first line a command prints (on either stream): how nginx and wrk tell versions."""
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)
    return (done.stdout + done.stderr).strip().splitlines()[0]


def machine() -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(),
        "nginx": first_line([NGINX_BIN, "-v"]).removeprefix("nginx version: "),
        "wrk": first_line(["wrk", "-v"]).split(" Copyright")[0],
        "python": platform.python_version(),
        "authd": first_line([authd_executable(), "--version"]),
    }


@dataclass(frozen=True)
class Summary:
    """A row's medians over the rounds; `ratio` is to the baseline of the same round."""

    requests_per_s: float
    spread: float  # (max - min) / median of the rounds' req/s: the noise
    p50_ms: float
    p99_ms: float
    ratio: float
    authd_cpu_us_per_request: float | None
    pool_exhausted: bool

    @classmethod
    def of(cls, row: Row, rounds: Sequence[dict[str, Run]]) -> Summary:
        runs = [r[row.name] for r in rounds]
        cpu = [r.authd_cpu_us_per_request for r in runs if r.authd_cpu_us_per_request is not None]
        rates = [r.rate for r in runs]
        return cls(
            requests_per_s=statistics.median(rates),
            spread=(max(rates) - min(rates)) / statistics.median(rates),
            p50_ms=statistics.median(r.p50_ms for r in runs),
            p99_ms=statistics.median(r.p99_ms for r in runs),
            ratio=statistics.median(r[row.name].rate / r[BASELINE.name].rate for r in rounds),
            authd_cpu_us_per_request=statistics.median(cpu) if cpu else None,
            pool_exhausted=any(r.pool_exhausted for r in runs),
        )


@dataclass(frozen=True)
class Report:
    args: argparse.Namespace
    machine: dict[str, Any]
    authd_workers: list[int]
    rounds: list[dict[str, Run]]
    latency: dict[str, Run]
    memory: Memory
    starts: list[float]

    @functools.cached_property
    def summaries(self) -> dict[str, Summary]:
        return {row.name: Summary.of(row, self.rounds) for row in ROWS}

    @property
    def added_p50_ms(self) -> float:
        return self.latency[WARM.name].p50_ms - self.latency[BASELINE.name].p50_ms

    def as_json(self) -> dict[str, Any]:
        return {
            "smoke": self.args.smoke,
            "machine": self.machine,
            "settings": {
                "rounds": self.args.rounds,
                "duration_s": self.args.duration,
                "warmup_s": self.args.warmup,
                "wrk": {"threads": self.args.threads, "connections": self.args.connections},
                "front_nginx_workers": self.args.nginx_workers,
                "zero_cost_nginx_workers": 1,
                "authd_workers": self.authd_workers,
                "cold_token_pool": self.args.cold_tokens,
                "rss_decisions": self.args.rss_decisions,
            },
            "rows": {
                row.name: {
                    "description": row.description,
                    **asdict(self.summaries[row.name]),
                    "rounds": [
                        {**r[row.name].as_json(), "ratio": r[row.name].rate / r[BASELINE.name].rate}
                        for r in self.rounds
                    ],
                }
                for row in ROWS
            },
            "latency_1_connection": {
                **{name: run.as_json() for name, run in self.latency.items()},
                "added_p50_ms": self.added_p50_ms,
            },
            "memory": {
                **asdict(self.memory),
                "rss_anon_growth_per_decision_bytes": self.memory.growth_per_decision,
            },
            "start_to_ready_s": {"median": statistics.median(self.starts), "all": self.starts},
        }


HEADER = (
    f"{'row':<12}{'req/s':>9}{'spread':>8}{'p50 ms':>9}{'p99 ms':>9}{'x baseline':>12}"
    f"{'authd CPU µs/req':>18}"
)


def _ms(value: float) -> str:
    return f"{value:.2f}"


def render(report: Report) -> str:
    a, m = report.args, report.machine
    workers = "/".join(map(str, report.authd_workers))
    out = []
    if a.smoke:
        out += ["SMOKE RUN: checks that the benchmark works; its numbers mean nothing.", ""]
    out.append(
        f"authd through nginx: {a.rounds} round(s) of {a.duration} s per row after "
        f"{a.warmup} s of warm-up, wrk -t{a.threads} -c{a.connections}, front nginx "
        f"{a.nginx_workers} worker(s), authd {workers} worker(s)"
    )
    out.append(
        f"{m['date']}  nproc {m['nproc']}  load average at start {m['load_average'][0]:.2f}  "
        f"{m['nginx']}  {m['wrk']}  Python {m['python']}  {m['authd']}"
    )
    out += ["", HEADER]
    for row in ROWS:
        s = report.summaries[row.name]
        cpu = "-" if s.authd_cpu_us_per_request is None else f"{s.authd_cpu_us_per_request:.0f}"
        flag = " *" if s.pool_exhausted else ""
        out.append(
            f"{row.name:<12}{s.requests_per_s:>9.0f}{s.spread:>8.0%}{_ms(s.p50_ms):>9}"
            f"{_ms(s.p99_ms):>9}{s.ratio:>12.3f}{cpu:>18}{flag}"
        )
    out += [
        "",
        "medians over the rounds; spread: (max - min) / median of the rounds' req/s",
        "x baseline: a row's req/s over the baseline's in the same round",
    ]
    out += [f"  {row.name:<12}{row.description}" for row in ROWS]
    if any(s.pool_exhausted for s in report.summaries.values()):
        out.append(
            f"  * the {a.cold_tokens} cold tokens ran out: wrk threads stopped early, so its "
            "req/s understates authd (--cold-tokens)"
        )
    return "\n".join([*out, "", *render_extras(report)]) + "\n"


def render_extras(report: Report) -> list[str]:
    base, floor, warm = (report.latency[row.name] for row in (BASELINE, FLOOR, WARM))
    mem = report.memory
    starts = report.starts
    out = [
        f"added latency at 1 connection (wrk -t1 -c1, {report.args.duration} s each):",
        f"  baseline    p50 {_ms(base.p50_ms)} ms  p99 {_ms(base.p99_ms)} ms",
        f"  asgi_floor  p50 {_ms(floor.p50_ms)} ms  p99 {_ms(floor.p99_ms)} ms",
        f"  authd warm  p50 {_ms(warm.p50_ms)} ms  p99 {_ms(warm.p99_ms)} ms",
        f"  authd adds  {_ms(report.added_p50_ms)} ms at p50",
    ]
    out.append(
        f"memory after {mem.decisions} distinct cached decisions "
        f"(authd_decision_cache_entries {mem.cache_entries}):"
    )
    for pid, after in mem.after_decisions.items():
        start = mem.after_start[pid]
        out.append(
            f"  worker {pid:<8} VmRSS {after['VmRSS'] / MIB:6.1f} MiB "
            f"(after start {start['VmRSS'] / MIB:.1f})  RssAnon {after['RssAnon'] / MIB:6.1f} MiB "
            f"(after start {start['RssAnon'] / MIB:.1f})"
        )
    out.append(
        f"  RssAnon growth per cached decision, all workers: {mem.growth_per_decision:.0f} bytes"
    )
    out.append(
        f"start to ready: {statistics.median(starts):.2f} s (median of {len(starts)} authd starts, "
        f"{min(starts):.2f} to {max(starts):.2f})"
    )
    return out


# --- the command ------------------------------------------------------------------------------

# Options whose default depends on --smoke: (full run, smoke run).
SIZES = {
    "rounds": (3, 1),
    "duration": (10, 1),
    "warmup": (2, 1),
    "cold_tokens": (100_000, 300),
    "rss_decisions": (100_000, 1_000),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    summary, _, rest = (__doc__ or "").partition("\n\n")
    p = argparse.ArgumentParser(
        prog="devtools/bench.py",
        description=summary,
        epilog=rest,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rounds", type=int, metavar="N", help="rounds of every row (3; smoke 1)")
    p.add_argument(
        "--duration", type=int, metavar="SECONDS", help="seconds of each measured run (10; smoke 1)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        metavar="SECONDS",
        help="seconds of warm-up before each, 0: none (2; smoke 1)",
    )
    p.add_argument("--threads", type=int, metavar="N", default=1, help="wrk threads (1)")
    p.add_argument("--connections", type=int, metavar="N", default=32, help="wrk connections (32)")
    p.add_argument(
        "--nginx-workers",
        type=int,
        metavar="N",
        default=1,
        help="worker_processes of the front nginx (1)",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="authd's workers (default: authd's own, one per CPU)",
    )
    p.add_argument(
        "--cold-tokens",
        type=int,
        metavar="N",
        help="distinct tokens the cold runs may send (100000; smoke 300)",
    )
    p.add_argument(
        "--rss-decisions",
        type=int,
        metavar="N",
        help="distinct decisions cached before memory is read (100000; smoke 1000)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="the whole benchmark in about a minute, to keep it working (CI): no meaningful number",
    )
    p.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="also write everything, every round's numbers, here",
    )
    args = p.parse_args(argv)
    for name, (full, smoke) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    if args.connections < args.threads:
        p.error("--connections must be at least --threads (wrk shares them out)")
    if min(args.rounds, args.duration, args.cold_tokens, args.rss_decisions) < 1:
        p.error("--rounds, --duration, --cold-tokens and --rss-decisions must be positive")
    return args


def benchmark(workdir: Path, args: argparse.Namespace) -> Report:
    host = machine()  # before anything of ours runs: the load average is the machine's own
    bench = prepare(workdir, args)
    rounds = run_rounds(bench)
    latency = run_latency(bench)
    memory = measure_memory(bench)
    return Report(
        args=args,
        machine=host,
        authd_workers=sorted(bench.workers),
        rounds=rounds,
        latency=latency,
        memory=memory,
        starts=bench.starts,
    )


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the context managers: every process is stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        with temporary_workdir("authd-bench-") as workdir:
            report = benchmark(workdir, args)
    except BenchError as ex:
        print(f"bench: FAILED: {ex}", file=sys.stderr)
        return 1
    except (StackError, TimeoutError, subprocess.TimeoutExpired) as ex:
        print(f"bench: could not run: {ex}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    sys.stdout.write(render(report))
    if args.json:
        args.json.write_text(json.dumps(report.as_json(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
