"""The key store: each issuer's public keys in memory, refreshed in the background.

PyJWT's ``PyJWKClient`` is the wrong shape for a daemon (blocking fetches, a cache
cleared when a fetch fails, a refetch for every unknown ``kid``), so this module keeps
its own: the request path only ever reads a dict; fetches happen in one background
task per issuer; an unknown ``kid`` triggers at most one refetch per cooldown, shared
by every request that waits for it; a failed fetch keeps the last good set until it
is too stale to trust.

JWK parsing uses PyJWT's algorithm classes (``from_jwk``); everything else about a
fetched document (what to drop, what counts as a duplicate) is decided here.

Per provider: a JWKS at a URL or in a file (Cloudflare, Google IAP), a JWKS found through
OpenID discovery (:class:`DiscoverySource`), or an AWS ALB's one PEM key per ``kid``
(:class:`AlbKeys`, fetched lazily: there is no set to download).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import re
import time
import urllib.parse
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeAlias

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.exceptions import InvalidKeyError

from authd import fetch
from authd.config import url_problem
from authd.errors import Denied, FetchError, KeysUnavailable, Reason
from authd.fetch import MAX_BODY_BYTES, Fetched

if TYPE_CHECKING:
    import httpx

    from authd.config import IssuerConfig

log = structlog.get_logger("authd.keys")

MIN_RSA_BITS = 2048
MIN_REFRESH_SECONDS = 60.0  # floor for Cache-Control: max-age
MAX_KID_LENGTH = 256
# How long requests with an unknown kid wait for the one refetch they triggered. It must
# stay well below the nginx snippet's proxy_read_timeout (5 s), or nginx answers 500.
UNKNOWN_KID_WAIT_SECONDS = 3.0
RETRY_BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# A discovery document is a few KiB (Keycloak's, among the largest, about 10).
MAX_DISCOVERY_BYTES = 256 * 1024
# AWS ALB: the only kids ever put into a key URL (AWS's are UUIDs). No '/', '.', '%',
# '?' or '#': a kid can name one key under alb_keys_url and nothing else.
ALB_KID = re.compile(r"[A-Za-z0-9-]{1,128}")
MAX_PEM_BYTES = 16 * 1024  # a P-256 public key in PEM is 178 bytes
ALB_MAX_KEYS = 64  # known kids kept (least recently used dropped first)
# Fetches of kids not yet known, per refetch_cooldown_seconds: per client (nginx's
# X-Real-IP), and in all, which bounds what authd asks of AWS whatever the flood.
ALB_MAX_NEW_KIDS = 10
ALB_MAX_NEW_KIDS_IN_ALL = 600
ALB_MAX_CLIENTS = 4096  # clients whose recent fetches are remembered (oldest forgotten first)

PublicKeyType: TypeAlias = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)


class Clock(Protocol):
    """Wall time for token claims, monotonic time for everything that ages."""

    def time(self) -> float: ...
    def monotonic(self) -> float: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class KeySet(Protocol):
    """One issuer's keys as the rest of authd sees them: :class:`IssuerKeys` (a key set
    document, refreshed) or :class:`AlbKeys` (one key per kid, fetched when first seen)."""

    @property
    def config(self) -> IssuerConfig: ...
    @property
    def name(self) -> str: ...
    @property
    def generation(self) -> int:
        """Changes whenever a key this set vouched for may be gone (cached allows die)."""
        ...

    @property
    def last_error(self) -> str | None: ...
    @property
    def fetches(self) -> dict[str, int]: ...
    def usable(self) -> bool: ...
    def age(self) -> float | None: ...
    def kids(self) -> list[str]: ...
    async def key_for(self, kid: str, client: str = "") -> VerifyKey: ...
    async def refresh(self) -> bool: ...
    async def run(self) -> None: ...


# Told about every fetch's outcome (the metrics listen here).
FetchObserver: TypeAlias = "Callable[[KeySet, bool], None]"


class KeySource(Protocol):
    """Where one issuer's key set document comes from."""

    async def fetch(self) -> Fetched:
        """Return the document, or raise :class:`FetchError`."""
        ...


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """One usable public key of an issuer."""

    kid: str
    key: PublicKeyType
    alg: str | None  # the JWK's "alg", which restricts the key to that algorithm

    @property
    def fingerprint(self) -> bytes:
        return self.key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


