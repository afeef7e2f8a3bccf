"""Hostile tokens through nginx: each is a 401 with a reason code, never a 200, never a 5xx."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import urllib.parse
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

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
