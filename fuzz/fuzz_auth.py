# ruff: noqa: INP001 -- a script directory, not a package
"""An atheris fuzz target for authd's token path, in process: bytes in, a decision out.

    .venv/bin/python fuzz/fuzz_auth.py fuzz/corpus-local fuzz/corpus -max_total_time=3600
    make fuzz                       # the same, FUZZ_SECONDS=3600 by default (0: until stopped)

Every input goes through ``Authorizer.decide(policy, get_token)`` with a real ``Verifier``,
a real ``KeyStore`` (RS256, ES256 and EdDSA keys, loaded through ``parse_key_set``) and a
clock fixed at ``NOW``. The first byte picks how the rest becomes a request:

- ``0`` raw: the next byte picks the policy, the rest (Latin-1, as the app decodes header
  bytes) is the token;
- ``1`` structured: a ``FuzzedDataProvider`` builds a header and a payload (valid claims
  with members dropped, replaced by values of every JSON type, or added; duplicate members;
  raw bytes), signs them with the real keys, a foreign key, HMAC over the public key or
  nothing, and may damage the signature or the encoding, so that the fuzzer gets past the
  signature check to the claim checks;
- ``2`` headers: request header lines (the token headers, ``Authorization``, ``Cookie``)
  built from valid and expired tokens, separators and bytes, read as the app reads them
  (``authd.app.EveryValue``, ``authd.headers.extract_token``).

Invariants, checked on every input (a failure is a crash that atheris reports and saves):

- ``decide`` never raises and never answers 5xx for input (500 is a bug caught by its
  backstop; 503 cannot happen, the keys are loaded); the reason is set exactly when the
  status is not 200;
- a 200 only when the reference check below accepts the same token for the same policy,
  and the verified payload authd hands on is exactly what the reference decoded;
- identity header values are printable ASCII (no header injection);
- ``extract_token`` raises only ``Denied``; a token it returns is in the request, not
  empty, without ``,`` or edge blanks, and within the size cap.

The reference check is PyJWT's ``jwt.decode`` (key chosen by the header's kid; the issuer's
algorithms, the issuer, the policy's audience, the same leeway, PyJWT's clock frozen at
``NOW``), then the rules authd adds that can be stated independently: ``type == "app"``,
the identity rules, each policy's rules, and authd's documented strictness (size cap,
closed header, ``typ`` JWT, printable kid, canonical base64url, no duplicate members, no
NaN, ``exp >= iat``, bounded lifetime). authd is stricter than PyJWT on purpose, so the
invariant is one-directional: authd's 200 implies the reference's acceptance.

``AUTHD_FUZZ_STATS=1`` prints how many inputs reached each outcome (every 10,000 inputs);
``AUTHD_FUZZ_PLANT=audience`` (or ``expiry``) breaks that check of authd's verifier, for the
test that proves the invariants can fail (tests/unit/test_fuzz.py). A crash file replays
with ``.venv/bin/python fuzz/fuzz_auth.py fuzz/artifacts/crash-...``.

Keys: no private key is committed. The RSA key is derived from a fixed public seed by a
seeded prime search (cryptography cannot seed its own keygen), the EC and Ed25519 keys from
fixed scalars; they are test keys, public by construction, so that the seed corpus
(``fuzz/make_corpus.py``) is reproducible and its valid tokens verify here.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import hmac
import json
import logging
import math
import os
import random
import string
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING, Any

import atheris
import jwt
import jwt.api_jwt
import structlog
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

with atheris.instrument_imports(include=["authd"]):
    from authd import config as config_mod
    from authd.app import EveryValue
    from authd.decision import Authorizer, Decision
    from authd.dev import thumbprint
    from authd.errors import Denied
    from authd.fetch import Fetched
    from authd.headers import extract_token
    from authd.keys import IssuerKeys, KeyStore

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from authd.config import TokenSource

# The reference's own copy of authd's documented limits (README: reason codes), written down
# again rather than imported: a change to authd's values must show up as a disagreement.
MAX_TOKEN_BYTES = 6144
ALLOWED_HEADER_MEMBERS = frozenset({"alg", "kid", "typ"})
MAX_LIFETIME_SECONDS = 400 * 86400

NOW = 1_800_000_000.0
ISSUER = "https://issuer.fuzz.invalid"  # no run of 18 bytes in common with the suite's tokens
AUD = "f" * 56 + "0000fuzz"
OTHER_AUD = "e" * 64
SERVICE_TOKEN = "5f1c0de0f0a1b2c3d4e5f60718293a4b.access"
ALGORITHMS = ("RS256", "ES256", "EdDSA")
POLICIES: dict[str, dict[str, Any]] = {
    "wiki": {
        "audience": [AUD],
        "allow_email_domains": ["example.com"],
        "allow_service_tokens": [SERVICE_TOKEN],
        "headers": {"X-Authd-Dept": "custom.department", "X-Authd-Team": "custom.groups"},
    },
    "open": {"audience": [AUD, OTHER_AUD]},
    "de": {"audience": [AUD], "require_claims": {"country": ["DE"]}},
}
POLICY_NAMES = [*POLICIES, "nope", ""]


# --- keys: public test keys, derived from fixed seeds -------------------------------------------


def _probably_prime(n: int, rng: random.Random) -> bool:
    if n < 4:
        return n in {2, 3}
    if any(n % p == 0 for p in _SMALL_PRIMES):
        return n in _SMALL_PRIMES
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(40):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in {1, n - 1}:
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


_SMALL_PRIMES = [p for p in range(3, 2000, 2) if all(p % q for q in range(3, math.isqrt(p) + 1, 2))]


def seeded_rsa(seed: bytes, bits: int = 2048) -> rsa.RSAPrivateKey:
    """An RSA key that is the same on every run: a public test key, never a secret."""
    rng = random.Random(seed)  # noqa: S311 -- reproducible on purpose; this key protects nothing

    def prime() -> int:
        while True:
            candidate = rng.getrandbits(bits // 2) | (3 << (bits // 2 - 2)) | 1
            if _probably_prime(candidate, rng):
                return candidate

    e = 65537
    while True:
        p, q = prime(), prime()
        lam = math.lcm(p - 1, q - 1)
        if p != q and math.gcd(e, lam) == 1:
            break
    d = pow(e, -1, lam)
    numbers = rsa.RSAPrivateNumbers(
        p=p,
        q=q,
        d=d,
        dmp1=rsa.rsa_crt_dmp1(d, p),
        dmq1=rsa.rsa_crt_dmq1(d, q),
        iqmp=rsa.rsa_crt_iqmp(p, q),
        public_numbers=rsa.RSAPublicNumbers(e, p * q),
    )
    return numbers.private_key()


def _scalar(label: bytes) -> int:
    return int.from_bytes(hashlib.sha256(label).digest(), "big")


@dataclass(frozen=True)
class Signer:
    """A way to sign a signing input: a header ``alg``, a ``kid`` and a key (or none)."""

    name: str
    alg: str
    kid: str
    key: Any

    def sign(self, data: bytes) -> bytes:
        if self.name == "none":
            return b""
        if self.name == "hs256-public-key":  # the RS256 -> HS256 confusion
            return hmac.new(self.key, data, hashlib.sha256).digest()
        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            # RFC 6979 where cryptography has it (44+): the seed corpus is then reproducible.
            try:
                ecdsa = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
            except TypeError:
                ecdsa = ec.ECDSA(hashes.SHA256())
            r, s = decode_dss_signature(self.key.sign(data, ecdsa))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return self.key.sign(data)


class Keys:
    """The issuer's keys (and a foreign one), and its key set as the key source serves it."""

    def __init__(self) -> None:
        self.rsa = seeded_rsa(b"authd fuzz: issuer RSA key (public test key)")
        self.foreign = seeded_rsa(b"authd fuzz: a key the issuer never published")
        self.ec = ec.derive_private_key(_scalar(b"authd fuzz: EC P-256"), ec.SECP256R1())
        self.ed = ed25519.Ed25519PrivateKey.from_private_bytes(
            hashlib.sha256(b"authd fuzz: Ed25519").digest()
        )
        self.rsa_kid = thumbprint(self.rsa.public_key())
        self.ec_kid = hashlib.sha256(b"authd fuzz: EC kid").hexdigest()
        self.ed_kid = hashlib.sha256(b"authd fuzz: Ed25519 kid").hexdigest()
        self.public = {
            self.rsa_kid: self.rsa.public_key(),
            self.ec_kid: self.ec.public_key(),
            self.ed_kid: self.ed.public_key(),
        }
        jwks = [
            {**RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True), "kid": self.rsa_kid},
            {**ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True), "kid": self.ec_kid},
            {**OKPAlgorithm.to_jwk(self.ed.public_key(), as_dict=True), "kid": self.ed_kid},
        ]
        for jwk, alg in zip(jwks, ALGORITHMS, strict=True):
            jwk |= {"alg": alg, "use": "sig"}
        self.jwks = json.dumps({"keys": jwks}).encode()
        pem = self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.signers = [
            Signer("rs256", "RS256", self.rsa_kid, self.rsa),
            Signer("es256", "ES256", self.ec_kid, self.ec),
            Signer("eddsa", "EdDSA", self.ed_kid, self.ed),
            Signer("foreign-under-real-kid", "RS256", self.rsa_kid, self.foreign),
            Signer("foreign-kid", "RS256", thumbprint(self.foreign.public_key()), self.foreign),
            Signer("es256-key-rs256-header", "RS256", self.ec_kid, self.ec),
            Signer("hs256-public-key", "HS256", self.rsa_kid, pem),
            Signer("none", "none", self.rsa_kid, None),
        ]


