"""get-identity enrichment: a Cloudflare Access user's full identity, fetched once per session.

A Cloudflare token carries the email and, at best, a trimmed group list. The team's get-identity
endpoint answers the whole identity (every group, the identity provider, ``amr``, device posture)
when asked with the token as the ``CF_Authorization`` cookie. :class:`IdentityCache` asks, parses
the answer into an :class:`Identity` and keeps it:

- per ``identity_nonce`` (the session whose identity Cloudflare serves; it does not change within
  the session), or per token (its full SHA-256) when the token has no nonce;
- never past the ``exp`` of the token that fetched it, nor past the ``exp`` of the token reading it;
- in an LRU bounded by entries and by estimated bytes; failures are never kept;
- with one fetch in flight per key, shared by every request that wants it.

Every answer, fresh or cached, must be about the token that reads it (its email and ``user_uuid``
against the token's ``email`` and ``sub``): whatever a cache or a shared fetch holds, a request
never gets another user's groups or posture.

The token is a credential: it goes into exactly one place, the Cookie header of the fetch. It is
never logged, never put into an exception, and refused before sending if it is not a plain cookie
value (an HTTP library's error about an illegal header value would quote it).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import types
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

import httpx
import structlog

from authd import fetch
from authd.claims import lookup
from authd.config import ascii_lower, url_problem
from authd.errors import AuthdError, BodyTooLarge, FetchError

if TYPE_CHECKING:
    from authd.claims import Claims
    from authd.keys import Clock

log = structlog.get_logger("authd.enrich")

COOKIE_NAME = "CF_Authorization"
# A real answer is a few KiB; a user in a few thousand groups stays well below this.
MAX_IDENTITY_BYTES = 256 * 1024
DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
# How long an answer is reused at most, whatever the token's exp: Cloudflare re-checks device
# posture during a session. authd passes [cache] max_seconds.
DEFAULT_MAX_SECONDS = 300.0
# What one cache entry is counted as: a fixed part (key, entry, Identity, its tuples) plus a
# multiple of the body's length. tracemalloc puts the parsed JSON at 4-5.5 bytes per body byte
# (documented shape, 3 to 500 groups); the Group/PostureCheck objects come on top.
ENTRY_OVERHEAD_BYTES = 2048
BYTES_PER_BODY_BYTE = 6

# How a fetch ended: the label values of authd_enrichment_fetches_total{result}.
FETCH_RESULTS = (
    "ok",
    "timeout",  # no complete answer within the issuer's get_identity_timeout_seconds
    "http_error",  # any status but 200 (Cloudflare answers a bad token with 4xx; a redirect)
    "transport",  # connection refused/reset, TLS, a protocol error; or authd refused to send
    "too_large",  # over MAX_IDENTITY_BYTES
    "bad_response",  # not a JSON object
    "mismatch",  # an answer about another user than the token's
)

# A JWT is base64url segments and dots; anything else has no business in a Cookie header.
_COOKIE_VALUE = re.compile(r"[A-Za-z0-9_.=-]+")
# Every status but 200 comes back as a value (no body read) and is judged here, not by text.
_NOT_200 = frozenset(range(1000)) - {200}

CacheKey: TypeAlias = tuple[str, str | bytes]  # (url, identity_nonce or the token's SHA-256)


class EnrichmentFailed(AuthdError):  # noqa: N818 -- an outcome with a result code, as Denied
    """get-identity gave no usable answer.

    ``result`` is one of :data:`FETCH_RESULTS` but "ok" (a metrics label and an audit field);
    ``detail`` says more, for the log only. Neither ever holds the token.
    """

    def __init__(self, result: str, detail: str) -> None:
        super().__init__(f"get-identity {result}: {detail}")
        self.result = result
        self.detail = detail

    def __repr__(self) -> str:
        return f"EnrichmentFailed({self.result!r}, {self.detail!r})"


@dataclass(frozen=True, slots=True)
class Group:
    """One group of the user: either ``id`` or ``name`` may be "" (never both)."""

    id: str
    name: str


@dataclass(frozen=True, slots=True)
class PostureCheck:
    """One device posture rule's result; ``id`` is the rule's key in ``devicePosture``."""

    id: str
    name: str  # the rule's rule_name, or ""
    type: str  # disk_encryption, firewall, os_version, ... or ""
    success: bool  # True only when the answer said JSON true


@dataclass(frozen=True, slots=True)
class Identity:
    """A parsed get-identity answer: the whole document, and the parts policies read.

    ``document`` is read-only at the top level; nested values are shared by every request that
    reads this identity from the cache, so callers must not change them.
    """

    document: Mapping[str, object]
    groups: tuple[Group, ...] = ()
    posture: tuple[PostureCheck, ...] = ()
    idp_type: str | None = None
    amr: tuple[str, ...] = ()
    _refs: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Read on every request a group rule sees: built once per fetched identity.
        refs = frozenset(r for g in self.groups for r in (g.id, g.name) if r)
        object.__setattr__(self, "_refs", refs)

    def group_refs(self) -> frozenset[str]:
        """Every group's name and id (the non-empty ones): what ``allow_groups`` matches."""
        return self._refs

    def group_names(self) -> tuple[str, ...]:
        """Each group's name, or its id when it has none, in the answer's order."""
        return tuple(g.name or g.id for g in self.groups)

    def posture_passed(self, ref: str) -> bool:
        """Whether the posture check ``ref`` (a rule id or name, exactly) passed.

        True only when at least one check matches and every matching check succeeded: two
        rules that share a name must both pass, and a rule the answer lacks has not passed.
        """
        matching = [c for c in self.posture if ref and ref in (c.id, c.name)]
        return bool(matching) and all(c.success for c in matching)

    def passed_posture_names(self) -> tuple[str, ...]:
        """Each check that passed, in the answer's order: by its name when that name has
        passed as :meth:`posture_passed` judges it (every check of the name passed), else
        by its id if that has, else not at all. Nothing listed here is a rule that
        ``require_posture`` would judge failed (per-OS rules often share a name)."""
        listed: dict[str, None] = {}
        for c in self.posture:
            if not c.success:
                continue
            for ref in (c.name, c.id):
                if ref and self.posture_passed(ref):
                    listed[ref] = None
                    break
        return tuple(listed)

    def get(self, path: str) -> object | None:
        """A member of the document by name; a dotted name walks nested objects."""
        return lookup(self.document, path)


