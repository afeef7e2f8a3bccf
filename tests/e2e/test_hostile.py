# ruff: noqa: ARG005 -- slice rows share one builder signature; not every row needs its argument
"""Hostile input through the real nginx with the shipped snippets: a slice of every class.

Each case asserts what the client sees (nginx passes 401 and 403 on; anything authd answers with
5xx becomes a 500), that the upstream was never called for a refusal, that the client's forged
`X-Authd-*` headers reach no one, and authd's audit reason.

Where each class of the threat model's "Hostile input classes" is tested. "verify" is
tests/unit/test_verify.py (the verifier alone: its tables, by name); "app" is
tests/unit/test_hostile_app.py, which sends every verify table through the app in process, in
the header and in the cookie, plus the requests that exist only in HTTP (ids start with the
class number; counts are rows, before the x2 for the two carriers); "nginx" is this module's
`SLICE` (ids start with the class number) and the tests named.

 1 no token, empty, elsewhere   verify: -; test_headers  app: 01-none (31)
                                nginx: 01-*; test_access no_token
 2 tokens that disagree         test_headers             app: 02-ambiguous (19)
                                nginx: 02-*, the three *_ambiguous tests
 3 oversized                    verify: SIZE             app: 03-size (10 x2, 9)
                                nginx: 03-*, test_a_huge_token_*, *_over_nginxs_buffer_*
 4 structural garbage           verify: STRUCTURE, NON_BASE64URL_SIGNATURES
                                app: 04-structure (103 x2), 04-cookie/04-header (20)
                                nginx: 04-*, HOSTILE
 5 algorithm games              verify: ALG_SPELLINGS, OTHER_ALGORITHMS, HMAC_SECRETS
                                app: 05-alg (75 x2)      nginx: 05-*, HOSTILE
 6 header games                 verify: HEADER_GAMES     app: 06-header (39 x2)
                                nginx: 06-*, HOSTILE jku
 7 kid games, one refetch       verify: KID_BAD_HEADER, UNKNOWN_KIDS, the refetch tests
                                app: 07-kid (46 x2), one refetch for the whole barrage
                                nginx: 07-*, test_unknown_kids_cost_at_most_one_refetch
 8 signature games, bad keys    verify: SIGNATURE_GAMES, _drop_from_set
                                app: 08-signature (38 x2)  nginx: 08-*, test_access
 9 time claims                  verify: TIME_DENIED, TIME_ACCEPTED, the clock tests
                                app: 09-time (50 x2)     nginx: 09-*, test_access, test_drills
10 issuer games                 verify: ISSUER_GAMES     app: 10-issuer (37 x2)
                                nginx: 10-*, test_access
11 audience games               verify: AUDIENCE_DENIED  app: 11-audience (30 x2)
                                nginx: 11-*, test_access
12 token type                   verify: TOKEN_TYPES      app: 12-type (12 x2)
                                nginx: 12-*, test_access org token
13 identity values              verify: IDENTITY_DENIED; test_headers (encoding)
                                app: 13-identity (33 x2)
                                nginx: 13-*, the control-character, non-ASCII, size tests
14 request facts, methods       test_headers, test_app   app: 14-facts (40), method (18), url (33),
                                test_a_token_in_a_request_fact_*, test_a_huge_original_uri_*
                                nginx: 14-*, test_spoofing
 - policy refusals (403)        test_policy              app: policy (16)
                                nginx: policy-*, test_access
 - arbitrary requests           verify: the property tests
                                app: test_property_arbitrary_requests_* (hypothesis)

Faults (key endpoint, rotation, floods, signals, workers, clock) are in tests/e2e/test_faults.py,
test_key_faults.py, test_drills.py and test_operate.py; the nginx pitfalls (forged identity headers
in every spelling, locations with their own `proxy_set_header`, FastCGI/uWSGI, the internal auth
location) in test_spoofing.py and test_gateways.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from authd.headers import redact_uri
from devtools.stack import DEFAULT_ISSUER, OPS_AUD, SERVICE_TOKEN_ID, WIKI_AUD
from tests.conftest import DROP, Raw, _without_dropped
from tests.unit.test_verify import (
    HEADER_GAMES,
    SIGNATURE_GAMES,
    STRUCTURE,
    Mint,
    replace_segment,
)

pytestmark = pytest.mark.e2e


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj: object) -> str:
    return b64url(json.dumps(obj).encode())


def forge(header: dict, payload: dict, signature: str = "") -> str:
    return f"{segment(header)}.{segment(payload)}.{signature}"


@dataclass(frozen=True)
class Material:
    """What a forger has: the real kid, valid claims, a valid token, the public key."""

    kid: str
    claims: dict[str, Any]
    valid: str
    public_pem: bytes

    @property
    def header(self) -> str:
        return self.valid.split(".")[0]

    @property
    def signature(self) -> str:
        return self.valid.split(".")[2]

    def unsigned(self) -> str:
        return self.valid.rsplit(".", 1)[0]

    def hs256_with_public_key(self) -> str:
        signing_input = (
            f"{segment({'alg': 'HS256', 'typ': 'JWT', 'kid': self.kid})}.{segment(self.claims)}"
        )
        mac = hmac.new(self.public_pem, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64url(mac)}"


@pytest.fixture(scope="module")
def material(dev_key, make_claims) -> Material:
    claims = make_claims()
    private = serialization.load_pem_private_key(dev_key.private_pem_path.read_bytes(), None)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Material(dev_key.kid, claims, dev_key.sign(claims), public_pem)


HOSTILE = [
    pytest.param(lambda _: "not-a-token", {"malformed"}, id="garbage"),
    pytest.param(lambda m: m.unsigned(), {"malformed"}, id="two-segments"),
    pytest.param(lambda m: f"{m.header}.AAAA.BBBB.CCCC.DDDD", {"malformed"}, id="jwe"),
    pytest.param(
        lambda m: json.dumps({"payload": m.claims, "signature": m.signature}),
        {"malformed", "ambiguous_token"},  # its commas read as a repeated header
        id="json-serialization",
    ),
    pytest.param(
        lambda m: forge({"alg": "none", "typ": "JWT", "kid": m.kid}, m.claims),
        {"alg_not_allowed", "bad_signature"},
        id="alg-none-unsigned",
    ),
    pytest.param(
        lambda m: forge({"alg": "None", "kid": m.kid}, m.claims, m.signature),
        {"alg_not_allowed"},
        id="alg-None-with-signature",
    ),
    pytest.param(
        lambda m: forge({"typ": "JWT", "kid": m.kid}, m.claims, m.signature),
        {"alg_not_allowed"},
        id="alg-missing",
    ),
    pytest.param(
        lambda m: m.hs256_with_public_key(), {"alg_not_allowed"}, id="hs256-keyed-with-public-key"
    ),
    pytest.param(lambda m: f"{m.unsigned()}.", {"bad_signature"}, id="empty-signature"),
    pytest.param(
        lambda m: (
            f"{m.header}.{segment({**m.claims, 'email': 'mallory@example.com'})}.{m.signature}"
        ),
        {"bad_signature"},
        id="tampered-payload",
    ),
    pytest.param(lambda m: f"{m.valid}==", {"malformed"}, id="padded-signature"),
    pytest.param(
        lambda m: forge({"alg": "RS256", "kid": "../../../../etc/passwd"}, m.claims, m.signature),
        {"unknown_kid", "bad_header"},
        id="kid-path-traversal",
    ),
    pytest.param(
        lambda m: forge(
            {"alg": "RS256", "kid": m.kid, "jku": "http://127.0.0.1:9/keys"}, m.claims, m.signature
        ),
        {"bad_header"},
        id="jku-header",
    ),
]


@pytest.mark.parametrize(("build", "reasons"), HOSTILE)
def test_a_hostile_token_is_refused_with_a_reason(visit, material, build, reasons):
    seen = visit("/wiki/", token=build(material))

    assert seen.status == 401
    assert seen.received is None
    assert seen.audit["decision"] == "deny"
    assert seen.audit["reason"] in reasons


@pytest.mark.parametrize("where", ["header", "cookie"])
def test_a_huge_token_is_refused_before_decoding(visit, make_token, where):
    token = make_token(custom={"padding": "x" * 4600})
    assert 6500 < len(token) < 7500  # fits nginx's 8 KiB header buffer, over authd's cap

    seen = visit("/wiki/", **{"token" if where == "header" else "cookie": token})

    assert seen.status == 401
    assert seen.received is None
    assert seen.audit["reason"] == "token_too_large"


def test_different_tokens_in_header_and_cookie_are_ambiguous(visit, make_token):
    alice, bob = make_token(email="alice@example.com"), make_token(email="bob@example.com")

    seen = visit("/wiki/", token=alice, cookie=bob)

    assert seen.status == 401
    assert seen.received is None
    assert seen.audit["reason"] == "ambiguous_token"


def test_a_repeated_assertion_header_with_different_tokens_is_ambiguous(visit, make_token):
    tokens = [make_token(email="alice@example.com"), make_token(email="bob@example.com")]

    seen = visit("/wiki/", headers=[("Cf-Access-Jwt-Assertion", t) for t in tokens])

    assert seen.status == 401
    assert seen.audit["reason"] == "ambiguous_token"


def test_two_authorization_cookies_with_different_tokens_are_ambiguous(visit, make_token):
    alice, bob = make_token(email="alice@example.com"), make_token(email="bob@example.com")

    seen = visit(
        "/wiki/", headers=[("Cookie", f"CF_Authorization={alice}; CF_Authorization={bob}")]
    )

    assert seen.status == 401
    assert seen.audit["reason"] == "ambiguous_token"


def test_a_non_ascii_email_reaches_the_upstream_encoded_as_ascii(visit, make_token):
    seen = visit("/wiki/", token=make_token(email="jörg@example.com"))

    assert seen.status == 200
    assert seen.received is not None
    (email,) = seen.received.values("x-authd-email")
    assert email.isascii()
    assert urllib.parse.unquote(email) == "jörg@example.com"


@pytest.mark.parametrize(
    "department",
    ["Eng\r\nX-Injected: yes", "Eng\nX-Injected: yes", "Eng\x00X-Injected: yes", "Eng\x7f"],
)
def test_control_characters_in_a_claim_never_break_the_answer(visit, make_token, department):
    seen = visit("/team/", token=make_token(custom={"department": department}))

    assert seen.status in {200, 401}  # encoded, or refused as unsafe; never a 5xx
    if seen.received is not None:
        assert seen.received.get("x-injected") is None
        assert all(value.isprintable() for _, value in seen.received.headers)


@pytest.mark.parametrize("department_length", [900, 1050, 1100, 1500])
def test_identity_near_nginx_header_limits_is_whole_or_refused_never_a_500(
    visit, make_token, department_length
):
    # nginx fails the subrequest (500) if authd's answer outgrows its 4 KiB header buffer.
    groups = [f"group-{i:04d}-{'x' * 8}" for i in range(90)]
    department = "d" * department_length
    token = make_token(custom={"groups": groups, "department": department})
    assert len(token) < 6144

    seen = visit("/team/", token=token)

    assert seen.status in {200, 401}
    if seen.status == 401:
        assert seen.audit["reason"] == "unsafe_claim_value"
    else:
        assert seen.received is not None
        assert seen.received.values("x-authd-department") == [department]  # never truncated


# ---------------------------------------------------------------------------------------------
# A slice of every class: forged with test_verify's `Mint`, claims for this stack's issuer, now


class Forger(Mint):
    """test_verify's forge (any header and payload byte for byte, a foreign key, HMAC, other
    algorithms), with the claims this stack's issuer signs for the wiki, valid now."""

    def claims(self, **overrides: object) -> dict[str, object]:
        now = int(time.time())
        base: dict[str, object] = {
            "aud": [WIKI_AUD],
            "email": "alice@example.com",
            "exp": now + 600,
            "iat": now - 10,
            "nbf": now - 10,
            "iss": DEFAULT_ISSUER,
            "type": "app",
            "identity_nonce": "nonce-1",
            "sub": "7335d417-61da-459d-899c-0a01c76a8e1f",
            "country": "DE",
            "custom": {"groups": ["sre", "ops"], "department": "Engineering"},
        }
        return _without_dropped(base | overrides)