class HttpSource:
    """A key set document at an HTTPS URL, fetched with :func:`authd.fetch.get`'s hygiene."""

    def __init__(self, client: httpx.AsyncClient, url: str, timeout: float) -> None:
        self.client = client
        self.url = url
        self.timeout = timeout

    async def fetch(self) -> Fetched:
        return await fetch.get(self.client, self.url, self.timeout)


class FileSource:
    """A key set in a local file (``jwks_file``), re-read on every refresh."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def fetch(self) -> Fetched:
        try:
            body = await asyncio.to_thread(_read_capped, self.path)
        except OSError as ex:
            raise FetchError(f"cannot read {self.path}: {ex.strerror}") from ex
        return Fetched(body)


def _read_capped(path: Path) -> bytes:
    with path.open("rb") as f:
        body = f.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise FetchError(f"{path} is over the {MAX_BODY_BYTES} byte cap")
    return body


class DiscoverySource:
    """An OpenID provider's key set, found through its discovery document on every fetch
    (OpenID Connect Discovery 1.0): a provider may move its ``jwks_uri``, so each refresh
    asks again. One ``timeout`` bounds both requests together."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        issuer: str,
        timeout: float,
    ) -> None:
        self.client = client
        self.url = url
        self.issuer = issuer
        self.timeout = timeout

    async def fetch(self) -> Fetched:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            found = await fetch.get(
                self.client,
                self.url,
                self.timeout,
                max_bytes=MAX_DISCOVERY_BYTES,
            )
        except FetchError as ex:
            raise FetchError(f"discovery document: {ex}") from ex
        jwks_uri = discovered_jwks_uri(found.body, self.issuer, self.url)
        left = deadline - loop.time()
        if left <= 0:
            raise FetchError(f"timed out after {self.timeout:g}s (in discovery)")
        try:
            return await fetch.get(self.client, jwks_uri, left)
        except FetchError as ex:
            raise FetchError(f"jwks_uri {jwks_uri}: {ex}") from ex