# --- tokens -------------------------------------------------------------------------------------


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def claims(**overrides: object) -> dict[str, object]:
    """A Cloudflare Access application token's claims, valid at ``NOW`` for every policy.

    No value is one the test suite uses: the fuzzer prints pieces of its inputs, and
    tests/leakcheck.py would rightly see the suite's token material in them.
    """
    return {
        "aud": [AUD],
        "email": "ada.fuzz@example.com",
        "exp": int(NOW) + 3600,
        "iat": int(NOW) - 10,
        "nbf": int(NOW) - 10,
        "iss": ISSUER,
        "type": "app",
        "identity_nonce": "fuzz-nonce",
        "sub": "0b6b5f4e-7f0e-5c8a-9e55-f0220a5b1d2e",
        "country": "DE",
        "custom": {"department": "infra", "groups": ["sre", "ops"]},
    } | overrides


def sign(
    signer: Signer, payload: dict[str, object], header: dict[str, object] | None = None
) -> str:
    head = {"alg": signer.alg, "kid": signer.kid, "typ": "JWT"} if header is None else header
    signing_input = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(signer.sign(signing_input.encode()))}"


# --- the system under test ----------------------------------------------------------------------


@dataclass
class FixedClock:
    now: float = NOW
    mono: float = 1000.0  # never moves: the key set stays fresh, refetch cooldowns never end

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono


@dataclass
class StaticSource:
    body: bytes

    async def fetch(self) -> Fetched:
        return Fetched(self.body, None)


class Target:
    """authd's decision path, built once: configuration, key store, authorizer, a loop."""

    def __init__(self) -> None:
        self.keys = Keys()
        self.config = config_mod.parse(
            {
                "token_sources": [
                    "header:Cf-Access-Jwt-Assertion",
                    "cookie:CF_Authorization",
                    "bearer",
                ],
                "issuers": [
                    {
                        "name": "fuzz",
                        "issuer": ISSUER,
                        "jwks_url": f"{ISSUER}/cdn-cgi/access/certs",
                        "algorithms": list(ALGORITHMS),
                    }
                ],
                "policies": POLICIES,
            }
        )
        (self.issuer,) = self.config.issuers
        self.loop = asyncio.new_event_loop()
        issuer_keys = IssuerKeys(self.issuer, StaticSource(self.keys.jwks), FixedClock())
        if not self.loop.run_until_complete(issuer_keys.refresh()):
            raise RuntimeError("the fuzz key set did not load")
        self.store = KeyStore([issuer_keys])
        self.authorizer = Authorizer.from_config(self.config, self.store, FixedClock())
        self.valid = sign(self.keys.signers[0], claims())
        self.bob = sign(self.keys.signers[1], claims(email="bob@example.com"))
        self.expired = sign(self.keys.signers[2], claims(exp=int(NOW) - 3600, iat=int(NOW) - 7200))

    def decide(self, policy: str, get_token: Callable[[Sequence[TokenSource]], str]) -> Decision:
        return self.loop.run_until_complete(self.authorizer.decide(policy, get_token))