@pytest.fixture(scope="module")
def forger(dev_key, next_key) -> Forger:
    def load(key):
        return serialization.load_pem_private_key(key.private_pem_path.read_bytes(), None)

    return Forger(load(dev_key), dev_key.kid, load(next_key))


def unit_row(table: list, row_id: str) -> Callable[[Mint], str]:
    """The builder of one row of a test_verify table: the slice reuses the unit forgeries."""
    (row,) = [p for p in table if p.id == row_id]
    return row.values[0]


def ago(seconds: int) -> int:
    return int(time.time()) - seconds


# Sent with every request of the slice: a client's own identity headers, which must reach no one.
FORGED = "mallory@evil.example"
FORGED_HEADERS = [
    ("X-Authd-Email", FORGED),
    ("X-Authd-User", FORGED),
    ("X-Authd-Groups", "admins"),
    ("X-Authd-Policy", "ops"),
    ("X-Authd-Service-Token", FORGED),
    ("Cf-Access-Authenticated-User-Email", FORGED),
    ("X_Authd_Email", FORGED),
]


@dataclass(frozen=True)
class Hostile:
    """One request of the slice: where it goes, how the token travels, what it must get."""

    build: Callable[[Forger], str | None]  # the token, or None for none
    reason: str
    location: str = "/wiki/"
    carrier: str = "header"  # header, cookie, both (the cookie then carries `other`)
    headers: tuple[tuple[str, str], ...] = ()
    method: str = "GET"
    body: bytes | None = None
    other: Callable[[Forger], str] | None = None

    @property
    def status(self) -> int:
        return (
            403 if self.reason in {"not_allowed", "requirement_failed", "unknown_policy"} else 401
        )


