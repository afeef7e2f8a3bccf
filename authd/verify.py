"""Token verification: a token string in, :class:`Claims` or ``Denied(reason)`` out.

The token is parsed exactly once, strictly, by this module: the size, the alphabet
and canonical base64url of each segment, JSON objects without duplicate members or
non-finite numbers, a closed set of header members. The signature check is handed
to PyJWT's algorithm objects with the algorithm taken from the *issuer's allow-list*
(never from the token alone) and a typed public key; the claim checks after it are
stricter than PyJWT's (JSON types of time claims, ``exp >= iat``, a bounded lifetime,
the token ``type``, the audience of the policy).

Several issuers may be configured, of four providers (Cloudflare Access, Google IAP,
AWS ALB, any OIDC provider). The issuer is chosen by where the token arrived (each
issuer reads its own token sources) and by its ``iss``, and then the token is verified
by that issuer's rules alone: its algorithms, its keys, its provider's header members
and claims. A token of one issuer can never satisfy another.

Security: every check here fails closed. A path that returns ``Claims`` must have
passed the signature check and every claim check.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import get_default_algorithms

from authd.claims import Claims
from authd.config import ASYMMETRIC_ALGORITHMS
from authd.errors import Denied, Reason

if TYPE_CHECKING:
    from authd.config import IssuerConfig, TokenSource
    from authd.keys import Clock, KeySet, KeyStore, VerifyKey

# Well below nginx's 8 KiB header-line limit, so that the cap, not nginx, decides; a
# Cloudflare token is kept under ~4 KiB. Checked before any decoding: a 1 MiB token
# costs hundreds of times the CPU of a normal one.
MAX_TOKEN_BYTES = 6144
MAX_LIFETIME_SECONDS = 400 * 86400  # no real token lives longer; exp = 10**30 is an attack
MAX_NUMERIC_DATE = 2**53  # the largest integer a float holds exactly; far beyond any real date
ALLOWED_HEADER_MEMBERS = frozenset({"alg", "kid", "typ"})
# Each provider's own JOSE header members, none of which names a key or changes processing:
# an ALB names its load balancer (signer), the OIDC client, and repeats iss and exp; OIDC
# providers add the key's certificate thumbprint (x5t), which is never used to find a key.
PROVIDER_HEADER_MEMBERS = {
    "cloudflare": ALLOWED_HEADER_MEMBERS,
    "google-iap": ALLOWED_HEADER_MEMBERS,
    "aws-alb": ALLOWED_HEADER_MEMBERS | {"signer", "iss", "client", "exp"},
    "oidc": ALLOWED_HEADER_MEMBERS | {"x5t", "x5t#S256"},
}
# RFC 9068 access tokens say typ "at+jwt"; only a generic OIDC issuer sends those.
PROVIDER_TYPES = {
    "cloudflare": frozenset({"JWT"}),
    "google-iap": frozenset({"JWT"}),
    "aws-alb": frozenset({"JWT"}),
    "oidc": frozenset({"JWT", "AT+JWT"}),
}

_STRUCTURE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# AWS ALB pads each segment with "=" (and only an ALB issuer may be chosen for such a token).
_PADDED_STRUCTURE = re.compile(
    r"[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]+={0,2}\.(?:[A-Za-z0-9_-]+={0,2})?",
)
_ALGORITHMS = {
    name: alg for name, alg in get_default_algorithms().items() if name in ASYMMETRIC_ALGORITHMS
}
_EC_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}


@dataclass(frozen=True, slots=True)
class Verified:
    """A verified token's claims, the key set (in its ``generation``) that verified it, and
    why its issuer was the one chosen (for ``authd verify``)."""

    claims: Claims
    keys: KeySet
    generation: int
    chosen_because: str = ""


@dataclass(frozen=True, slots=True)
class Verifier:
    """Verifies tokens against the configured issuers, their keys and a clock."""

    issuers: tuple[IssuerConfig, ...]
    keys: KeyStore
    clock: Clock
    leeway: float

    async def verify(self, token: str, audience: tuple[str, ...]) -> Claims:
        """Verify ``token`` for a policy with ``audience``; raise ``Denied`` if it is not valid.

        Raises :class:`authd.errors.KeysUnavailable` when the token names a
        configured issuer whose key set is not usable: authd cannot decide.
        """
        return (await self.verify_with_keys(token, audience)).claims

    async def verify_with_keys(
        self,
        token: str,
        audience: tuple[str, ...],
        *,
        sources: Sequence[TokenSource] | None = None,
        accepted: Sequence[IssuerConfig] | None = None,
        client: str = "",
    ) -> Verified:
        """As :meth:`verify`, and which key set verified the token, in which generation.

        ``accepted`` are the issuers the policy accepts (default: every one) and
        ``sources`` where the token arrived (default: unknown, so any issuer's place):
        the issuer is the one of those that reads a source the token came from and whose
        ``iss`` the token names. ``client`` (the address nginx saw) is whose budget a key
        fetch for a new kid counts against (:class:`authd.keys.AlbKeys`).
        """
        readers = [
            i
            for i in (self.issuers if accepted is None else accepted)
            if sources is None or any(i.reads(s) for s in sources)
        ]
        padded = any(i.provider == "aws-alb" for i in readers)
        header_b64, payload_b64, sig_b64 = split(token, padded=padded)
        header = decode_json_segment(header_b64, padded=padded)
        payload = decode_json_segment(payload_b64, padded=padded)
        issuer, why = choose_issuer(payload.get("iss"), readers, sources)
        if "=" in token and issuer.provider != "aws-alb":
            raise Denied(Reason.MALFORMED, "padded base64url (only an ALB's tokens are padded)")
        alg, kid = check_header(header, issuer)
        if issuer.provider == "aws-alb":
            check_alb_header(header, payload, audience)

        store = self.keys.get(issuer.name)
        if store is None:  # the store is built from the same config; this is a bug
            raise LookupError(f"no key store for issuer {issuer.name}")
        # Read before the key is: a set replaced while this runs must not vouch for it.
        generation = store.generation
        key = await store.key_for(kid, client)
        signing_input = f"{header_b64}.{payload_b64}".encode("ascii")  # as sent, padding and all
        check_signature(alg, key, signing_input, sig_b64, padded=padded)
        claims = self._claims(payload, issuer, kid, alg, audience)
        return Verified(claims, store, generation, why)

    def _claims(
        self,
        payload: dict[str, object],
        issuer: IssuerConfig,
        kid: str,
        alg: str,
        audience: tuple[str, ...],
    ) -> Claims:
        exp, valid_from, valid_until = check_times(payload, self.clock.time(), self.leeway)
        if issuer.provider != "aws-alb":  # an ALB token has no aud: its signer was checked
            check_audience(payload.get("aud"), audience)
        if issuer.provider == "cloudflare":
            if payload.get("type") != "app":
                # The CF_Authorization cookie also carries the global session ("org") token.
                raise Denied(Reason.BAD_TYPE, f"type {_show(payload.get('type'))}, expected 'app'")
            email, sub, service_token = identity(payload)
        else:
            email, sub = subject(payload, require_verified=issuer.require_email_verified)
            service_token = ""
            if not email and "email" in payload:
                # Unverified: no rule or header may read it from the payload either.
                payload = {k: v for k, v in payload.items() if k != "email"}
        return Claims(
            payload=types.MappingProxyType(payload),
            issuer_name=issuer.name,
            iss=issuer.issuer,
            kid=kid,
            alg=alg,
            exp=exp,
            valid_from=valid_from,
            valid_until=valid_until,
            email=email,
            sub=sub,
            service_token=service_token,
        )


def choose_issuer(
    iss: object,
    readers: Sequence[IssuerConfig],
    sources: Sequence[TokenSource] | None,
) -> tuple[IssuerConfig, str]:
    """The one issuer among ``readers`` (those reading where the token arrived) that the
    token's ``iss`` names, and why; ``Denied(bad_issuer)`` for none or more than one."""
    where = "wherever" if sources is None else " and ".join(str(s) for s in sources)
    if not readers:
        raise Denied(Reason.BAD_ISSUER, f"no issuer of this policy reads {where}")
    matches = [i for i in readers if isinstance(iss, str) and i.issuer == iss]
    if not matches:
        names = ", ".join(i.name for i in readers)
        raise Denied(
            Reason.BAD_ISSUER,
            f"iss {_show(iss)} is not the issuer of any of {names} (reading {where})",
        )
    if len(matches) > 1:
        names = " and ".join(i.name for i in matches)
        raise Denied(Reason.BAD_ISSUER, f"the token fits both {names} (it arrived in {where})")
    chosen = matches[0]
    if sources is None:
        return chosen, f"{chosen.name} ({chosen.provider}) is the policy's issuer the iss names"
    return chosen, (
        f"{chosen.name} ({chosen.provider}) reads {where} and its issuer is the token's iss"
    )


def split(token: str, *, padded: bool = False) -> tuple[str, str, str]:
    """Three base64url segments, or ``Denied``; checked before anything is decoded.

    ``padded``: the segments may end in "=" padding (an ALB's tokens).
    """
    if len(token) > MAX_TOKEN_BYTES:
        raise Denied(Reason.TOKEN_TOO_LARGE, f"{len(token)} bytes > {MAX_TOKEN_BYTES}")
    structure = _PADDED_STRUCTURE if padded else _STRUCTURE
    if not token.isascii() or not structure.fullmatch(token):
        raise Denied(
            Reason.MALFORMED,
            f"not three base64url segments ({token.count('.') + 1} dot-separated parts)",
        )
    header_b64, payload_b64, sig_b64 = token.split(".")
    if not sig_b64:
        raise Denied(Reason.BAD_SIGNATURE, "empty signature")
    return header_b64, payload_b64, sig_b64


def b64decode(segment: str, *, padded: bool = False) -> bytes:
    """Strict, canonical base64url without padding (RFC 7515 section 2); with ``padded``,
    with exactly the canonical padding or none (an ALB's tokens)."""
    bare = segment.rstrip("=") if padded else segment
    try:
        raw = base64.urlsafe_b64decode(bare + "=" * (-len(bare) % 4))
    except (binascii.Error, ValueError) as ex:
        raise Denied(Reason.MALFORMED, "bad base64url") from ex
    # Non-canonical encodings (stray bits in the last character) decode to the same
    # bytes; refuse them so one token has exactly one spelling.
    canonical = base64.urlsafe_b64encode(raw)
    spelled = segment.encode("ascii")
    if canonical.rstrip(b"=") != spelled and not (padded and canonical == spelled):
        raise Denied(Reason.MALFORMED, "non-canonical base64url")
    return raw


def decode_json_segment(segment: str, *, padded: bool = False) -> dict[str, object]:
    """A JSON object, strictly: UTF-8, no duplicate members, finite numbers only."""
    raw = b64decode(segment, padded=padded)
    try:
        value = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
        )
    except (ValueError, RecursionError) as ex:  # UnicodeDecodeError and JSONDecodeError too
        raise Denied(Reason.MALFORMED, f"segment is not valid JSON ({type(ex).__name__})") from ex
    if not isinstance(value, dict):
        raise Denied(Reason.MALFORMED, "segment is not a JSON object")
    return value


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        # Parsers disagree on which duplicate wins; the signer and we might read different claims.
        raise ValueError("duplicate member")
    return obj


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def check_header(header: dict[str, object], issuer: IssuerConfig) -> tuple[str, str]:
    """The ``alg`` and ``kid`` of a JOSE header that holds nothing else we would have to honour.

    ``jku``, ``x5u``, ``jwk``, ``x5c``, ``crit``, ``b64``, ``zip``, ``enc``, ``cty`` and
    anything else outside the provider's own members are refused: keys come only from the
    configured key source. ``alg`` must be one of the issuer's algorithms.
    """
    extra = header.keys() - PROVIDER_HEADER_MEMBERS[issuer.provider]
    if extra:
        raise Denied(Reason.BAD_HEADER, f"header members not allowed: {_show(sorted(extra))}")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in issuer.algorithms or alg not in _ALGORITHMS:
        raise Denied(
            Reason.ALG_NOT_ALLOWED,
            f"alg {_show(alg)} is not allowed for {issuer.name}",
        )
    typ = header.get("typ", "JWT")
    if not isinstance(typ, str) or typ.upper() not in PROVIDER_TYPES[issuer.provider]:
        raise Denied(Reason.BAD_HEADER, f"typ {_show(typ)}, expected JWT")
    kid = header.get("kid")
    if (
        not isinstance(kid, str)
        or not 0 < len(kid) <= 256
        or not kid.isascii()
        or not kid.isprintable()
    ):
        raise Denied(Reason.BAD_HEADER, "kid missing or not a printable ASCII string")
    return alg, kid


