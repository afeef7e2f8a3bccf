"""The HTTP edges of a decision: the token in, the request facts, the identity headers out."""

from __future__ import annotations

import hashlib
import json
import re
import string
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol, TypeAlias

from authd.claims import lookup
from authd.config import DEFAULT_HEADER_NAMES
from authd.errors import Denied, Reason
from authd.verify import MAX_TOKEN_BYTES

if TYPE_CHECKING:
    from authd.claims import Claims
    from authd.config import TokenSource
    from authd.enrich import Identity
    from authd.policy import Policy

MAX_HEADER_VALUE_BYTES = 2048
# The auth response must fit nginx's proxy_buffer_size (one page, 4 KiB) with room for
# the status line and the other headers.
MAX_IDENTITY_BYTES = 3072
MAX_FACT_LENGTH = 256
MAX_URI_LENGTH = 1024

# Printable ASCII stays as it is, except "%" (the escape character itself) and, inside
# list headers, "," (the separator). Everything else is percent-encoded as UTF-8.
_SAFE = "".join(sorted(set(string.punctuation + " ") - set("%")))
_SAFE_IN_LIST = _SAFE.replace(",", "")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_EDGE_BLANKS = re.compile(r"^ +| +$")
_UNSAFE_FACT = re.compile(r"[^\x20-\x7e]")
# HTTP's optional whitespace around a value (RFC 9110 5.6.3): only SP and HTAB. str.strip()
# would also drop \n, \x0b, \x1c-\x1f, \x85 and \xa0, accepting a token with junk at its ends.
_OWS = " \t"
# A JWT-shaped run (two dot-joined base64url segments): never let one reach the log. Matched
# from the start of a base64url run only, without backtracking: linear in the input (a plain
# [...]{8,}\. retries from every position of a long run: 0.3 s for an 8 KiB request line).
# A dot may also arrive percent-encoded (%2E): the segments it joins are the token's all the same.
_DOT = r"(?:\.|%2[Ee])"
# Every further dotted segment goes with it: tokens glued together, or junk glued to one, must
# not leave a signature behind once three segments are taken.
_JWT_LIKE = re.compile(
    rf"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{{8,}}+{_DOT}[A-Za-z0-9_-]{{8,}}+(?:{_DOT}[A-Za-z0-9_-]*+)*+"
)
# In the other facts (a host name may well look like two dotted runs): a run holding a JSON
# segment, as every JWT header and payload is (base64url of '{"' is "eyJ"), whole, with every
# segment that follows it (joined by a dot, or in a path by "/": a signature alone is still a
# piece of the token). Anchored at the start of a run, so each run is scanned once.
_JSON_SEGMENTS = re.compile(
    rf"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]*?eyJ[A-Za-z0-9_-]{{8,}}+"
    rf"(?:{_DOT}[A-Za-z0-9_-]*+|/[A-Za-z0-9_-]{{16,}}+)*+"
)


class RequestHeaders(Protocol):
    """The two things authd reads from a request (Falcon's ``Request`` provides both)."""

    def get_header(self, name: str) -> str | None: ...


class Found(NamedTuple):
    """The one token a request carries, and every source it arrived in (a tuple: built on
    every request, where a frozen dataclass costs half a microsecond more)."""

    token: str
    sources: tuple[TokenSource, ...]


def find_token(sources: Iterable[TokenSource], req: RequestHeaders) -> Found:
    """The one token the request carries, from any of ``sources``; or ``Denied``.

    Every source is read: a header and a cookie that carry different tokens, or a
    header repeated with different values, are ambiguous and refused. Empty values
    count as absent.
    """
    candidates: set[str] = set()
    found_in: list[TokenSource] = []
    for source in sources:
        values = _from_source(source, req)
        if values:
            candidates.update(values)
            found_in.append(source)
    if any(len(c) > MAX_TOKEN_BYTES for c in candidates):
        raise Denied(Reason.TOKEN_TOO_LARGE, f"a token is over {MAX_TOKEN_BYTES} bytes")
    if not candidates:
        raise Denied(Reason.NO_TOKEN)
    if len(candidates) > 1:
        raise Denied(Reason.AMBIGUOUS_TOKEN, f"{len(candidates)} different tokens")
    return Found(candidates.pop(), tuple(found_in))


def extract_token(sources: Iterable[TokenSource], req: RequestHeaders) -> str:
    """The token of :func:`find_token`, without where it came from."""
    return find_token(sources, req).token