def case(case_id: str, build, reason: str, **kwargs: Any) -> Any:
    return pytest.param(Hostile(build, reason, **kwargs), id=case_id)


def claims(**overrides: object) -> Callable[[Forger], str]:
    return lambda m: m.with_claims(**overrides)


def header_with(**overrides: object) -> Callable[[Forger], str]:
    return lambda m: m.with_header(**overrides)


SLICE = [
    # 1. no token, an empty one, or one where authd does not look
    case("01-none/nothing", lambda m: None, "no_token"),
    case("01-none/empty-header", lambda m: "", "no_token"),
    case(
        "01-none/bearer-not-configured",
        lambda m: None,
        "no_token",
        headers=(("Authorization", "Bearer PLACEHOLDER"),),
    ),
    case(
        "01-none/header-with-underscores",
        lambda m: None,
        "no_token",
        # nginx drops the line, and logs it at level info: no real token here.
        headers=(("Cf_Access_Jwt_Assertion", "not.a.token"),),
    ),
    case(
        "01-none/cookie-of-another-name",
        lambda m: None,
        "no_token",
        headers=(("Cookie", "cf_authorization=PLACEHOLDER; CF_Authorization2=PLACEHOLDER"),),
    ),
    # 2. tokens that disagree
    case(
        "02-ambiguous/header-and-garbage-cookie",
        lambda m: m.valid(),
        "ambiguous_token",
        carrier="both",
        other=lambda m: "garbage",
    ),
    case(
        "02-ambiguous/header-alice-cookie-bob",
        lambda m: m.valid(),
        "ambiguous_token",
        carrier="both",
        other=lambda m: m.valid(email="bob@example.com"),
    ),
    case(
        "02-ambiguous/two-cookie-lines",
        lambda m: None,
        "ambiguous_token",
        headers=(
            ("Cookie", "CF_Authorization=garbage"),
            ("Cookie", "CF_Authorization=PLACEHOLDER"),
        ),
    ),
    case(
        "02-ambiguous/two-cookie-lines-alice-bob",
        lambda m: None,
        "ambiguous_token",
        headers=(("Cookie", "CF_Authorization=PLACEHOLDER"), ("Cookie", "CF_Authorization=BOB")),
    ),
    # 3. oversized
    case("03-size/one-over-the-cap", lambda m: "A" * 6145, "token_too_large"),
    case("03-size/valid-but-over-the-cap", claims(filler="x" * 4700), "token_too_large"),
    case(
        "03-size/cookie-over-the-cap",
        claims(filler="x" * 4700),
        "token_too_large",
        carrier="cookie",
    ),
    # 4. structural garbage (rows of test_verify's STRUCTURE)
    *(
        case(f"04-structure/{row}", unit_row(STRUCTURE, row), "malformed")
        for row in [
            "five-segments-jwe",
            "four-segments",
            "padding-in-signature",
            "plus-sig",
            "url-encoded-dot",
            "noncanonical-signature",
            "header-not-utf8",
            "payload-is-array",
            "dup-payload-email",
            "dup-header-alg",
            "exp-NaN",
            "payload-nested-1700",
        ]
    ),
    case(
        "04-structure/cookie-double-equals",
        lambda m: "=" + m.valid(),
        "malformed",
        carrier="cookie",
    ),
    # 5. algorithm games
    case("05-alg/none", header_with(alg="none"), "alg_not_allowed"),
    case("05-alg/nOnE", header_with(alg="nOnE"), "alg_not_allowed"),
    case("05-alg/missing", header_with(alg=DROP), "alg_not_allowed"),
    case("05-alg/rs256-lowercase", header_with(alg="rs256"), "alg_not_allowed"),
    case(
        "05-alg/hs256-spki-pem",
        lambda m: m.hmac("HS256", m.public_encodings()["spki-pem"]),
        "alg_not_allowed",
    ),
    case(
        "05-alg/hs512-jwk-n",
        lambda m: m.hmac("HS512", m.public_encodings()["jwk-n-b64"]),
        "alg_not_allowed",
    ),
    case("05-alg/real-ES256", lambda m: m.signed_by("ES256"), "alg_not_allowed"),
    case("05-alg/real-PS256", lambda m: m.signed_by("PS256"), "alg_not_allowed"),
    case("05-alg/real-EdDSA", lambda m: m.signed_by("EdDSA"), "alg_not_allowed"),
    # 6. header games (rows of test_verify's HEADER_GAMES)
    *(
        case(f"06-header/{row}", unit_row(HEADER_GAMES, row), "bad_header")
        for row in ["jku", "x5u", "jwk-attacker-signed", "x5c", "crit", "zip", "typ-JWE", "cty-jwt"]
    ),
    # 7. kid games
    case("07-kid/missing", header_with(kid=DROP), "bad_header"),
    case("07-kid/number", header_with(kid=1), "bad_header"),
    case("07-kid/300-chars", header_with(kid="k" * 300), "bad_header"),
    case("07-kid/crlf-injection", header_with(kid="a\r\nX-Injected: 1"), "bad_header"),
    case("07-kid/path-traversal", header_with(kid="../../etc/passwd"), "unknown_kid"),
    case("07-kid/sql-injection", header_with(kid="' OR 1=1 --"), "unknown_kid"),
    case("07-kid/upper-case", lambda m: m.with_header(kid=m.kid.upper()), "unknown_kid"),
    # 8. signature games (rows of test_verify's SIGNATURE_GAMES)
    *(
        case(f"08-signature/{row}", unit_row(SIGNATURE_GAMES, row), "bad_signature")
        for row in [
            "zeros-256",
            "truncated-1-byte",
            "flip-128-6",
            "tampered-email",
            "foreign-key-under-real-kid",
            "signature-of-another-token",
            "pss-signature-under-RS256",
        ]
    ),
    case("08-signature/empty", lambda m: replace_segment(m.valid(), 2, ""), "bad_signature"),
    # 9. time claims
    case("09-time/expired", claims(exp=ago(300), iat=ago(900), nbf=ago(900)), "expired"),
    case("09-time/expired-31s-ago", claims(exp=ago(31), iat=ago(900), nbf=ago(900)), "expired"),
    case("09-time/exp-missing", claims(exp=DROP), "bad_claims"),
    case("09-time/exp-string", claims(exp="9999999999"), "bad_claims"),
    case("09-time/exp-10e30", claims(exp=10**30), "bad_claims"),
    case("09-time/exp-infinity", claims(exp=Raw("1e400")), "bad_claims"),
    case("09-time/exp-before-iat", claims(exp=ago(-20), iat=ago(-25), nbf=DROP), "bad_claims"),
    case("09-time/nbf-in-an-hour", claims(nbf=ago(-3600), exp=ago(-7200)), "not_yet_valid"),
    case(
        "09-time/iat-in-an-hour",
        claims(iat=ago(-3600), nbf=DROP, exp=ago(-7200)),
        "issued_in_future",
    ),
    # 10. issuer games
    case("10-issuer/missing", claims(iss=DROP), "bad_issuer"),
    case("10-issuer/trailing-slash", claims(iss=DEFAULT_ISSUER + "/"), "bad_issuer"),
    case("10-issuer/http", claims(iss=DEFAULT_ISSUER.replace("https", "http")), "bad_issuer"),
    case("10-issuer/upper-host", claims(iss=DEFAULT_ISSUER.upper()), "bad_issuer"),
    case("10-issuer/suffix-domain", claims(iss=DEFAULT_ISSUER + ".evil.example"), "bad_issuer"),
    case(
        "10-issuer/cyrillic-e", claims(iss=DEFAULT_ISSUER.replace("e", "\u0435", 1)), "bad_issuer"
    ),
    case("10-issuer/list", claims(iss=[DEFAULT_ISSUER]), "bad_issuer"),
    # 11. audience games
    case("11-audience/missing", claims(aud=DROP), "bad_audience"),
    case("11-audience/empty-list", claims(aud=[]), "bad_audience"),
    case("11-audience/another-application", claims(aud=[OPS_AUD]), "bad_audience"),
    case("11-audience/substring", claims(aud=WIKI_AUD[4:40]), "bad_audience"),
    case("11-audience/upper-case", claims(aud=WIKI_AUD.upper()), "bad_audience"),
    case("11-audience/with-a-number", claims(aud=[WIKI_AUD, 1]), "bad_audience"),
    case("11-audience/wiki-token-at-ops", lambda m: m.valid(), "bad_audience", location="/ops/"),
    # 12. token type
    case("12-type/org", claims(type="org"), "bad_type"),
    case("12-type/missing", claims(type=DROP), "bad_type"),
    case("12-type/APP", claims(type="APP"), "bad_type"),
    # 13. identity values
    case(
        "13-identity/email-crlf",
        claims(email="alice\r\nX-Injected: 1@example.com"),
        "unsafe_claim_value",
    ),
    case("13-identity/email-nul", claims(email="alice\x00@example.com"), "unsafe_claim_value"),
    case(
        "13-identity/email-lone-surrogate",
        claims(email=Raw('"alice\\ud800@example.com"')),
        "unsafe_claim_value",
    ),
    case(
        "13-identity/email-over-2048-bytes",
        claims(email="a" * 2100 + "@example.com"),
        "unsafe_claim_value",
    ),
    case("13-identity/country-lf", claims(country="D\nE"), "unsafe_claim_value"),
    case("13-identity/neither-email-nor-common-name", claims(email=DROP), "bad_claims"),
    case("13-identity/email-a-number", claims(email=5), "bad_claims"),
    case("13-identity/common-name-and-email", claims(common_name=SERVICE_TOKEN_ID), "bad_claims"),
    # 14. request facts, methods, bodies: none of them changes a decision
    *(
        case(
            f"14-facts/{name}",
            claims(exp=ago(300), iat=ago(900), nbf=ago(900)),
            "expired",
            headers=((name, value),),
        )
        for name, value in [
            ("X-Original-URI", "/healthz"),
            ("X-Forwarded-For", "127.0.0.1"),
            ("User-Agent", "kube-probe/1.29"),
            ("Host", "localhost"),
            ("X-Original-Method", "OPTIONS"),
        ]
    ),
    *(
        case(
            f"14-facts/{method}-with-a-body",
            lambda m: None,
            "no_token",
            method=method,
            body=b'{"email": "alice@example.com"}' * 100,
        )
        for method in ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    ),
    # policies: a valid token that the location's policy refuses, or a policy authd lacks
    case("policy-other-domain", claims(email="eve@evil.example"), "not_allowed"),
    case("policy-no-at-sign", claims(email="example.com"), "not_allowed"),
    case(
        "policy-service-token-on-a-user-policy",
        claims(email=DROP, sub="", common_name=SERVICE_TOKEN_ID),
        "not_allowed",
    ),
    case("policy-requirement", claims(country="US"), "requirement_failed", location="/germany/"),
    case("policy-unknown", lambda m: m.valid(), "unknown_policy", location="/nosuch/"),
]