def check_alb_header(
    header: Mapping[str, object],
    payload: Mapping[str, object],
    audience: tuple[str, ...],
) -> None:
    """An ALB token is bound to its load balancer by the ``signer`` header member (its ARN),
    which the policy lists in ``audience``: an ALB token has no ``aud``. The header's copies
    of ``iss`` and ``exp`` must say what the payload says."""
    signer = header.get("signer")
    if not isinstance(signer, str) or not signer:
        raise Denied(Reason.BAD_HEADER, "an ALB token without a signer")
    if signer not in audience:
        raise Denied(
            Reason.BAD_AUDIENCE,
            f"signer {_show(signer)} is not this policy's ALB {_show(list(audience))}",
        )
    for name in ("iss", "exp"):
        if name in header and (
            type(header[name]) is not type(payload.get(name)) or header[name] != payload.get(name)
        ):
            raise Denied(Reason.BAD_CLAIMS, f"the header's {name} differs from the payload's")


def check_signature(
    alg: str,
    key: VerifyKey,
    signing_input: bytes,
    sig_b64: str,
    *,
    padded: bool = False,
) -> None:
    """Verify the signature with ``alg`` from the allow-list and a key fit for it."""
    if key.alg is not None and key.alg != alg:
        raise Denied(Reason.ALG_NOT_ALLOWED, f"key {key.kid[:16]} is for {_show(key.alg)} only")
    if not _key_fits(alg, key.key):
        raise Denied(Reason.ALG_NOT_ALLOWED, f"{alg} does not fit key type of {key.kid[:16]}")
    signature = b64decode(sig_b64, padded=padded)
    try:
        valid = _ALGORITHMS[alg].verify(signing_input, key.key, signature)
    except ValueError:  # e.g. an ECDSA signature of the wrong length
        valid = False
    if not valid:
        raise Denied(Reason.BAD_SIGNATURE, f"signature does not verify with kid {key.kid[:16]}")


