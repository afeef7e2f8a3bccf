"""`make soak`: authd behind nginx at about 80% of its measured capacity for a long time (10
minutes by default) while the key endpoint flaps, with every answer checked.

    .venv/bin/python devtools/soak.py                      # the full soak: 10 minutes
    .venv/bin/python devtools/soak.py --duration 60        # a short run
    make soak SOAK_ARGS="--duration 60 --flap 15"

Not part of CI. Needs nginx and wrk (`make deps`); run as root or as a user nginx can run as.

The stack (devtools/stack.py): a key server (`KeyServer`) serving a dev key, authd (one process,
or `--workers N`) with its audit lines in a file, and nginx with the shipped location snippet
protecting `/soak/` (policy `soak`: example.com users). The protected location proxies to an echo
location of the same nginx that answers `email=<X-Authd-Email as received> policy=<...>`: what the
upstream really got, in the body of every 200. Every request also carries a forged
`X-Authd-Email`, so a snippet that let it through would show in the echo.

Load: wrk (Debian's 4.1, which has no rate option) with a generated Lua script. One request in
`--invalid-every` (10) carries an invalid token, in turn: garbage, alg none, a tampered payload,
an expired token, an unknown kid (one refetch per `--cooldown`), another application's audience,
all 401; and a valid token the policy refuses (403). The others carry one valid token. The same
script first runs unthrottled for `--measure` seconds: capacity is what it achieved. The soak then
runs at `--load` (0.8) of it, paced wrk2-style: `delay()`, which wrk calls before every request,
returns the time until that request's slot on a fixed per-thread schedule (thread rate = target /
threads, read from a monotonic clock through LuaJIT's ffi), so each thread sends at a constant
rate whatever the latency, and falls back to "as fast as possible" only if the stack cannot keep
up (then the achieved rate shows it).

Meanwhile the key server goes down and up every `--flap` seconds (connections refused while
down). authd refreshes every 60 s (the minimum), refetches for the unknown kid every `--cooldown`
s while its keys are usable, and keeps the last good keys `--max-stale` s past a failed refresh.
With the defaults (flap 75, max-stale 5) every down phase outlasts the key set (at most 65 s after
the last good fetch): authd must fail closed (503, which nginx turns into 500) until its retry
succeeds, which can be up to a minute after the endpoint is back (the retry backoff reaches 60 s).
`--flap 30` instead: outages the last good keys cover, which no client may notice.

Checked, per answer, in the Lua script (it knows each answer's kind from `X-Soak-Kind`, which the
client sends and the protected location echoes back with `add_header ... always`): a valid token
gets 200 and the upstream got its email (not the forged one), an invalid token gets its 401 or
403 and never a 200; a 500 is set aside.
Afterwards: every 500 the client saw must be one of authd's `keys_unavailable` decisions (from
/metrics: a fail-closed answer while keys were truly unavailable), and none an `internal_error`;
the seconds in which they fell are compared with /readyz, sampled 5 times a second. A wrong answer
is any of these failing. Also reported: requests, answers by kind and status, wrk's socket
errors, latency, key fetches (ok/error, from /metrics), authd's RSS at the start and end of the
soak (expected flat within 10%), decisions against audit lines, and error events in authd's log.
The exit status is 0 only with no wrong answer, no socket error, RSS within 10%, one audit line
per decision and no error event; `--json PATH` also writes the report as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.stack import (
    DEFAULT_ISSUER,
    OPS_AUD,
    WIKI_AUD,
    Authd,
    DevKey,
    KeyServer,
    Nginx,
    StackError,
    free_port,
    make_config,
    protected_location,
    temporary_workdir,
)

POLICY = "soak"
EMAIL = "alice@example.com"
FORGED = "mallory@evil.example"
ECHO = "/_soak_echo/"
MIB = 1024 * 1024


# --- tokens -----------------------------------------------------------------------------------


def claims(ttl: int, **overrides: object) -> dict[str, object]:
    now = int(time.time())
    base: dict[str, object] = {
        "iss": DEFAULT_ISSUER,
        "aud": [WIKI_AUD],
        "email": EMAIL,
        "sub": "7335d417-61da-459d-899c-0a01c76a8e1f",
        "type": "app",
        "iat": now - 10,
        "nbf": now - 10,
        "exp": now + ttl,
        "country": "DE",
    }
    return base | overrides


def tokens(key: DevKey, ttl: int) -> tuple[str, list[tuple[str, str, int]]]:
    """The valid token, and the invalid ones: (name, token, the status nginx must answer)."""
    valid = key.sign(claims(ttl))
    head, payload, signature = valid.split(".")
    forged_payload = jwt.utils.base64url_encode(
        json.dumps(claims(ttl, email="admin@example.com")).encode()
    ).decode()
    none_header = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode()
    now = int(time.time())
    invalid = [
        ("garbage", "not-a-token", 401),
        ("alg-none", f"{none_header}.{payload}.", 401),
        ("tampered", f"{head}.{forged_payload}.{signature}", 401),
        ("expired", key.sign(claims(ttl, exp=now - 3600, iat=now - 7200, nbf=now - 7200)), 401),
        ("unknown-kid", key.sign(claims(ttl), headers={"kid": "soak-unknown-kid"}), 401),
        ("other-app", key.sign(claims(ttl, aud=[OPS_AUD])), 401),
        ("not-allowed", key.sign(claims(ttl, email="eve@evil.example")), 403),
    ]
    return valid, invalid


# --- the wrk script ---------------------------------------------------------------------------

LUA = r"""
-- Generated by devtools/soak.py: one request mix, a paced schedule, every answer checked.
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } soak_timespec;
int clock_gettime(int clk_id, soak_timespec *tp);
]]
local ts = ffi.new("soak_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1000000
end

local RATE = @RATE@                  -- requests per second for each thread; 0: unthrottled
local INVALID_EVERY = @INVALID_EVERY@
local VALID = "@VALID@"
local VALID_BODY = "@VALID_BODY@"
local FORGED = "@FORGED@"
local OUT = "@OUT@"
local INVALID = { @INVALID@ }

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

-- Flat (wrk 4.1's thread:get crashes on nested tables): "kind|<kind>|<status>", "wrong",
-- "example|<n>", and "500|<epoch second>" -> count.
stats = { wrong = 0 }
local examples = 0
local counter, start, slot = 0, nil, 0

function delay()
  if RATE <= 0 then return 0 end
  local now = now_ms()
  if start == nil then start = now end
  slot = slot + 1
  local due = start + slot * 1000 / RATE
  if due <= now then return 0 end
  return due - now
end

function request()
  counter = counter + 1
  local kind, token = "valid", VALID
  if counter % INVALID_EVERY == 0 then
    local pick = INVALID[(math.floor(counter / INVALID_EVERY) % #INVALID) + 1]
    kind, token = pick[1], pick[2]
  end
  return wrk.format("GET", "/soak/" .. counter, {
    ["Cf-Access-Jwt-Assertion"] = token,
    ["X-Soak-Kind"] = kind,
    ["X-Authd-Email"] = FORGED,
  })
end

local expected = { valid = 200 }
for _, pick in ipairs(INVALID) do expected[pick[1]] = pick[3] end

local function count(key)
  stats[key] = (stats[key] or 0) + 1
end

local function wrong(what)
  stats.wrong = stats.wrong + 1
  if examples < 20 then
    examples = examples + 1
    stats["example|" .. examples] = what
  end
end

function response(status, headers, body)
  local kind = headers["X-Soak-Kind"] or "?"
  count("kind|" .. kind .. "|" .. status)
  if status == 500 then
    -- Fail-closed, if authd was without usable keys: soak.py checks that afterwards.
    count("500|" .. os.time())
  elseif expected[kind] == nil then
    wrong("an answer without its kind: " .. status)
  elseif status ~= expected[kind] then
    wrong(kind .. " answered " .. status .. " (expected " .. expected[kind] .. "): " .. body)
  elseif status == 200 and body ~= VALID_BODY then
    wrong(kind .. " answered 200 but the upstream got: " .. body)
  end
end

local function encode(value)
  local t = type(value)
  if t == "number" then return string.format("%.17g", value) end
  if t == "string" then
    return '"' .. value:gsub('[%c"\\]', function(c)
      return string.format("\\u%04x", c:byte())
    end) .. '"'
  end
  if t == "table" then
    local parts = {}
    if #value > 0 then
      for _, v in ipairs(value) do table.insert(parts, encode(v)) end
      return "[" .. table.concat(parts, ",") .. "]"
    end
    for k, v in pairs(value) do table.insert(parts, encode(tostring(k)) .. ":" .. encode(v)) end
    return "{" .. table.concat(parts, ",") .. "}"
  end
  return "null"
end

function done(summary, latency, requests)
  local result = {
    requests = summary.requests,
    duration_us = summary.duration,
    errors = summary.errors,
    latency_us = {
      p50 = latency:percentile(50), p99 = latency:percentile(99),
      max = latency.max, mean = latency.mean,
    },
    threads = {},
  }
  for i, thread in ipairs(threads) do result.threads[i] = thread:get("stats") end
  local file = assert(io.open(OUT, "w"))
  file:write(encode(result))
  file:close()
end
"""


def run_wrk_script(  # noqa: PLR0913 -- wrk's own options
    script: Path,
    out: Path,
    url: str,
    *,
    threads: int,
    connections: int,
    seconds: int,
    extra: Sequence[str] = (),
) -> WrkResult:
    """Run wrk with a generated Lua `script` whose done() writes its report to `out`."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", *extra]
    completed = subprocess.run(
        [*argv, "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
    )
    if completed.returncode != 0 or not out.exists():
        raise StackError(f"wrk failed ({completed.returncode}):\n{completed.stderr}")
    return WrkResult.parse(json.loads(out.read_text()))


def lua_string(text: str) -> str:
    return json.dumps(text)[1:-1]  # a JSON string body is a valid Lua string body for ASCII


def echo_body(email: str) -> str:
    return f"email={email} policy={POLICY}\n"


@dataclass
class WrkResult:
    requests: int
    seconds: float
    errors: dict[str, int]
    latency_us: dict[str, float]
    kinds: dict[str, Counter[int]] = field(default_factory=dict)
    wrong: int = 0
    examples: list[str] = field(default_factory=list)
    fail_closed: Counter[int] = field(default_factory=Counter)  # 500s by epoch second

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> WrkResult:
        """What the script's done() wrote: wrk's summary, and each thread's own counts."""
        result = cls(
            requests=int(raw["requests"]),
            seconds=raw["duration_us"] / 1e6,
            errors={k: int(v) for k, v in raw["errors"].items()},
            latency_us=raw["latency_us"],
        )
        for stats in raw["threads"]:
            for key, value in stats.items():
                what, _, rest = key.partition("|")
                if what == "kind":
                    kind, _, status = rest.rpartition("|")
                    result.kinds.setdefault(kind, Counter())[int(status)] += int(value)
                elif what == "500":
                    result.fail_closed[int(rest)] += int(value)
                elif what == "example":
                    result.examples.append(str(value))
                elif what == "wrong":
                    result.wrong += int(value)
        return result


@dataclass
class Stack:
    """The running soak stack, and what the wrk script sends."""

    workdir: Path
    args: argparse.Namespace
    authd: Authd
    keys: KeyServer
    nginx: Nginx
    valid: str
    invalid: list[tuple[str, str, int]]
    audit: Path

    def wrk(self, seconds: int, rate: float) -> WrkResult:
        """Run wrk with the soak script at `rate` requests per second in all (0: unthrottled)."""
        script, out = self.workdir / "soak.lua", self.workdir / "wrk.json"
        out.unlink(missing_ok=True)
        entries = ", ".join(f'{{"{n}", "{token}", {status}}}' for n, token, status in self.invalid)
        script.write_text(
            LUA.replace("@RATE@", repr(rate / self.args.threads))
            .replace("@INVALID_EVERY@", str(self.args.invalid_every))
            .replace("@VALID@", self.valid)
            .replace("@VALID_BODY@", lua_string(echo_body(EMAIL)))
            .replace("@FORGED@", FORGED)
            .replace("@OUT@", lua_string(str(out)))
            .replace("@INVALID@", entries)
        )
        a = self.args
        return run_wrk_script(
            script,
            out,
            self.nginx.url,
            threads=a.threads,
            connections=a.connections,
            seconds=seconds,
        )


# --- observing authd --------------------------------------------------------------------------


def metric_samples(authd: Authd) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = authd.request("/metrics").body.decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and wanted <= lab)


def rss_bytes(authd: Authd) -> int:
    """The resident memory of authd: the process, plus its workers if it has any."""
    pids = [authd.pid, *authd.worker_pids()]
    rss = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) * 1024
    return rss


class Watcher(threading.Thread):
    """Flaps the key server, samples /readyz 5 times a second and RSS once a second."""

    def __init__(self, authd: Authd, keys: KeyServer, flap: float) -> None:
        super().__init__(name="soak-watcher", daemon=True)
        self.authd, self.keys, self.flap = authd, keys, flap
        self.stop = threading.Event()
        self.not_ready: set[int] = set()  # epoch seconds in which /readyz said 503
        self.flaps = Counter[str]()
        self.rss_max = 0
        self.problems: list[str] = []

    def run(self) -> None:
        up, next_flap, next_rss = True, time.monotonic() + self.flap, 0.0
        while not self.stop.wait(0.2):
            now = time.monotonic()
            if self.flap and now >= next_flap:
                self.keys.down() if up else self.keys.up()
                up = not up
                self.flaps["up" if up else "down"] += 1
                next_flap += self.flap
            try:
                if not self.authd.ready():
                    self.not_ready.add(int(time.time()))
            except OSError as ex:
                self.problems.append(f"/readyz: {ex}")
            if now >= next_rss:
                self.rss_max = max(self.rss_max, rss_bytes(self.authd))
                next_rss = now + 1.0
        if not up:
            self.keys.up()


# --- the stack --------------------------------------------------------------------------------


def start_nginx(workdir: Path, config: Path) -> Nginx:
    """nginx with `/soak/` protected by the shipped snippet, proxying to its own echo location."""
    for _ in range(3):
        port = free_port()
        echo = (
            f"location {ECHO} {{\n"
            f'    return 200 "email=$http_x_authd_email policy=$http_x_authd_policy\\n";\n'
            f"}}\n"
        )
        soak = protected_location(
            "/soak/",
            POLICY,
            f"http://127.0.0.1:{port}{ECHO}",
            extra="add_header X-Soak-Kind $http_x_soak_kind always;",
        )
        nginx = Nginx(workdir, authd_config=config, locations=[soak, echo], port=port).start()
        if nginx.port == port:
            return nginx
        nginx.stop()  # it had to move to another port: the echo address is wrong
    raise StackError("no stable port for nginx")


def audit_line_count(path: Path) -> int:
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def soak(workdir: Path, args: argparse.Namespace) -> bool:
    key = DevKey.create(workdir / "keys")
    valid, invalid = tokens(key, ttl=args.duration + args.measure + 3600)
    audit = workdir / "audit.log"
    with KeyServer(key.jwks) as keys:
        config = make_config(
            workdir,
            jwks_url=keys.url,
            policies={POLICY: {"audience": [WIKI_AUD], "allow_email_domains": ["example.com"]}},
            refresh_seconds=60,
            refetch_cooldown_seconds=args.cooldown,
            max_stale_seconds=args.max_stale,
            fetch_timeout_seconds=2,
            workers=args.workers,
            audit_file=audit,
        )
        with Authd(config) as authd:
            nginx = start_nginx(workdir, config)
            try:
                stack = Stack(workdir, args, authd, keys, nginx, valid, invalid, audit)
                return measure_and_soak(stack)
            finally:
                nginx.stop()


@dataclass
class Report:
    """Everything the soak measured, and the verdict."""

    args: argparse.Namespace
    invalid: list[tuple[str, str, int]]
    measured: WrkResult
    target: float
    result: WrkResult
    watcher: Watcher
    rss_boot: int
    rss_start: int
    rss_end: int
    fetches: dict[str, int]
    keys_unavailable: int
    internal_errors: int
    audit_lines: int
    decisions: int
    error_events: list[dict[str, Any]]

    @property
    def client_500(self) -> int:
        return sum(c[500] for c in self.result.kinds.values())

    @property
    def wrong(self) -> int:
        """Wrong answers: the script's, and every 500 that authd did not decide for lack of
        usable keys (a 500 nginx made itself, or an internal error)."""
        unexplained = max(0, self.client_500 - self.keys_unavailable) + self.internal_errors
        return self.result.wrong + unexplained

    @property
    def socket_errors(self) -> int:
        return sum(v for k, v in self.result.errors.items() if k != "status")

    @property
    def rss_growth(self) -> float:
        return (self.rss_end - self.rss_start) / self.rss_start

    @property
    def passed(self) -> bool:
        return (
            self.wrong == 0
            and self.socket_errors == 0
            and abs(self.rss_growth) <= 0.10
            and self.audit_lines == self.decisions
            and not self.error_events
        )


def measure_and_soak(stack: Stack) -> bool:
    args, authd = stack.args, stack.authd
    rss_boot = rss_bytes(authd)
    print(
        f"measuring capacity: {args.measure} s unthrottled, -t{args.threads} -c{args.connections}"
    )
    measured = stack.wrk(args.measure, rate=0)
    if measured.wrong or not measured.requests:
        print(f"the capacity run went wrong: {measured.wrong} wrong answers")
        for example in measured.examples[:10]:
            print(f"  {example.strip()}")
        return False
    target = measured.rate * args.load
    print(
        f"capacity {measured.rate:.0f} req/s; soaking at {target:.0f} req/s for {args.duration} s"
    )

    before, rss_start = metric_samples(authd), rss_bytes(authd)
    watcher = Watcher(authd, stack.keys, args.flap)
    watcher.start()
    try:
        result = stack.wrk(args.duration, rate=target)
    finally:
        watcher.stop.set()
        watcher.join(10)
    time.sleep(1)  # the last decisions reach the metrics and the audit file
    after, rss_end = metric_samples(authd), rss_bytes(authd)

    def delta(name: str, **labels: str) -> int:
        return round(total(after, name, **labels) - total(before, name, **labels))

    report = Report(
        args=args,
        invalid=stack.invalid,
        measured=measured,
        target=target,
        result=result,
        watcher=watcher,
        rss_boot=rss_boot,
        rss_start=rss_start,
        rss_end=rss_end,
        fetches={r: delta("authd_key_fetches_total", result=r) for r in ("ok", "error")},
        keys_unavailable=delta("authd_decisions_total", reason="keys_unavailable"),
        internal_errors=delta("authd_decisions_total", reason="internal_error"),
        audit_lines=audit_line_count(stack.audit),
        decisions=round(total(after, "authd_decisions_total")),
        error_events=[e for e in authd.events() if e.get("level") == "error"],
    )
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(as_json(report), indent=2) + "\n")
    return report.passed


def print_report(r: Report) -> None:
    result, lat, args = r.result, r.result.latency_us, r.args
    valid = sum(result.kinds.get("valid", Counter()).values())
    statuses = Counter[int]()
    for counts in result.kinds.values():
        statuses.update(counts)
    seconds_500 = sorted(result.fail_closed)
    not_ready = [s for s in seconds_500 if {s - 1, s, s + 1} & r.watcher.not_ready]
    socket = ", ".join(f"{k} {v}" for k, v in result.errors.items() if k != "status")
    out = ["", f"soak: {args.duration} s at {args.load:.0%} of the measured capacity"]
    out.append(
        f"  capacity      {r.measured.rate:.0f} req/s ({r.measured.requests} requests in "
        f"{r.measured.seconds:.0f} s, unthrottled); target {r.target:.0f} req/s, "
        f"achieved {result.rate:.0f} req/s"
    )
    out.append(
        f"  requests      {result.requests} (valid {valid}, invalid {result.requests - valid})"
    )
    out.append(f"  by status     {', '.join(f'{s}: {n}' for s, n in sorted(statuses.items()))}")
    out.append("  by kind:")
    for kind in ["valid", *(name for name, _, _ in r.invalid)]:
        counts = sorted(result.kinds.get(kind, Counter()).items())
        out.append(f"    {kind:<12}  {', '.join(f'{s}: {n}' for s, n in counts) or '-'}")
    out.append(f"  socket errors {socket}")
    out.append(
        f"  latency       p50 {lat['p50'] / 1000:.1f} ms, p99 {lat['p99'] / 1000:.1f} ms, "
        f"max {lat['max'] / 1000:.1f} ms"
    )
    out.append(
        f"  key endpoint  down/up every {args.flap:g} s ({r.watcher.flaps['down']} down, "
        f"{r.watcher.flaps['up']} up); key fetches ok {r.fetches['ok']}, "
        f"error {r.fetches['error']} (/metrics)"
    )
    out.append(
        f"  500s          {r.client_500}; authd's keys_unavailable decisions "
        f"{r.keys_unavailable}, internal_error {r.internal_errors}; /readyz said 503 within 1 s "
        f"of {len(not_ready)} of the {len(seconds_500)} seconds with a 500"
    )
    out.append(f"  wrong answers {r.wrong}")
    out += [f"    {example.strip()}" for example in result.examples[:10]]
    out.append(
        f"  authd RSS     {r.rss_start / MIB:.1f} MiB at the start, {r.rss_end / MIB:.1f} MiB "
        f"at the end ({r.rss_growth:+.1%}), max {r.watcher.rss_max / MIB:.1f} MiB "
        f"({r.rss_boot / MIB:.1f} MiB before the capacity run)"
    )
    out.append(
        f"  audit         {r.audit_lines} lines for {r.decisions} decisions; "
        f"error events in authd's log: {len(r.error_events)}"
    )
    out += [f"  watcher: {problem}" for problem in r.watcher.problems[:5]]
    out.append(f"verdict: {'PASS' if r.passed else 'FAIL'}")
    print("\n".join(out))


def as_json(r: Report) -> dict[str, Any]:
    return {
        "duration_s": r.args.duration,
        "capacity_rps": r.measured.rate,
        "target_rps": r.target,
        "achieved_rps": r.result.rate,
        "requests": r.result.requests,
        "kinds": {k: dict(c) for k, c in r.result.kinds.items()},
        "socket_errors": r.result.errors,
        "latency_us": r.result.latency_us,
        "key_fetches": r.fetches,
        "client_500": r.client_500,
        "keys_unavailable_decisions": r.keys_unavailable,
        "internal_errors": r.internal_errors,
        "wrong": r.wrong,
        "wrong_examples": r.result.examples,
        "rss_bytes": {"start": r.rss_start, "end": r.rss_end, "max": r.watcher.rss_max},
        "audit_lines": r.audit_lines,
        "decisions": r.decisions,
        "passed": r.passed,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=600, help="seconds of soak (600)")
    p.add_argument("--measure", type=int, default=15, help="seconds of the capacity run (15)")
    p.add_argument("--load", type=float, default=0.8, help="fraction of capacity (0.8)")
    p.add_argument("--flap", type=float, default=75, help="key server down/up every N s (75)")
    p.add_argument("--max-stale", type=int, default=5, help="authd's max_stale_seconds (5)")
    p.add_argument("--cooldown", type=int, default=10, help="refetch_cooldown_seconds (10)")
    p.add_argument("--invalid-every", type=int, default=10, help="1 invalid token in N (10)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections, <= 64 (16)")
    p.add_argument("--workers", type=int, default=1, help="authd workers (1)")
    p.add_argument("--json", help="also write the report here, as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with temporary_workdir("authd-soak-") as workdir:
            return 0 if soak(workdir, args) else 1
    except StackError as ex:
        print(f"soak: {ex}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