def _from_source(source: TokenSource, req: RequestHeaders) -> list[str]:
    if source.kind == "cookie":
        return _cookie_values(req.get_header("Cookie") or "", source.name)
    raw = req.get_header("Authorization" if source.kind == "bearer" else source.name) or ""
    # Repeated headers arrive joined by ","; a JWT never contains one.
    values = [v.strip(_OWS) for v in raw.split(",")]
    if source.kind == "bearer":
        values = [
            v[7:].strip(_OWS) for v in values if v[:7].lower() == "bearer " and v[7:].strip(_OWS)
        ]
    return [v for v in values if v]


def _cookie_values(header: str, name: str) -> list[str]:
    # By hand rather than with http.cookies or Falcon's parser: repeated Cookie headers
    # arrive joined by "," (which neither splits on), and every same-named cookie must
    # be seen, not just the first or the last.
    values = []
    for pair in re.split(r"[;,]", header):
        key, sep, value = pair.partition("=")
        if sep and key.strip(_OWS) == name:
            value = value.strip(_OWS)
            if len(value) >= 2 and value[0] == value[-1] == '"':
                # Blanks inside the quotes are as foreign to a token as outside (RFC 6265
                # allows none): every token authd reads has none at its ends.
                value = value[1:-1].strip(_OWS)
            if value:
                values.append(value)
    return values


def token_digest(token: str) -> bytes:
    """The token's SHA-256: the decision cache's key (whole), the audit fingerprint's source."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def token_id(digest: bytes) -> str:
    """A short fingerprint of a token (from its digest) for the audit log; never a key."""
    return digest.hex()[:16]


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What nginx tells authd about the original request: logged, never decisive."""

    method: str
    uri: str
    host: str
    client_ip: str
    request_id: str

    @classmethod
    def from_request(cls, req: RequestHeaders, method: str) -> RequestFacts:
        return cls(
            method=_fact(req.get_header("X-Original-Method") or method),
            uri=redact_uri(req.get_header("X-Original-URI") or ""),
            host=_fact(req.get_header("Host") or ""),
            client_ip=_fact(req.get_header("X-Real-IP") or ""),
            request_id=_fact(req.get_header("X-Request-ID") or ""),
        )


def _fact(value: str, limit: int = MAX_FACT_LENGTH) -> str:
    if value.isascii() and value.isprintable() and "eyJ" not in value:
        return value[:limit]  # the usual case, and exactly the case the regexes leave alone
    # Redacted before the cut, so that no piece of a token survives it.
    return _UNSAFE_FACT.sub("?", _JSON_SEGMENTS.sub("[redacted]", value[: 16 * limit])[:limit])


def redact_uri(uri: str) -> str:
    """The path of ``uri`` with every query value redacted (tokens travel in query strings)."""
    path, sep, query = uri.partition("?")
    # Bounded work whatever the length (the result is cut to MAX_URI_LENGTH anyway): the
    # path's first 16 KiB, the query's first 256 parameters (the rest is one, redacted).
    path = _JWT_LIKE.sub("[redacted]", path[: 16 * MAX_URI_LENGTH])
    if sep:
        names = (part.partition("=") for part in query.split("&", 256))
        query = "&".join(
            f"{_fact(name, 64)}=[redacted]" if eq else "[redacted]" for name, eq, _ in names
        )
    return _fact(path + sep + query, MAX_URI_LENGTH)


def encode_value(value: str, *, in_list: bool = False) -> str:
    """Make an identity value safe for an HTTP header: plain ASCII, or ``Denied``.

    Control characters deny the request (they never reach the HTTP layer); other
    bytes outside printable ASCII, and ``%`` (and ``,`` in a list), are percent-encoded
    as UTF-8, so ``José`` becomes ``Jos%C3%A9``.
    """
    if _CONTROL.search(value):
        raise Denied(Reason.UNSAFE_CLAIM_VALUE, "control character in an identity value")
    if value.isascii() and "%" not in value and not (in_list and "," in value):
        encoded = value
    else:
        try:
            encoded = urllib.parse.quote(value, safe=_SAFE_IN_LIST if in_list else _SAFE)
        except UnicodeEncodeError as ex:  # lone surrogates from "\ud800" escapes in JSON
            raise Denied(Reason.UNSAFE_CLAIM_VALUE, "identity value is not valid Unicode") from ex
    # HTTP strips leading and trailing blanks from a header value; keep them visible.
    if encoded[:1] == " " or encoded[-1:] == " ":
        encoded = _EDGE_BLANKS.sub(lambda m: "%20" * len(m.group()), encoded)
    if len(encoded) > MAX_HEADER_VALUE_BYTES:
        raise Denied(Reason.UNSAFE_CLAIM_VALUE, f"identity value over {MAX_HEADER_VALUE_BYTES} B")
    return encoded