def _key_fits(alg: str, key: object) -> bool:
    if alg.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey)
    if alg in _EC_CURVES:
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(
            key.curve,
            _EC_CURVES[alg],
        )
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False


def check_times(
    payload: Mapping[str, object],
    now: float,
    leeway: float,
) -> tuple[float, float, float]:
    """Check ``exp`` (required), ``nbf`` and ``iat`` (optional) strictly.

    Returns ``exp`` and the window of wall-clock time ``[valid_from, valid_until)`` in
    which these checks pass (the decision cache re-checks a stored allow against it).
    """
    exp = _numeric_date(payload, "exp", required=True)
    nbf = _numeric_date(payload, "nbf")
    iat = _numeric_date(payload, "iat")
    assert exp is not None
    if exp > now + MAX_LIFETIME_SECONDS:
        raise Denied(Reason.BAD_CLAIMS, f"exp is more than {MAX_LIFETIME_SECONDS}s in the future")
    if iat is not None and exp < iat:
        raise Denied(Reason.BAD_CLAIMS, "exp is before iat")
    if nbf is not None and exp < nbf:
        raise Denied(Reason.BAD_CLAIMS, "exp is before nbf")
    if exp <= now - leeway:
        raise Denied(Reason.EXPIRED, f"expired {now - exp:.0f}s ago")
    if nbf is not None and nbf > now + leeway:
        raise Denied(Reason.NOT_YET_VALID, f"nbf is {nbf - now:.0f}s in the future")
    if iat is not None and iat > now + leeway:
        raise Denied(Reason.ISSUED_IN_FUTURE, f"iat is {iat - now:.0f}s in the future")
    # Each bound is one check above solved for `now`; a test holds them equal.
    bounds = [exp - MAX_LIFETIME_SECONDS, *(t - leeway for t in (nbf, iat) if t is not None)]
    return float(exp), float(max(bounds)), float(exp + leeway)