# --- the reference check ------------------------------------------------------------------------


class _FrozenDatetime(datetime):
    """PyJWT reads the time with ``datetime.now``: frozen at ``NOW`` in this process."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> _FrozenDatetime:
        return cls.fromtimestamp(NOW, tz or UTC)


jwt.api_jwt.datetime = _FrozenDatetime  # type: ignore[misc]


def _strict_json(segment: str) -> dict[str, Any] | None:
    """The segment's JSON object if authd's documented strictness holds for it, else None."""
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except ValueError:  # binascii.Error too
        return None
    if b64(raw) != segment:
        return None  # not canonical base64url

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in pairs}) != len(pairs):
            raise ValueError("duplicate")
        return dict(pairs)

    def no_constants(name: str) -> object:
        raise ValueError(name)

    try:
        text = raw.decode("utf-8")
        value = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except (ValueError, RecursionError):  # UnicodeDecodeError too
        return None
    return value if isinstance(value, dict) else None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def reference(target: Target, token: str, policy: str) -> dict[str, Any] | None:
    """The payload, if the reference accepts ``token`` for ``policy``; else None."""
    if policy not in POLICIES or len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
        return None
    try:
        header = jwt.get_unverified_header(token)
        key = target.keys.public.get(header.get("kid"))
        payload = jwt.decode(
            token,
            key=key,
            algorithms=list(ALGORITHMS),
            audience=POLICIES[policy]["audience"],
            issuer=ISSUER,
            leeway=target.config.leeway_seconds,
            options={"require": ["exp", "iss", "aud"], "verify_jti": False},
        )
    except Exception:  # noqa: BLE001 -- whatever PyJWT raises, the reference refuses
        return None
    segments = token.split(".")
    strict_header, strict_payload = _strict_json(segments[0]), _strict_json(segments[1])
    if strict_header is None or strict_payload is None or strict_payload != payload:
        return None
    kid, typ = strict_header.get("kid"), strict_header.get("typ", "JWT")
    if (
        not set(strict_header) <= ALLOWED_HEADER_MEMBERS
        or not (isinstance(typ, str) and typ.upper() == "JWT")
        or not (isinstance(kid, str) and kid.isascii() and kid.isprintable())
    ):
        return None
    return payload if _claims_ok(payload, policy) else None


def _claims_ok(payload: dict[str, Any], policy: str) -> bool:
    times = [payload.get(name) for name in ("exp", "iat", "nbf") if name in payload]
    if not all(_is_number(t) and 0 <= t <= 2**53 for t in times):
        return False
    exp, iat = payload["exp"], payload.get("iat", -math.inf)
    if exp < iat or exp < payload.get("nbf", -math.inf) or exp > NOW + MAX_LIFETIME_SECONDS:
        return False
    if payload.get("type") != "app":
        return False
    email, sub, name = (payload.get(k, "") for k in ("email", "sub", "common_name"))
    if not all(isinstance(v, str) for v in (email, sub, name)):
        return False
    if name and (email or sub):
        return False
    if not (name or email):
        return False
    rules = POLICIES[policy]
    country = payload.get("country")
    if "require_claims" in rules and not (
        country == "DE" or (isinstance(country, list) and "DE" in country)
    ):
        return False
    if "allow_email_domains" in rules:
        if name:
            return name in rules["allow_service_tokens"]
        local, at, domain = email.lower().rpartition("@")
        return bool(local and at and domain == "example.com")
    return True


# --- building inputs ----------------------------------------------------------------------------

TIMES = [
    NOW,
    NOW - 30,
    NOW - 31,
    NOW + 30,
    NOW + 31,
    NOW - 29.5,
    NOW + 30.5,
    NOW + MAX_LIFETIME_SECONDS,
    NOW + MAX_LIFETIME_SECONDS + 1,
    0,
    -1,
    2**53,
    2**53 + 1,
    10**30,
    1e400,
]
STRINGS = [
    "",
    "app",
    "org",
    "APP",
    "app\x00",
    ISSUER,
    ISSUER + "/",
    ISSUER.upper(),
    AUD,
    AUD.upper(),
    OTHER_AUD,
    "bo@example.com",
    "ALICE@EXAMPLE.COM",
    "@example.com",
    "example.com",
    "a@example.com.evil.org",
    "a@sub.example.com",
    "a@evil.org@example.com",
    "José@example.com",
    "a\r\nX-Injected: 1@example.com",
    "a,b@example.com",
    "%0d%0a",
    "\ud800",
    SERVICE_TOKEN,
    "DE",
    "JWT",
    "jwt",
    "RS256",
    "HS256",
    "none",
    "x" * 4000,
]
HEADER_MEMBERS = ["alg", "kid", "typ", "jku", "x5u", "jwk", "x5c", "crit", "b64", "cty", "zip"]
CLAIM_MEMBERS = [
    *claims(),
    "common_name",
    "groups",
    "custom.groups",
    "__proto__",
    "",
]


def fuzz_value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> object:
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind == 0:
        return fdp.PickValueInList(TIMES)
    if kind == 1:
        return fdp.ConsumeInt(8)
    if kind == 2:
        return fdp.ConsumeFloat()
    if kind == 3:
        return fdp.PickValueInList([True, False, None])
    if kind == 4:
        return fdp.PickValueInList(STRINGS)
    if kind == 5:
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 40))
    if kind in {6, 7} and depth < 3:
        return [fuzz_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 8 and depth < 3:
        return {
            fdp.PickValueInList(CLAIM_MEMBERS): fuzz_value(fdp, depth + 1)
            for _ in range(fdp.ConsumeIntInRange(0, 3))
        }
    return fdp.PickValueInList([[AUD], [OTHER_AUD, AUD], [], [1], AUD])


def mutate(obj: dict[str, object], fdp: atheris.FuzzedDataProvider, members: list[str]) -> None:
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        name = fdp.PickValueInList(members)
        if fdp.ConsumeBool():
            obj.pop(name, None)
        else:
            obj[name] = fuzz_value(fdp)


def serialize(obj: dict[str, object], fdp: atheris.FuzzedDataProvider) -> bytes:
    how = fdp.ConsumeIntInRange(0, 5)
    try:
        text = json.dumps(obj, ensure_ascii=how == 1)
    except (ValueError, TypeError):
        text = "{}"
    if how == 2 and obj:  # a duplicate member, appended
        name = fdp.PickValueInList(list(obj))
        text = text[:-1] + f", {json.dumps(name)}: {json.dumps(fuzz_value(fdp))}}}"
    elif how == 3:  # raw bytes
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    elif how == 4:  # a number written as no encoder writes it
        text = text.replace(str(int(NOW) + 3600), fdp.PickValueInList(["1.8e9", "18e8", "-0"]))
    return text.encode("utf-8", "surrogatepass")


def encode(raw: bytes, fdp: atheris.FuzzedDataProvider) -> str:
    how = fdp.ConsumeIntInRange(0, 7)
    text = b64(raw)
    if how == 1:
        return text + "=" * (-len(text) % 4)  # padding, which RFC 7515 forbids
    if how == 2 and text:  # the last character's spare bits set
        last = string.ascii_letters + string.digits + "-_"
        return text[:-1] + last[(last.index(text[-1]) + 1) % 64]
    if how == 3:
        return base64.b64encode(raw).decode().rstrip("=")  # the other alphabet
    return text


def structured(target: Target, fdp: atheris.FuzzedDataProvider) -> str:
    signer = fdp.PickValueInList(target.keys.signers)
    header: dict[str, object] = {"alg": signer.alg, "kid": signer.kid, "typ": "JWT"}
    payload = claims()
    if fdp.ConsumeBool():
        mutate(header, fdp, HEADER_MEMBERS)
    mutate(payload, fdp, CLAIM_MEMBERS)
    signing_input = f"{encode(serialize(header, fdp), fdp)}.{encode(serialize(payload, fdp), fdp)}"
    signature = bytearray(signer.sign(signing_input.encode()))
    damage = fdp.ConsumeIntInRange(0, 9)
    if damage == 1 and signature:
        signature[fdp.ConsumeIntInRange(0, len(signature) - 1)] ^= 1 << fdp.ConsumeIntInRange(0, 7)
    elif damage == 2:
        del signature[fdp.ConsumeIntInRange(0, len(signature)) :]
    elif damage == 3:
        signature = bytearray(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 600)))
    token = f"{signing_input}.{encode(bytes(signature), fdp)}"
    if fdp.ConsumeIntInRange(0, 15) == 0:
        token = fdp.PickValueInList([" ", "\t", ".", "Bearer ", "a", ","]) + token
    return token


def header_lines(target: Target, fdp: atheris.FuzzedDataProvider) -> list[tuple[bytes, bytes]]:
    pieces = [
        target.valid,
        target.bob,
        target.expired,
        target.valid.upper(),
        "",
        " ",
        "\t",
        ",",
        ";",
        "=",
        '"',
        "Bearer ",
        "bearer ",
        "CF_Authorization=",
        "cf_authorization=",
        "a=b; ",
        "\x0b",
        "\xa0",
    ]
    names = [b"cf-access-jwt-assertion", b"Cf-Access-Jwt-Assertion", b"cookie", b"Cookie"]
    names += [b"authorization", b"x-original-uri", b"cf_access_jwt_assertion"]
    lines = []
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        name = fdp.PickValueInList(names)
        value = "".join(
            fdp.PickValueInList(pieces) if fdp.ConsumeBool() else fdp.ConsumeUnicode(8)
            for _ in range(fdp.ConsumeIntInRange(0, 5))
        )
        lines.append((name, value.encode("utf-8", "surrogatepass")))
    return lines


# --- the invariants -----------------------------------------------------------------------------


def check(target: Target, policy: str, decision: Decision, token: str | None) -> None:
    if decision.status >= 500:
        detail = decision.exc_info[1] if decision.exc_info else decision.detail
        raise AssertionError(f"{decision.status} {decision.reason} for input: {detail!r}")
    if decision.status not in {200, 401, 403}:
        raise AssertionError(f"unexpected status {decision.status}")
    if (decision.reason is None) != (decision.status == 200):
        raise AssertionError(f"status {decision.status} with reason {decision.reason}")
    if decision.status != 200:
        return
    if token is None:
        raise AssertionError("200 without a token")
    expected = reference(target, token, policy)
    if expected is None:
        raise AssertionError(f"200 for a token the reference refuses (policy {policy!r})")
    assert decision.claims is not None
    c = decision.claims
    if decision.cached:
        # A hit from the decision cache keeps the identity, not the payload.
        identity = (
            expected.get("email", ""),
            expected.get("sub", ""),
            expected.get("common_name", ""),
        )
        if (c.email, c.sub, c.service_token) != identity:
            raise AssertionError("200 from the cache for another identity than the reference's")
    elif dict(c.payload) != expected:
        raise AssertionError("200 with claims that differ from the reference's")
    for name, value in decision.headers:
        if not (value.isascii() and value.isprintable()):
            raise AssertionError(f"identity header {name} is not printable ASCII")


def check_extracted(token: str, lines: list[tuple[bytes, bytes]]) -> None:
    if not token or "," in token or token != token.strip(" \t") or len(token) > MAX_TOKEN_BYTES:
        raise AssertionError("extract_token returned an impossible token")
    if not any(token in value.decode("latin-1") for _, value in lines):
        raise AssertionError("extract_token returned a token the request does not carry")


STATS: collections.Counter[str] | None = (
    collections.Counter() if os.environ.get("AUTHD_FUZZ_STATS") else None
)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if STATS is not None:
        STATS["inputs"] += 1
        if STATS["inputs"] % 10_000 == 0:  # libFuzzer ends the process without atexit
            print_stats()
    target = TARGET
    mode = data[0] % 3
    lines: list[tuple[bytes, bytes]] = []
    if mode == 0:
        policy = POLICY_NAMES[data[1] % len(POLICY_NAMES)] if len(data) > 1 else "wiki"
        token: str | None = data[2:].decode("latin-1")
        decision = target.decide(policy, lambda _: data[2:].decode("latin-1"))
    elif mode == 1:
        fdp = atheris.FuzzedDataProvider(data[1:])
        policy = fdp.PickValueInList(POLICY_NAMES)
        token = structured(target, fdp)
        built = token
        decision = target.decide(policy, lambda _: built)
    else:
        fdp = atheris.FuzzedDataProvider(data[1:])
        policy = fdp.PickValueInList(POLICY_NAMES)
        lines = header_lines(target, fdp)
        headers = EveryValue(lines)
        extracted: list[str] = []

        def get_token(sources: Sequence[TokenSource]) -> str:
            try:
                extracted.append(extract_token(sources, headers))
            except Denied:
                raise
            except Exception as ex:
                raise AssertionError(f"extract_token raised {type(ex).__name__}") from ex
            return extracted[-1]

        decision = target.decide(policy, get_token)
        if decision.exc_info and isinstance(decision.exc_info[1], AssertionError):
            raise decision.exc_info[1]
        token = extracted[-1] if extracted else None
        if token is not None:
            check_extracted(token, lines)
    check(target, policy, decision, token)
    if STATS is not None:
        STATS[f"mode {mode}: {decision.status} {decision.reason or policy}"] += 1


def print_stats() -> None:
    """With AUTHD_FUZZ_STATS=1: which outcomes the inputs reached, at exit."""
    if STATS:
        lines = [f"{count:9d}  {outcome}" for outcome, count in sorted(STATS.items())]
        print("\n".join(["outcomes so far:", *lines]), file=sys.stderr)  # noqa: T201


def self_check(target: Target) -> None:
    """The invariants would be vacuous if nothing were ever allowed: valid tokens get 200."""
    for signer in target.keys.signers[:3]:
        token = sign(signer, claims())
        for policy in POLICIES:
            decision = target.decide(policy, lambda _, t=token: t)
            if decision.status != 200 or reference(target, token, policy) is None:
                raise RuntimeError(f"{signer.name} token for {policy}: {decision}")
            check(target, policy, decision, token)


def plant_bug(name: str) -> None:
    """For the test that proves the invariants can fail: break one check of authd's verifier."""
    from authd import verify  # noqa: PLC0415 -- only when asked

    def skipped(*_: object) -> None:
        return None

    if name == "audience":
        verify.check_audience = skipped  # type: ignore[assignment]
    elif name == "expiry":
        original = verify.check_times
        verify.check_times = lambda payload, now, _: original(payload, now, 10**12)  # type: ignore[assignment]
    else:
        raise ValueError(f"AUTHD_FUZZ_PLANT={name!r}: known are audience, expiry")


def quiet_logging() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    logging.disable(logging.CRITICAL)


TARGET: Target


def main() -> None:
    global TARGET  # noqa: PLW0603 -- built once, before the fuzzer calls the target
    quiet_logging()
    TARGET = Target()
    self_check(TARGET)
    if plant := os.environ.get("AUTHD_FUZZ_PLANT"):
        plant_bug(plant)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