def discovered_jwks_uri(body: bytes, issuer: str, discovery_url: str) -> str:
    """The ``jwks_uri`` of a discovery document that is about ``issuer``, or :class:`FetchError`.

    The document must name exactly the configured issuer (Discovery 4.3: otherwise a
    document served for one issuer could hand authd another one's keys), and its
    ``jwks_uri`` must be a URL authd may fetch: https, and plain http to loopback only
    when the document itself came that way (an https document cannot send authd to a
    plain-http service on this host).
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as ex:
        raise FetchError(f"discovery document is not JSON: {str(ex)[:80]}") from ex
    if not isinstance(doc, dict):
        raise FetchError("discovery document is not a JSON object")
    named = doc.get("issuer")
    if named != issuer:
        raise FetchError(
            f"discovery document is for issuer {_show_value(named)}, not the configured "
            f"{issuer!r} (they must be equal exactly)",
        )
    jwks_uri = doc.get("jwks_uri")
    if not isinstance(jwks_uri, str) or not jwks_uri:
        raise FetchError("discovery document has no jwks_uri")
    if not (jwks_uri.isascii() and jwks_uri.isprintable()) or " " in jwks_uri:
        # urlsplit silently drops tabs and newlines; httpx refuses other odd bytes with
        # an exception that is not a fetch error. Neither belongs in a URL.
        raise FetchError(f"jwks_uri {_show_value(jwks_uri)}: not a URL")
    if (problem := url_problem(jwks_uri)) is not None:
        raise FetchError(f"jwks_uri {_show_value(jwks_uri)}: {problem}")
    downgrade = urllib.parse.urlsplit(jwks_uri).scheme == "http"
    if downgrade and urllib.parse.urlsplit(discovery_url).scheme != "http":
        raise FetchError(
            f"jwks_uri {_show_value(jwks_uri)}: plain http, from a discovery document "
            "fetched over https",
        )
    return jwks_uri


def _show_value(value: object) -> str:
    """A value from a fetched document, for the log: bounded, and quoted by ``repr``."""
    text = repr(value)
    return text[:100] + "..." if len(text) > 100 else text


def parse_key_set(body: bytes) -> tuple[dict[str, VerifyKey], list[str]]:
    """Read a JWKS (``keys``) and Cloudflare's ``public_certs``; drop what must not be used.

    Returns the usable keys by kid, and one note per dropped key. Raises
    :class:`FetchError` when the document is not a key set or holds no usable key.
    ``public_cert`` (singular) is ignored: Cloudflare says not to rely on it.
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as ex:
        raise FetchError(f"not JSON: {str(ex)[:80]}") from ex
    if not isinstance(doc, dict):
        raise FetchError("not a JSON object")
    jwks, certs = doc.get("keys"), doc.get("public_certs")
    if not isinstance(jwks, list) and not isinstance(certs, list):
        raise FetchError("neither 'keys' nor 'public_certs' is a list")

    dropped: list[str] = []
    found: list[tuple[str, VerifyKey | None]] = []  # (source, key) with None = dropped
    for i, jwk in enumerate(jwks if isinstance(jwks, list) else []):
        found.append(("keys", _from_jwk(jwk, f"keys[{i}]", dropped)))
    for i, cert in enumerate(certs if isinstance(certs, list) else []):
        found.append(("public_certs", _from_cert(cert, f"public_certs[{i}]", dropped)))

    usable: dict[str, VerifyKey] = {}
    conflicted: set[str] = set()
    seen_in: dict[str, set[str]] = {}
    for source, key in found:
        if key is None:
            continue
        sources = seen_in.setdefault(key.kid, set())
        prior = usable.get(key.kid)
        # A kid listed twice in the same list, or with different material in the two
        # lists, is ambiguous: which key does the issuer sign with? Drop it entirely.
        if source in sources or (prior is not None and prior.fingerprint != key.fingerprint):
            conflicted.add(key.kid)
        sources.add(source)
        if prior is None or prior.alg is None:
            usable[key.kid] = key
    for kid in sorted(conflicted):
        usable.pop(kid, None)
        dropped.append(f"kid {_show_kid(kid)}: listed more than once")
    if not usable:
        raise FetchError("no usable keys" + (f" ({'; '.join(dropped)})" if dropped else ""))
    return usable, dropped


_JWK_LOADERS: dict[object, Callable[[str], object]] = {
    "RSA": RSAAlgorithm.from_jwk,
    "EC": ECAlgorithm.from_jwk,
    "OKP": OKPAlgorithm.from_jwk,
}
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k")


def _from_jwk(jwk: object, where: str, dropped: list[str]) -> VerifyKey | None:
    problem = _jwk_problem(jwk)
    if problem is None:
        assert isinstance(jwk, dict)
        try:
            key = _JWK_LOADERS[jwk["kty"]](json.dumps(jwk))
        except (InvalidKeyError, ValueError, TypeError, KeyError) as ex:
            problem = f"unreadable {jwk['kty']} key ({type(ex).__name__})"
        else:
            return _checked(jwk["kid"], key, jwk.get("alg"), where, dropped)
    dropped.append(f"{where}: {problem}")
    return None


def _jwk_problem(jwk: object) -> str | None:
    """Why this JWK must not be used for verification, or None."""
    if not isinstance(jwk, dict):
        return "not an object"
    if not _valid_kid(jwk.get("kid")):
        return "missing or invalid kid"
    if jwk.get("use", "sig") != "sig":
        return f"use is {jwk.get('use')!r}, not 'sig'"
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return "key_ops does not allow 'verify'"
    if not isinstance(jwk.get("alg", ""), str):
        return "alg is not a string"
    if jwk.get("kty") == "oct":
        return "symmetric key"
    if any(m in jwk for m in _PRIVATE_MEMBERS):
        return "private key material (a public key set must not hold it)"
    kty = jwk.get("kty")
    if not isinstance(kty, str) or kty not in _JWK_LOADERS:
        return f"unsupported kty {kty!r}"
    return None