def _numeric_date(
    payload: Mapping[str, object],
    name: str,
    *,
    required: bool = False,
) -> float | None:
    value = payload.get(name)
    if value is None:
        if required or name in payload:
            raise Denied(Reason.BAD_CLAIMS, f"{name} is missing or null")
        return None
    # bool is an int in Python, and "1700000000" is a string: neither is a NumericDate.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Denied(Reason.BAD_CLAIMS, f"{name} is not a JSON number")
    if isinstance(value, float) and not math.isfinite(value):
        raise Denied(Reason.BAD_CLAIMS, f"{name} is not finite")
    # Checked before any float conversion: float(10**400) raises OverflowError.
    if not 0 <= value <= MAX_NUMERIC_DATE:
        raise Denied(Reason.BAD_CLAIMS, f"{name} is out of range")
    return float(value)


def check_audience(aud: object, audience: tuple[str, ...]) -> None:
    """The token's ``aud`` (a string or an array of strings) must name the policy's audience."""
    tags = [aud] if isinstance(aud, str) else aud
    if not isinstance(tags, list) or not tags or not all(isinstance(t, str) for t in tags):
        raise Denied(Reason.BAD_AUDIENCE, "aud is missing or not a string or array of strings")
    if not any(t in audience for t in tags):
        raise Denied(
            Reason.BAD_AUDIENCE,
            f"aud {_show(tags)} does not include this policy's audience {_show(list(audience))}",
        )