def render_claim(value: object) -> str:
    """One claim as header text: scalars as they are, lists comma-joined, objects as JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return encode_value(value)
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return ",".join(
            encode_value(v if isinstance(v, str) else _json(v), in_list=True) for v in value
        )
    return encode_value(_json(value))


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


GROUPS_HEADER = "X-Authd-Groups"

# A header's value from the verified claims, the policy, and get-identity's answer (None
# when the policy does not enrich this token, or enrichment failed and the policy allows that).
Getter: TypeAlias = "Callable[[Claims, Policy, Identity | None], object]"

_DEFAULT_GETTERS: dict[str, Getter] = {
    "X-Authd-User": lambda c, _, __: c.user,
    "X-Authd-Email": lambda c, _, __: c.email,
    "X-Authd-Sub": lambda c, _, __: c.sub,
    "X-Authd-Groups": lambda c, p, i: list(p.groups(c, i)),
    "X-Authd-Country": lambda c, _, __: c.get("country"),
    "X-Authd-Service-Token": lambda c, _, __: c.service_token,
    "X-Authd-Policy": lambda _, p, __: p.name,
    "X-Authd-Issuer": lambda c, _, __: c.issuer_name,
    "X-Authd-Posture": lambda _, __, i: None if i is None else list(i.passed_posture_names()),
}
assert tuple(_DEFAULT_GETTERS) == DEFAULT_HEADER_NAMES


@dataclass(frozen=True, slots=True)
class HeaderPlan:
    """The identity headers of one policy, compiled once: (name, how to get the value)."""

    policy: Policy
    getters: tuple[tuple[str, Getter], ...]

    @classmethod
    def for_policy(cls, policy: Policy) -> HeaderPlan:
        c = policy.config
        custom: list[tuple[str, Getter]] = [
            *((name, _claim_getter(claim)) for name, claim in c.headers),
            *((name, _identity_getter(field)) for name, field in c.identity_headers),
            *((name, _posture_getter(rule)) for name, rule in c.posture_headers),
        ]
        return cls(policy, (*_DEFAULT_GETTERS.items(), *custom))

    def render(
        self,
        claims: Claims,
        identity: Identity | None = None,
        *,
        omit: str = "",
    ) -> tuple[tuple[str, str], ...]:
        """The headers for an allow; ``Denied(unsafe_claim_value)`` if a value cannot be sent.

        Headers filled from get-identity are left out when ``identity`` is None; the header
        named ``omit`` is left out too.
        """
        out = []
        total = 0
        for name, getter in self.getters:
            if name == omit:
                continue
            value = render_claim(getter(claims, self.policy, identity))
            if value:
                out.append((name, value))
                total += len(name) + len(value) + 4
        if total > MAX_IDENTITY_BYTES:
            raise Denied(Reason.UNSAFE_CLAIM_VALUE, f"identity headers over {MAX_IDENTITY_BYTES} B")
        return tuple(out)

    def render_enriched(
        self,
        claims: Claims,
        identity: Identity,
    ) -> tuple[tuple[tuple[str, str], ...], str]:
        """As :meth:`render`, and a note for the audit line when the full group list from
        get-identity could not be sent (too long for nginx's buffer, or unsafe): then
        ``X-Authd-Groups`` is left out, never cut short. The policy was decided on the full
        list; the token was valid, so its user is not refused for the length of a header."""
        try:
            return self.render(claims, identity), ""
        except Denied as ex:
            if ex.reason is not Reason.UNSAFE_CLAIM_VALUE:
                raise
            headers = self.render(claims, identity, omit=GROUPS_HEADER)  # or the same Denied
            return headers, f"{GROUPS_HEADER} left out ({len(identity.groups)} groups): {ex.detail}"


def _claim_getter(claim: str) -> Getter:
    return lambda c, _, __: lookup(c.payload, claim)


def _identity_getter(field: str) -> Getter:
    return lambda _, __, i: None if i is None else i.get(field)


def _posture_getter(rule: str) -> Getter:
    # "true" only for a check that passed; "false" for one that failed or is not reported
    # (the Worker tutorial's headers, each from its own rule).
    return lambda _, __, i: None if i is None else i.posture_passed(rule)