def parse_identity(body: bytes) -> Identity:
    """Read a get-identity answer; :class:`EnrichmentFailed` ("bad_response") unless it is a
    JSON object.

    Optional members of the wrong shape count as absent (a group that is not an object, an
    ``amr`` that is not a list); a posture check counts as passed only when its ``success`` is
    JSON ``true``, so any doubt about a check reads as "not passed".
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as ex:  # UnicodeDecodeError is a ValueError
        raise EnrichmentFailed("bad_response", f"not JSON ({type(ex).__name__})") from ex
    if not isinstance(doc, dict):
        raise EnrichmentFailed("bad_response", f"not a JSON object but {type(doc).__name__}")
    idp = doc.get("idp")
    idp_type = idp.get("type") if isinstance(idp, dict) else None
    amr = doc.get("amr")
    return Identity(
        document=types.MappingProxyType(doc),
        groups=_groups(doc.get("groups")),
        posture=_posture(doc.get("devicePosture")),
        idp_type=idp_type if isinstance(idp_type, str) and idp_type else None,
        amr=tuple(a for a in amr if isinstance(a, str) and a) if isinstance(amr, list) else (),
    )


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _groups(value: object) -> tuple[Group, ...]:
    if not isinstance(value, list):
        return ()
    groups = (Group(_str(g.get("id")), _str(g.get("name"))) for g in value if isinstance(g, dict))
    return tuple(g for g in groups if g.id or g.name)


def _posture(value: object) -> tuple[PostureCheck, ...]:
    if not isinstance(value, dict):
        return ()
    checks: list[PostureCheck] = []
    for rule_id, check in value.items():
        if not isinstance(check, dict):
            # A rule named in the answer without a readable result: a check that did not pass.
            checks.append(PostureCheck(rule_id, "", "", success=False))
            continue
        own_id = check.get("id", rule_id)
        checks.append(
            PostureCheck(
                id=rule_id,
                name=_str(check.get("rule_name")),
                type=_str(check.get("type")),
                # An entry whose own id names another rule is ambiguous: it passes nothing.
                success=check.get("success") is True and own_id == rule_id,
            )
        )
    return tuple(c for c in checks if c.id or c.name)


@dataclass(frozen=True, slots=True)
class Enriched:
    """An identity for one request, and whether it came from the cache (for the audit line)."""

    identity: Identity
    cached: bool
    # Wall-clock time after which this answer must not be reused (the token's exp, or
    # max_seconds after it was fetched): an allow made from it must not outlive it either.
    until: float = float("inf")


@dataclass(frozen=True, slots=True)
class _Entry:
    identity: Identity
    # The fetching token's exp, or max_seconds after the fetch if that comes first: the
    # entry is never used at or past it (device posture may change within a session).
    exp: float
    size: int


# Outcome of one shared fetch: failures travel as values, so every waiter raises its own.
_Outcome: TypeAlias = Identity | EnrichmentFailed


class IdentityCache:
    """get-identity answers for one configuration generation: fetched, checked, and kept.

    One per :class:`~authd.decision.Authorizer`: a reload starts with an empty cache. The state
    is per process; with several workers, each fetches and caches on its own.
    """

    def __init__(  # noqa: PLR0913 -- collaborators and bounds, all keywords but the first two
        self,
        client: httpx.AsyncClient | None,
        clock: Clock,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_seconds: float = DEFAULT_MAX_SECONDS,
        on_fetch: Callable[[str], None] | None = None,
        on_hit: Callable[[], None] | None = None,
    ) -> None:
        self.client = client  # None: no network (every fetch fails as "transport")
        self.clock = clock
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.on_fetch = on_fetch
        self.on_hit = on_hit
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._inflight: dict[CacheKey, asyncio.Task[_Outcome]] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def identity(
        self,
        url: str,
        seconds: float,
        token: str,
        claims: Claims,
        digest: bytes,
    ) -> Enriched:
        """The identity behind ``token`` from get-identity at ``url`` (cached, or fetched within
        ``seconds``), or :class:`EnrichmentFailed`.

        ``claims`` must be the token's verified claims with their payload (the nonce is read
        there); ``digest`` is the token's full SHA-256.
        """
        key: CacheKey = (url, _nonce(claims) or digest)
        entry = self._entries.get(key)
        if entry is not None:
            now = self.clock.time()
            if now < entry.exp and now < claims.exp:
                self._entries.move_to_end(key)
                _check_subject(entry.identity, claims)
                if self.on_hit is not None:
                    self.on_hit()
                return Enriched(entry.identity, cached=True, until=entry.exp)
            if now >= entry.exp:
                self._drop(key)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._fetch(key, url, seconds, token, claims)
            )
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._fetch_done, key))
        # Shielded: a request that gives up (nginx hung up, a caller's timeout) leaves the
        # fetch running for the others that wait for it.
        outcome = await asyncio.shield(task)
        if isinstance(outcome, EnrichmentFailed):
            raise EnrichmentFailed(outcome.result, outcome.detail)
        _check_subject(outcome, claims)  # a waiter's token may differ from the fetcher's
        return Enriched(
            outcome,
            cached=False,
            until=min(claims.exp, self.clock.time() + self.max_seconds),
        )

    async def _fetch(
        self, key: CacheKey, url: str, seconds: float, token: str, claims: Claims
    ) -> _Outcome:
        try:
            identity, body_size = await self._get(url, seconds, token)
            _check_subject(identity, claims)
        except EnrichmentFailed as ex:
            self._observe(ex.result)
            log.warning(
                "get_identity_failed",
                issuer=claims.issuer_name,
                url=url,
                result=ex.result,
                error=ex.detail,
            )
            return ex
        self._observe("ok")
        self._store(key, identity, min(claims.exp, self.clock.time() + self.max_seconds), body_size)
        return identity

    async def _get(self, url: str, seconds: float, token: str) -> tuple[Identity, int]:
        if self.client is None:
            raise EnrichmentFailed("transport", "no HTTP client: authd runs without network here")
        problem = url_problem(url)
        if problem is not None:  # config refuses these already; never send a token there
            raise EnrichmentFailed("transport", f"refused to fetch {url!r}: {problem}")
        if not _COOKIE_VALUE.fullmatch(token):
            raise EnrichmentFailed("transport", "the token is not a plain cookie value; not sent")
        try:
            fetched = await fetch.get(
                self.client,
                url,
                seconds,
                headers={"Cookie": f"{COOKIE_NAME}={token}"},
                max_bytes=MAX_IDENTITY_BYTES,
                accept_status=_NOT_200,
            )
        except FetchError as ex:
            raise EnrichmentFailed(_classify(ex), str(ex)) from ex
        finally:
            # authd's client keeps no cookies (fetch.make_http_client); another client might,
            # and a cookie this answer set, a credential perhaps, must not ride along later.
            self.client.cookies.clear()
        if fetched.status != 200:
            refused = " (redirects are refused)" if 300 <= fetched.status < 400 else ""
            raise EnrichmentFailed("http_error", f"HTTP {fetched.status}{refused}")
        return parse_identity(fetched.body), len(fetched.body)

    def _fetch_done(self, key: CacheKey, task: asyncio.Task[_Outcome]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled() and (ex := task.exception()) is not None:
            # A bug: the waiters get it raised (and fail closed); log it once, here, in case
            # none is left to.
            log.error("get_identity_bug", exc_info=ex)

    def _observe(self, result: str) -> None:
        if self.on_fetch is not None:
            self.on_fetch(result)

    def _store(self, key: CacheKey, identity: Identity, exp: float, body_size: int) -> None:
        size = ENTRY_OVERHEAD_BYTES + BYTES_PER_BODY_BYTE * body_size
        if self.clock.time() >= exp or size > self.max_bytes or self.max_entries < 1:
            return  # it could never be read, or never fit
        if key in self._entries:
            self._drop(key)
        self._entries[key] = _Entry(identity, exp, size)
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.size

    def _drop(self, key: CacheKey) -> None:
        self.bytes -= self._entries.pop(key).size


def _nonce(claims: Claims) -> str | None:
    nonce = claims.payload.get("identity_nonce")
    return nonce if isinstance(nonce, str) and nonce else None


def _check_subject(identity: Identity, claims: Claims) -> None:
    """Refuse an answer about someone else than the token's user (email, then user_uuid/sub)."""
    email = identity.document.get("email")
    if (
        isinstance(email, str)
        and email
        and claims.email
        and ascii_lower(email) != ascii_lower(claims.email)
    ):
        raise EnrichmentFailed("mismatch", "the answer's email is not the token's")
    user_uuid = identity.document.get("user_uuid")
    if isinstance(user_uuid, str) and user_uuid and claims.sub and user_uuid != claims.sub:
        raise EnrichmentFailed("mismatch", "the answer's user_uuid is not the token's sub")


def _classify(ex: FetchError) -> str:
    """The result of a failed fetch, told by the exception it came from."""
    cause = ex.__cause__
    if isinstance(cause, TimeoutError | httpx.TimeoutException):
        return "timeout"
    if isinstance(ex, BodyTooLarge):
        return "too_large"
    return "transport"
