"""The key store: each issuer's public keys in memory, refreshed in the background.

PyJWT's ``PyJWKClient`` is the wrong shape for a daemon (blocking fetches, a cache
cleared when a fetch fails, a refetch for every unknown ``kid``), so this module keeps
its own: the request path only ever reads a dict; fetches happen in one background
task per issuer; an unknown ``kid`` triggers at most one refetch per cooldown, shared
by every request that waits for it; a failed fetch keeps the last good set until it
is too stale to trust.

JWK parsing uses PyJWT's algorithm classes (``from_jwk``); everything else about a
fetched document (what to drop, what counts as a duplicate) is decided here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeAlias

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.exceptions import InvalidKeyError

from authd import fetch
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


# Told about every fetch's outcome (the metrics listen here).
FetchObserver: TypeAlias = "Callable[[IssuerKeys, bool], None]"


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

    async def key_for(self, kid: str) -> VerifyKey:
        """The key named ``kid``; an unknown kid may trigger one shared, rate-limited refetch.

        Raises :class:`KeysUnavailable` when there is no usable key set at all, and
        ``Denied(unknown_kid)`` when the kid stays unknown.
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


class KeyStore:
    """Every configured issuer's keys, by issuer URL; owns the background tasks."""

    def __init__(self, issuers: Mapping[str, IssuerKeys]) -> None:
        self.issuers = dict(issuers)
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
        """Key sets for ``configs``; with ``reuse``, an issuer configured exactly as before
        keeps its loaded keys (a reload must not forget keys it cannot fetch again)."""

        def source(c: IssuerConfig) -> KeySource:
            if c.jwks_file is not None:
                return FileSource(c.jwks_file)
            assert c.jwks_url is not None  # config guarantees exactly one
            return HttpSource(client, c.jwks_url, c.fetch_timeout_seconds)

        def keys_for(c: IssuerConfig) -> IssuerKeys:
            old = reuse.get(c.issuer) if reuse is not None else None
            if old is None or old.config.key_source != c.key_source:
                return IssuerKeys(c, source(c), clock, on_fetch)
            if old.config != c:  # same keys, other settings (timeouts, algorithms, ...)
                old.reconfigure(c, source(c))
            return old

        return cls({c.issuer: keys_for(c) for c in configs})

    def get(self, iss: str) -> IssuerKeys | None:
        return self.issuers.get(iss)

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