def _from_cert(entry: object, where: str, dropped: list[str]) -> VerifyKey | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("cert"), str):
        dropped.append(f"{where}: not an object with a PEM cert")
        return None
    kid = entry.get("kid")
    if not _valid_kid(kid):
        dropped.append(f"{where}: missing or invalid kid")
        return None
    try:
        cert = x509.load_pem_x509_certificate(entry["cert"].encode("ascii"))
        key = cert.public_key()
    except (ValueError, UnicodeEncodeError) as ex:
        dropped.append(f"{where}: unreadable certificate ({type(ex).__name__})")
        return None
    return _checked(str(kid), key, None, where, dropped)


def _checked(
    kid: str,
    key: object,
    alg: str | None,
    where: str,
    dropped: list[str],
) -> VerifyKey | None:
    if not isinstance(
        key,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        dropped.append(f"{where}: not a public signature key ({type(key).__name__})")
        return None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        dropped.append(f"{where}: RSA key of {key.key_size} bits (minimum {MIN_RSA_BITS})")
        return None
    return VerifyKey(kid=kid, key=key, alg=alg)


def _valid_kid(kid: object) -> bool:
    return isinstance(kid, str) and 0 < len(kid) <= MAX_KID_LENGTH and kid.isprintable()


def _show_kid(kid: str) -> str:
    return kid[:16] + "..." if len(kid) > 16 else kid


class IssuerKeys:
    """One issuer's key set: read without waiting, refreshed in the background.

    The state is per process. With several worker processes, every bound here
    ("one refetch per cooldown") holds per worker.
    """

    def __init__(
        self,
        config: IssuerConfig,
        source: KeySource,
        clock: Clock,
        on_fetch: FetchObserver | None = None,
    ) -> None:
        self.config = config
        self.source = source
        self.clock = clock
        self.on_fetch = on_fetch
        self._keys: Mapping[str, VerifyKey] = {}
        self._loaded = False
        self._fetched_at = 0.0  # monotonic
        self._usable_until = 0.0  # monotonic
        self._next_interval = config.refresh_seconds
        self._last_refetch = -float("inf")  # monotonic; unknown-kid refetches only
        self._inflight: asyncio.Task[bool] | None = None
        self._failures = 0
        self.generation = 0  # bumped whenever the key set changes
        self.fetches: dict[str, int] = {"ok": 0, "error": 0}
        self.last_error: str | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def reconfigure(self, config: IssuerConfig, source: KeySource) -> None:
        """New settings for the same issuer and key source: the loaded keys stay."""
        self.config, self.source = config, source
        self._next_interval = min(self._next_interval, config.refresh_seconds)
        if self._loaded:
            self._usable_until = self._fetched_at + self._next_interval + config.max_stale_seconds

    def usable(self) -> bool:
        return self._loaded and self.clock.monotonic() <= self._usable_until

    def age(self) -> float | None:
        """Seconds since the key set was last fetched successfully, or None."""
        return self.clock.monotonic() - self._fetched_at if self._loaded else None

    def kids(self) -> list[str]:
        return sorted(self._keys)

    async def key_for(self, kid: str, client: str = "") -> VerifyKey:  # noqa: ARG002 -- see below
        """The key named ``kid``; an unknown kid may trigger one shared, rate-limited refetch.

        Raises :class:`KeysUnavailable` when there is no usable key set at all, and
        ``Denied(unknown_kid)`` when the kid stays unknown. ``client`` plays no part: one
        refetch brings every kid the issuer has, so a flood's refetch brings the real ones.
        """
        if not self.usable():
            raise KeysUnavailable(self.name, self._unusable_detail())
        key = self._keys.get(kid)
        if key is not None:
            return key
        if self._inflight is None:
            now = self.clock.monotonic()
            if now - self._last_refetch < self.config.refetch_cooldown_seconds:
                raise Denied(Reason.UNKNOWN_KID, "unknown kid; refetch cooldown running")
            self._last_refetch = now
            log.info("keys_refetch", issuer=self.name, trigger="unknown_kid")
            self._start_fetch()
        assert self._inflight is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._inflight), UNKNOWN_KID_WAIT_SECONDS)
        key = self._keys.get(kid)
        if key is None:
            raise Denied(Reason.UNKNOWN_KID, "kid not in the issuer's key set after a refetch")
        return key

    async def refresh(self) -> bool:
        """Fetch now (joining a fetch already in flight); True when the set was updated."""
        if self._inflight is None:
            self._start_fetch()
        assert self._inflight is not None
        return await asyncio.shield(self._inflight)

    async def run(self) -> None:
        """The background loop: refresh on schedule, retry failures with backoff."""
        while True:
            if self._failures:
                delay = RETRY_BACKOFF_SECONDS[min(self._failures, len(RETRY_BACKOFF_SECONDS)) - 1]
                delay = min(delay, self.config.refresh_seconds)
            else:
                delay = self._next_interval
            await asyncio.sleep(delay)
            await self.refresh()

    def _observe(self, *, ok: bool) -> None:
        if self.on_fetch is not None:
            self.on_fetch(self, ok)

    def _start_fetch(self) -> None:
        self._inflight = asyncio.get_running_loop().create_task(self._fetch())
        self._inflight.add_done_callback(self._fetch_done)

    def _fetch_done(self, _task: asyncio.Task[bool]) -> None:
        self._inflight = None

    async def _fetch(self) -> bool:
        try:
            fetched = await self.source.fetch()
            keys, dropped = parse_key_set(fetched.body)
        except Exception as ex:
            self._failures += 1
            self.fetches["error"] += 1
            self.last_error = str(ex) if isinstance(ex, FetchError) else f"bug: {ex!r}"
            self._observe(ok=False)
            log.warning(
                "keys_fetch_failed",
                exc_info=not isinstance(ex, FetchError),
                issuer=self.name,
                source=self.config.key_source,
                error=self.last_error,
                failures=self._failures,
                keys_usable=self.usable(),
                key_set_age_s=_round(self.age()),
            )
            return False
        now = self.clock.monotonic()
        interval = self.config.refresh_seconds
        if fetched.max_age is not None:
            interval = min(max(fetched.max_age, MIN_REFRESH_SECONDS), interval)
        changed = not self._loaded or _fingerprints(keys) != _fingerprints(self._keys)
        self._keys, self._loaded = keys, True
        self._fetched_at, self._next_interval = now, interval
        self._usable_until = now + interval + self.config.max_stale_seconds
        self._failures, self.last_error = 0, None
        self.fetches["ok"] += 1
        if changed:
            self.generation += 1
        self._observe(ok=True)
        log.info(
            "keys_fetched",
            issuer=self.name,
            source=self.config.key_source,
            kids=[_show_kid(k) for k in sorted(keys)],
            dropped=dropped,
            changed=changed,
            next_refresh_s=interval,
        )
        return True

    def _unusable_detail(self) -> str:
        if not self._loaded:
            return f"no key set fetched yet (last error: {self.last_error or 'none yet'})"
        return (
            f"key set is {self.age():.0f}s old, past max_stale_seconds "
            f"(last error: {self.last_error})"
        )