def send(stack, client, forger: Forger, hostile: Hostile):
    """One request of the slice through nginx; returns (response, what the upstream got, audits)."""
    token = hostile.build(forger)
    valid, bob = forger.valid(), forger.valid(email="bob@example.com")
    headers = [(k, v.replace("PLACEHOLDER", valid).replace("BOB", bob)) for k, v in hostile.headers]
    if token is not None and hostile.carrier in {"header", "both"}:
        headers.append(("Cf-Access-Jwt-Assertion", token))
    if token is not None and hostile.carrier == "cookie":
        headers.append(("Cookie", f"CF_Authorization={token}"))
    if hostile.other is not None:
        headers.append(("Cookie", f"CF_Authorization={hostile.other(forger)}"))
    path = f"{hostile.location}{uuid.uuid4().hex}"
    response = client.request(
        hostile.method, path, headers=[*FORGED_HEADERS, *headers], content=hostile.body
    )
    audits = stack.authd.wait_for_audit(lambda line: line.get("uri") == redact_uri(path))
    received = stack.upstream.requests_for(path)
    return response, received, audits


@pytest.mark.parametrize("hostile", SLICE)
def test_every_class_through_nginx(stack, client, forger, hostile):
    response, received, audits = send(stack, client, forger, hostile)

    assert response.status_code == hostile.status
    assert received == []  # the upstream never saw the request, nor the forged headers
    (line,) = audits
    assert (line["decision"], line["reason"]) == ("deny", hostile.reason)
    assert line["status"] == hostile.status
    assert FORGED not in response.text


