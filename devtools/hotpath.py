"""Where authd's time goes on one auth request, part by part, in process (no sockets).

    .venv/bin/python devtools/hotpath.py            # the table
    .venv/bin/python devtools/hotpath.py --profile  # and cProfile's top functions of a hit

The app is the real one (`create_app` over a `Service` with a local key set, the audit line
rendered and written to /dev/null, metrics in memory), called through ASGI with the request
nginx's server snippet sends. Each part is timed on its own, best of five runs of N calls; "the
whole request" runs the app, Falcon included, so the framework's share is what the parts leave.
CPU time of one process: uvicorn's HTTP parsing and the socket are not in it (`make bench`
measures those, through nginx).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
import timeit
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric import rsa

from authd import audit, config, metrics
from authd.app import EveryValue, create_app
from authd.dev import DEV_AUDIENCE, DEV_ISSUER, claims, key_set, mint
from authd.fetch import make_http_client
from authd.headers import RequestFacts, extract_token, token_digest
from authd.keys import SystemClock
from authd.service import Service

CONFIG = f"""
workers = 1
[[issuers]]
name = "dev"
issuer = "{DEV_ISSUER}"
jwks_file = "{{jwks}}"
[policies.wiki]
audience = "{DEV_AUDIENCE}"
allow_email_domains = ["example.com"]
"""
Scope = dict[str, Any]


def request_scope(token: str) -> Scope:
    """What uvicorn hands the app for nginx's auth subrequest (authd-server.conf's headers)."""
    headers = [
        (b"host", b"wiki.example.com"),
        (b"x-original-uri", b"/wiki/Some_Page?action=edit"),
        (b"x-original-method", b"GET"),
        (b"x-real-ip", b"198.51.100.7"),
        (b"x-request-id", b"0d1c2b3a495867768594a3b2c1d0e1f2"),
        (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
        (b"accept", b"text/html,application/xhtml+xml"),
        (b"cf-access-jwt-assertion", token.encode()),
    ]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/auth/wiki",
        "raw_path": b"/auth/wiki",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 0),
        "server": None,
    }


def per_call(function: Callable[[], object], calls: int) -> float:
    """Microseconds per call, best of five runs."""
    return min(timeit.repeat(function, number=calls, repeat=5)) / calls * 1e6


async def per_call_async(function: Callable[[], Awaitable[object]], calls: int) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            await function()
        best = min(best, time.perf_counter() - started)
    return best / calls * 1e6


async def measure(workdir: Path, calls: int, *, profile: bool) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = workdir / "jwks.json"
    jwks.write_text(json.dumps(key_set([key])))
    cfg = config.parse(tomllib.loads(CONFIG.format(jwks=jwks)))
    service = Service.from_config(cfg, path=None, client=make_http_client(), clock=SystemClock())
    auditor = audit.Auditor()
    app = create_app(service=service, auditor=auditor)
    await service.start()
    authorizer = service.current.authorizer

    def token(n: int) -> str:
        return mint(key, claims(now=time.time(), email=f"user{n}@example.com"))

    warm = token(0)
    scope = request_scope(warm)

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_message: dict[str, object]) -> None:
        pass

    async def whole() -> None:
        await app(dict(scope), receive, send)

    await whole()  # the first request verifies; the rest are hits
    headers = EveryValue(scope["headers"])
    facts = RequestFacts.from_request(headers, "GET")
    hit = await authorizer.decide("wiki", lambda _: warm)
    assert hit.cached
    assert authorizer.cache is not None
    digest = token_digest(warm)
    rows = [
        ("the whole request (a cache hit)", await per_call_async(whole, calls)),
        ("  read the headers (EveryValue)", per_call(lambda: EveryValue(scope["headers"]), calls)),
        ("  extract the token", per_call(lambda: extract_token(cfg.token_sources, headers), calls)),
        ("  SHA-256 of the token", per_call(lambda: token_digest(warm), calls)),
        ("  decision cache lookup", per_call(lambda: authorizer.cache.get(digest, "wiki"), calls)),
        (
            "  request facts (sanitized)",
            per_call(lambda: RequestFacts.from_request(headers, "GET"), calls),
        ),
        ("  metrics", per_call(lambda: metrics.observe(hit, True, 0.0001), calls)),  # noqa: FBT003
        ("  the audit line", per_call(lambda: auditor.decision(hit, facts, 0.1), calls)),
    ]
    fresh = [token(n) for n in range(1, calls // 10 + 2)]
    pending = iter(fresh)
    rows.append(
        (
            "a cache miss: decide() verifying RS256",
            await per_call_async(
                lambda: authorizer.decide("wiki", lambda _: next(pending)), len(fresh) // 5
            ),
        )
    )
    parts = sum(us for name, us in rows[1:-1])
    rows.insert(-1, ("  Falcon and the rest (whole - parts)", rows[0][1] - parts))
    for name, us in rows:
        print(f"{name:42s} {us:7.1f} µs")
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            await whole()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--calls", type=int, default=20_000, help="calls per timing run (default 20000)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also print cProfile's top 20 of the hits"
    )
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="authd-hotpath-") as workdir,
        Path(os.devnull).open("w") as devnull,
    ):
        audit.configure(devnull)
        asyncio.run(measure(Path(workdir), args.calls, profile=args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