def _fingerprints(keys: Mapping[str, VerifyKey]) -> dict[str, bytes]:
    return {kid: k.fingerprint for kid, k in keys.items()}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


class KidSource(Protocol):
    """Where the key of one kid comes from (an AWS ALB's key endpoint)."""

    async def fetch(self, kid: str) -> Fetched:
        """The key's document (status 200), or ``status`` 403/404 when the kid is
        unknown there; :class:`FetchError` for anything else."""
        ...


class AlbSource:
    """An ALB's signing keys: the PEM public key of kid K at ``<base_url>/K``."""

    def __init__(self, client: httpx.AsyncClient, base_url: str, timeout: float) -> None:
        self.client = client
        self.base_url = base_url
        self.timeout = timeout

    def url_for(self, kid: str) -> str:
        if not ALB_KID.fullmatch(kid):
            # AlbKeys never asks for such a kid; this is the last line, not the check.
            raise ValueError("a kid of this shape is never put into a URL")
        # Not urljoin: resolving a relative reference is exactly what a kid must never
        # get to do. The kid is one more path segment, and nothing else changes.
        url = urllib.parse.urlsplit(self.base_url)
        return url._replace(path=f"{url.path.rstrip('/')}/{kid}").geturl()

    async def fetch(self, kid: str) -> Fetched:
        # A missing object behind an S3-style endpoint is 403 when listing is denied, 404
        # otherwise: both mean "no such kid", not "the endpoint is broken".
        return await fetch.get(
            self.client,
            self.url_for(kid),
            self.timeout,
            max_bytes=MAX_PEM_BYTES,
            accept_status=frozenset({403, 404}),
        )