def test_the_forgeries_of_the_slice_are_otherwise_valid(stack, client, forger):
    """The slice's baseline: the same forge, request and forged headers, with a valid token."""
    response, received, (line,) = send(stack, client, forger, Hostile(lambda m: m.valid(), ""))

    assert response.status_code == 200
    (seen,) = received
    assert seen.values("x-authd-email") == ["alice@example.com"]
    assert seen.values("x-authd-policy") == ["wiki"]
    assert seen.values("x-authd-groups") == ["sre,ops"]
    assert seen.get("x-authd-service-token") is None
    assert seen.get("x_authd_email") is None
    assert [v for _, v in seen.headers if FORGED in v] == []
    assert line["decision"] == "allow"


def test_unknown_kids_cost_at_most_one_refetch(stack, client, forger, module_key_server):
    before = module_key_server.request_count
    for i in range(20):
        kid = f"random-{uuid.uuid4().hex}-{i}"
        response, received, (line,) = send(
            stack, client, forger, Hostile(header_with(kid=kid), "unknown_kid")
        )
        assert (response.status_code, line["reason"], received) == (401, "unknown_kid", [])

    assert module_key_server.request_count - before <= 1
    response, _, _ = send(stack, client, forger, Hostile(lambda m: m.valid(), ""))
    assert response.status_code == 200


def test_a_header_over_nginxs_buffer_never_reaches_authd(stack, client):
    path = f"/wiki/{uuid.uuid4().hex}"
    # Not a real token: nginx logs the start of a header line it refuses (at level info).
    token = ".".join(["A" * 3000] * 3)

    response = client.get(path, headers={"Cf-Access-Jwt-Assertion": token})

    assert response.status_code == 400  # "Request Header Or Cookie Too Large"
    assert stack.upstream.requests_for(path) == []
    assert [a for a in stack.authd.audit_lines() if a.get("uri") == redact_uri(path)] == []
