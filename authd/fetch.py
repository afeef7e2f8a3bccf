"""Outbound HTTP with cloudflared's hygiene, for every fetch authd makes.

Key sets, per-kid keys, OpenID discovery documents and get-identity answers all come
through :func:`get`: no redirects (a redirect is an error that names where it pointed),
a size cap on the decoded body as it arrives, and one total timeout for the whole
exchange. The client honours ``HTTPS_PROXY``/``NO_PROXY`` and the system's CA store.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from authd import __version__
from authd.errors import BodyTooLarge, FetchError

MAX_BODY_BYTES = 1 << 20  # cloudflared's cap; a real key set is a few KiB


@dataclass(frozen=True, slots=True)
class Fetched:
    body: bytes
    max_age: float | None = None  # Cache-Control: max-age, when the answer had one
    status: int = 200


def make_http_client() -> httpx.AsyncClient:
    """authd's client: the system's CA store (not certifi's copy), which an administrator
    maintains, and HTTPS_PROXY/NO_PROXY from the environment.

    It keeps no cookies: one client serves every fetch, and a cookie that a get-identity
    answer sets (a credential, perhaps) must never ride along with a later request.
    """
    return httpx.AsyncClient(
        follow_redirects=False,
        cookies=http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[])),
        trust_env=True,
        verify=ssl.create_default_context(),  # OpenSSL's paths; SSL_CERT_FILE/DIR override
        headers={"User-Agent": f"authd/{__version__}", "Accept": "application/json"},
        limits=httpx.Limits(max_connections=10, max_keepalive_connections=2),
    )


async def get(  # noqa: PLR0913 -- one keyword per knob of one exchange
    client: httpx.AsyncClient,
    url: str,
    seconds: float,
    *,
    headers: Mapping[str, str] | None = None,
    max_bytes: int = MAX_BODY_BYTES,
    accept_status: frozenset[int] = frozenset({200}),
) -> Fetched:
    """GET ``url`` within ``seconds`` in all: the body of a 200 (of another status in
    ``accept_status``, no body is read), or :class:`FetchError` saying what went wrong.

    The error text never holds ``headers`` (they may carry a token).
    """
    try:
        async with asyncio.timeout(seconds):
            return await _get(
                client,
                url,
                seconds=seconds,
                headers=headers,
                max_bytes=max_bytes,
                accept_status=accept_status,
            )
    except (TimeoutError, httpx.TimeoutException) as ex:
        raise FetchError(f"timed out after {seconds:g}s") from ex
    except httpx.HTTPError as ex:
        raise FetchError(f"{type(ex).__name__}: {ex}") from ex


async def _get(  # noqa: PLR0913 -- as get()
    client: httpx.AsyncClient,
    url: str,
    *,
    seconds: float,
    headers: Mapping[str, str] | None,
    max_bytes: int,
    accept_status: frozenset[int],
) -> Fetched:
    # httpx's own timeouts (5 s per phase by default) would cut the total short: each phase
    # may take as long as the whole fetch, which asyncio bounds in get().
    async with client.stream("GET", url, timeout=seconds, headers=headers) as resp:
        if resp.status_code != 200:
            if resp.status_code in accept_status:
                return Fetched(b"", status=resp.status_code)
            where = resp.headers.get("location")
            detail = f" (redirect to {where!r} refused)" if where else ""
            raise FetchError(f"HTTP {resp.status_code}{detail}")
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise BodyTooLarge(f"body of {declared} bytes is over the {max_bytes} cap")
        body = bytearray()
        # Decoded bytes (the endpoint may gzip), capped as they arrive: a decompression
        # bomb stops at the cap like any other oversized body.
        async for chunk in resp.aiter_bytes():
            body += chunk
            if len(body) > max_bytes:
                raise BodyTooLarge(f"body is over the {max_bytes} byte cap")
        return Fetched(bytes(body), _max_age(resp.headers.get("cache-control", "")))


def _max_age(cache_control: str) -> float | None:
    m = re.search(r"(?:^|[,\s])max-age\s*=\s*\"?(\d{1,9})", cache_control, re.IGNORECASE)
    return float(m.group(1)) if m else None