def parse_alb_key(kid: str, body: bytes) -> VerifyKey:
    """An ALB's PEM public key (SubjectPublicKeyInfo), which must be EC P-256: ALBs sign
    with ES256 only. Anything else means the endpoint is not what it should be:
    :class:`FetchError`."""
    if body.count(b"-----BEGIN ") != 1:
        raise FetchError("not one PEM block")
    try:
        key = load_pem_public_key(body)
    except (ValueError, TypeError) as ex:
        raise FetchError(f"not a PEM public key ({type(ex).__name__})") from ex
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return VerifyKey(kid=kid, key=key, alg="ES256")
        what = f"an EC key on {key.curve.name}"
    else:
        what = type(key).__name__.lstrip("_")
    raise FetchError(f"not an EC P-256 key: {what}")


class AlbKeys:
    """An AWS ALB issuer's keys: one PEM key per kid, fetched the first time a token names it.

    There is no key set to download, so there is nothing to be stale: :meth:`usable` is
    always true and readiness never waits for AWS. What bounds the outbound fetches is the
    kid itself (only :data:`ALB_KID` shapes are fetched), one fetch in flight per kid,
    a remembered "unknown" per kid for ``refetch_cooldown_seconds``, and at most
    :data:`ALB_MAX_NEW_KIDS` fetches per ``refetch_cooldown_seconds`` per client (the
    address nginx saw) and :data:`ALB_MAX_NEW_KIDS_IN_ALL` in all. Known keys stay (at most
    :data:`ALB_MAX_KEYS`, least recently used dropped first).

    Per client, because a forged token's kid cannot be told from a real new one before its
    key is fetched: one budget for everyone would let ten forged tokens a minute refuse the
    real kid of a key rotation. The real ones come through the ALB, the forged ones straight
    to the origin, from other addresses.

    The state is per process, like :class:`IssuerKeys`'s.
    """

    def __init__(
        self,
        config: IssuerConfig,
        source: KidSource,
        clock: Clock,
        on_fetch: FetchObserver | None = None,
    ) -> None:
        self.config = config
        self.source = source
        self.clock = clock
        self.on_fetch = on_fetch
        self._keys: OrderedDict[str, VerifyKey] = OrderedDict()
        self._unknown: dict[str, float] = {}  # kid -> monotonic time it may be asked again
        self._recent: deque[float] = deque()  # monotonic start times of fetches, in all
        # client -> monotonic start times of its fetches; least recently active first
        self._by_client: OrderedDict[str, deque[float]] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[VerifyKey | None]] = {}
        self._fetched_at: float | None = None  # monotonic; last answer from the endpoint
        self.generation = 0  # bumped whenever a known key is dropped
        self.fetches: dict[str, int] = {"ok": 0, "unknown": 0, "error": 0}
        self.last_error: str | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def reconfigure(self, config: IssuerConfig, source: KidSource) -> None:
        """New settings for the same issuer and key URL: the known keys stay."""
        self.config, self.source = config, source

    def usable(self) -> bool:
        return True

    def age(self) -> float | None:
        """Seconds since the key endpoint last answered, or None."""
        return None if self._fetched_at is None else self.clock.monotonic() - self._fetched_at

    def kids(self) -> list[str]:
        return sorted(self._keys)

    async def key_for(self, kid: str, client: str = "") -> VerifyKey:
        """The key named ``kid``, fetched (once, shared) if it is not known yet; a fetch
        counts against ``client``'s budget (the address nginx saw; "" when unknown).

        Raises ``Denied(unknown_kid)`` for a kid the endpoint does not have, one that is
        never put into a URL, or one over the rate limit; :class:`KeysUnavailable` when
        the endpoint fails (authd cannot decide).
        """
        key = self._keys.get(kid)
        if key is not None:
            self._keys.move_to_end(kid)
            return key
        if not ALB_KID.fullmatch(kid):
            raise Denied(Reason.UNKNOWN_KID, "kid is not of the form ALBs use; not fetched")
        task = self._inflight.get(kid) or self._start_fetch(kid, client)
        try:
            key = await asyncio.wait_for(asyncio.shield(task), UNKNOWN_KID_WAIT_SECONDS)
        except TimeoutError as ex:
            raise KeysUnavailable(
                self.name,
                f"key of kid {kid} not fetched within {UNKNOWN_KID_WAIT_SECONDS:g}s",
            ) from ex
        except FetchError as ex:
            raise KeysUnavailable(self.name, f"key of kid {kid}: {ex}") from ex
        if key is None:
            raise Denied(Reason.UNKNOWN_KID, "the ALB key endpoint does not know this kid")
        return key

    async def refresh(self) -> bool:
        """Nothing to fetch ahead of time: keys come per kid, when a token names one."""
        return True

    async def run(self) -> None:
        """Nothing to refresh in the background; waits until cancelled like the others."""
        await asyncio.get_running_loop().create_future()

    def _start_fetch(self, kid: str, client: str) -> asyncio.Task[VerifyKey | None]:
        now = self.clock.monotonic()
        if now < self._unknown.get(kid, -float("inf")):
            raise Denied(Reason.UNKNOWN_KID, "unknown kid (the endpoint said so recently)")
        window = self.config.refetch_cooldown_seconds
        client = _client_key(client)
        mine = self._by_client.pop(client, None) or deque()
        self._by_client[client] = mine  # the most recently active last
        while len(self._by_client) > ALB_MAX_CLIENTS:
            self._by_client.popitem(last=False)
        for recent in (self._recent, mine):
            while recent and now - recent[0] >= window:
                recent.popleft()
        for recent, limit, whose in (
            (mine, ALB_MAX_NEW_KIDS, "this client's"),
            (self._recent, ALB_MAX_NEW_KIDS_IN_ALL, "all clients'"),
        ):
            if len(recent) >= limit:
                raise Denied(
                    Reason.UNKNOWN_KID,
                    f"unknown kid, not fetched: rate limit of {limit} key fetches per "
                    f"{window:g}s ({whose}) reached",
                )
        self._recent.append(now)
        mine.append(now)
        log.info("keys_refetch", issuer=self.name, trigger="unknown_kid", kid=kid)
        task = asyncio.get_running_loop().create_task(self._fetch(kid))
        self._inflight[kid] = task
        task.add_done_callback(functools.partial(self._fetch_done, kid))
        return task

    def _fetch_done(self, kid: str, task: asyncio.Task[VerifyKey | None]) -> None:
        del self._inflight[kid]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have given up on it

    async def _fetch(self, kid: str) -> VerifyKey | None:
        try:
            fetched = await self.source.fetch(kid)
            key = parse_alb_key(kid, fetched.body) if fetched.status == 200 else None
        except Exception as ex:
            self.fetches["error"] += 1
            self.last_error = f"kid {kid}: " + (
                str(ex) if isinstance(ex, FetchError) else f"bug: {ex!r}"
            )
            self._observe(ok=False)
            log.warning(
                "keys_fetch_failed",
                exc_info=not isinstance(ex, FetchError),
                issuer=self.name,
                source=self.config.key_source,
                error=self.last_error,
            )
            raise FetchError(self.last_error) from ex
        now = self.clock.monotonic()
        self._fetched_at, self.last_error = now, None
        self._observe(ok=True)
        if key is None:
            self.fetches["unknown"] += 1
            # Expired entries go first: with the rate limit, at most a window's worth stay.
            self._unknown = {k: t for k, t in self._unknown.items() if t > now}
            self._unknown[kid] = now + self.config.refetch_cooldown_seconds
            log.info("keys_unknown_kid", issuer=self.name, kid=kid, status=fetched.status)
            return None
        self.fetches["ok"] += 1
        self._unknown.pop(kid, None)
        self._keys[kid] = key
        evicted = None
        if len(self._keys) > ALB_MAX_KEYS:
            evicted, _ = self._keys.popitem(last=False)
            self.generation += 1
        log.info(
            "keys_fetched",
            issuer=self.name,
            source=self.config.key_source,
            kids=[kid],
            evicted=evicted,
            known=len(self._keys),
        )
        return key

    def _observe(self, *, ok: bool) -> None:
        if self.on_fetch is not None:
            self.on_fetch(self, ok)