def identity(payload: Mapping[str, object]) -> tuple[str, str, str]:
    """(email, sub, service token client id) of a user token or of a service token."""
    email = payload.get("email", "")
    sub = payload.get("sub", "")
    common_name = payload.get("common_name", "")
    if not (isinstance(email, str) and isinstance(sub, str) and isinstance(common_name, str)):
        raise Denied(Reason.BAD_CLAIMS, "email, sub and common_name must be strings")
    if common_name:
        # A service token: Cloudflare sets sub to "" and sends no email.
        if email or sub:
            raise Denied(Reason.BAD_CLAIMS, "common_name together with email or sub")
        return "", "", common_name
    if not email:
        raise Denied(Reason.BAD_CLAIMS, "neither email (user) nor common_name (service token)")
    return email, sub, ""


def subject(payload: Mapping[str, object], *, require_verified: bool = False) -> tuple[str, str]:
    """(email, sub) of a Google IAP, ALB or OIDC token: ``sub`` is required, ``email`` not.

    With ``require_verified``, an email without ``"email_verified": true`` counts as none:
    the user is known by ``sub`` and no email rule can admit them. (Amazon Cognito's
    userinfo, which an ALB passes on, says ``"true"`` as a string.)
    """
    email = payload.get("email", "")
    sub = payload.get("sub")
    if not isinstance(email, str):
        raise Denied(Reason.BAD_CLAIMS, "email must be a string")
    if not isinstance(sub, str) or not sub:
        raise Denied(Reason.BAD_CLAIMS, "sub is missing or not a non-empty string")
    verified = payload.get("email_verified")
    if require_verified and verified is not True and verified != "true":
        email = ""
    return email, sub


def _show(value: object, limit: int = 80) -> str:
    """A claim value for a log detail: repr, capped (the value came from the token)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