def _client_key(client: str) -> str:
    """Whose budget a fetch counts against: an IPv4 address, or an IPv6 address's /64 (one
    host commonly holds a whole /64); anything else as it is."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class KeyStore:
    """Every configured issuer's keys, by issuer *name*; owns the background tasks.

    By name, not by ``iss``: two issuers may share an ``iss`` (an ALB and the OpenID
    provider behind it) with their own key sources and token sources.
    """

    def __init__(self, issuers: Iterable[KeySet]) -> None:
        self.issuers: dict[str, KeySet] = {}
        for keys in issuers:
            if keys.name in self.issuers:
                raise ValueError(f"two key sets for the issuer named {keys.name!r}")
            self.issuers[keys.name] = keys
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_config(
        cls,
        configs: tuple[IssuerConfig, ...],
        client: httpx.AsyncClient,
        clock: Clock,
        on_fetch: FetchObserver | None = None,
        *,
        reuse: KeyStore | None = None,
    ) -> KeyStore:
        """Key sets for ``configs``, each from its provider's kind of source; with ``reuse``,
        an issuer with the same name, provider, ``iss`` and key source as before keeps its
        loaded keys (a reload must not forget keys it cannot fetch again). Keys are never
        carried over to another ``iss``: discovery vouched for them for the old one."""

        def source(c: IssuerConfig) -> KeySource:
            if c.jwks_file is not None:
                return FileSource(c.jwks_file)
            if c.discovery_url is not None:
                return DiscoverySource(client, c.discovery_url, c.issuer, c.fetch_timeout_seconds)
            assert c.jwks_url is not None  # config guarantees exactly one
            return HttpSource(client, c.jwks_url, c.fetch_timeout_seconds)

        def keys_for(c: IssuerConfig) -> KeySet:
            old = reuse.get(c.name) if reuse is not None else None
            same = old is not None and (
                (old.config.provider, old.config.issuer, old.config.key_source)
                == (c.provider, c.issuer, c.key_source)
            )
            if c.alb_keys_url is not None:
                alb = AlbSource(client, c.alb_keys_url, c.fetch_timeout_seconds)
                if not (same and isinstance(old, AlbKeys)):
                    return AlbKeys(c, alb, clock, on_fetch)
                if old.config != c:  # same keys, other settings (timeouts, cooldown, ...)
                    old.reconfigure(c, alb)
                return old
            if not (same and isinstance(old, IssuerKeys)):
                return IssuerKeys(c, source(c), clock, on_fetch)
            if old.config != c:  # same keys, other settings (timeouts, algorithms, ...)
                old.reconfigure(c, source(c))
            return old

        return cls(keys_for(c) for c in configs)

    def get(self, name: str) -> KeySet | None:
        """The keys of the issuer configured as ``name`` (``IssuerConfig.name``)."""
        return self.issuers.get(name)

    def ready(self) -> bool:
        return all(k.usable() for k in self.issuers.values())

    async def start(self) -> None:
        """Fetch every key set once (each bounded by its timeout), then refresh in the background.

        Returns once every first fetch has finished, successfully or not: a key
        endpoint that is down at boot leaves authd running and not ready.
        """
        await asyncio.gather(*(k.refresh() for k in self.issuers.values()))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(k.run()) for k in self.issuers.values()]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
