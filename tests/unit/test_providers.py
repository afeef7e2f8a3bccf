"""Several issuers from one daemon: the issuer is chosen by where a token arrived and its iss,
then verified by that issuer's provider rules alone (Google IAP, AWS ALB, OIDC, Cloudflare).

The key store here is a stand-in that hands out the test's keys by kid, so that these tests
are about choosing and checking, not fetching (tests/unit/test_keys_providers.py fetches).
"""

from __future__ import annotations

import base64
import json

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from authd import config as config_mod
from authd.config import TokenSource
from authd.errors import Denied, Reason
from authd.keys import VerifyKey
from authd.verify import Verified, Verifier
from tests.conftest import AUD, ISSUER, NOW, FakeClock

LEEWAY = 30
IAP_AUD = "/projects/123456789/global/backendServices/987654321"
ALB_ARN = (
    "arn:aws:elasticloadbalancing:eu-west-1:123456789012:loadbalancer/app/wiki/50dc6c495c0c9188"
)
OTHER_ARN = (
    "arn:aws:elasticloadbalancing:eu-west-1:123456789012:loadbalancer/app/shop/0123456789abcdef"
)
IDP = "https://idp.example.com"

CF_HEADER = TokenSource("header", "Cf-Access-Jwt-Assertion")
IAP_HEADER = TokenSource("header", "x-goog-iap-jwt-assertion")
ALB_HEADER = TokenSource("header", "x-amzn-oidc-data")
BEARER = TokenSource("bearer")


def issuers(*extra: dict[str, object]) -> tuple[config_mod.IssuerConfig, ...]:
    raw = {
        "issuers": [
            {"name": "cf", "team": "team"},
            {"name": "iap", "provider": "google-iap"},
            {"name": "alb", "provider": "aws-alb", "region": "eu-west-1", "issuer": IDP},
            {"name": "okta", "provider": "oidc", "issuer": "https://okta.example.com"},
            *extra,
        ],
        "policies": {"p": {"audience": [AUD]}},
    }
    return config_mod.parse(raw).issuers


class Keys:
    """One issuer's keys as the verifier sees them: a kid -> key map that never changes."""

    def __init__(self, name: str, keys: dict[str, VerifyKey]) -> None:
        self.name = name
        self.keys = keys
        self.generation = 1

    async def key_for(self, kid: str, _client: str = "") -> VerifyKey:
        if kid not in self.keys:
            raise Denied(Reason.UNKNOWN_KID, "not in the test's keys")
        return self.keys[kid]


class Store:
    def __init__(self, by_name: dict[str, Keys]) -> None:
        self.by_name = by_name

    def get(self, name: str) -> Keys | None:
        return self.by_name.get(name)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def verifier(ec_key, rsa_key) -> Verifier:
    ec_public = VerifyKey("ec-1", ec_key.public_key(), "ES256")
    rsa_public = VerifyKey("rsa-1", rsa_key.public_key(), "RS256")
    store = Store(
        {
            "cf": Keys("cf", {"rsa-1": rsa_public}),
            "iap": Keys("iap", {"ec-1": ec_public}),
            "alb": Keys("alb", {"ec-1": ec_public}),
            "okta": Keys("okta", {"rsa-1": rsa_public}),
        },
    )
    return Verifier(issuers(), store, FakeClock(NOW), LEEWAY)  # type: ignore[arg-type]


def b64(raw: bytes, *, pad: bool) -> str:
    text = base64.urlsafe_b64encode(raw).decode()
    return text if pad else text.rstrip("=")


def alb_token(
    key: ec.EllipticCurvePrivateKey,
    *,
    signer: str = ALB_ARN,
    pad: bool = True,
    header: dict[str, object] | None = None,
    payload: dict[str, object] | None = None,
    alg: str = "ES256",
) -> str:
    """An ALB's x-amzn-oidc-data: signer in the header, padded base64url, ES256 over the
    segments as they are sent."""
    body = {
        "sub": "1234-abcd",
        "email": "alice@example.com",
        "email_verified": True,
        "exp": int(NOW) + 120,
        "iss": IDP,
    }
    body |= payload or {}
    head = {
        "alg": alg,
        "kid": "ec-1",
        "signer": signer,
        "iss": IDP,
        "client": "c",
        "exp": body["exp"],
    }
    head |= header or {}
    head = {k: v for k, v in head.items() if v is not None}
    signing_input = ".".join(
        b64(json.dumps(part).encode(), pad=pad) for part in (head, body)
    ).encode()
    signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input, key)
    return f"{signing_input.decode()}.{b64(signature, pad=pad)}"


def iap_token(key: ec.EllipticCurvePrivateKey, **claims: object) -> str:
    payload = {
        "aud": IAP_AUD,
        "iss": "https://cloud.google.com/iap",
        "sub": "accounts.google.com:1234567890",
        "email": "alice@example.com",
        "hd": "example.com",
        "iat": int(NOW),
        "exp": int(NOW) + 600,
        "google": {"access_levels": []},
    } | claims
    return jwt.encode(payload, key, algorithm="ES256", headers={"kid": "ec-1"})


def oidc_token(key: object, headers: dict[str, object] | None = None, **claims: object) -> str:
    payload = {
        "iss": "https://okta.example.com",
        "aud": "client-1",
        "sub": "00u1",
        "email_verified": True,
        "iat": int(NOW),
        "exp": int(NOW) + 600,
    } | claims
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "rsa-1", **(headers or {})})


def cf_token(key: object, **claims: object) -> str:
    payload = {
        "aud": [AUD],
        "iss": ISSUER,
        "email": "alice@example.com",
        "sub": "u-1",
        "type": "app",
        "iat": int(NOW),
        "exp": int(NOW) + 600,
    } | claims
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "rsa-1"})


async def check(
    v: Verifier,
    token: str,
    audience: tuple[str, ...],
    sources: tuple[TokenSource, ...] | None,
    accepted: tuple[str, ...] | None = None,
) -> Verified:
    chosen = None if accepted is None else tuple(i for i in v.issuers if i.name in accepted)
    return await v.verify_with_keys(token, audience, sources=sources, accepted=chosen)


async def reason(v: Verifier, token: str, audience, sources, accepted=None) -> Reason:
    with pytest.raises(Denied) as ex:
        await check(v, token, audience, sources, accepted)
    return ex.value.reason


# --- presets ---------------------------------------------------------------------------------


def test_presets_set_the_token_source_algorithms_and_key_source():
    cf, iap, alb, okta = issuers()
    assert [str(s) for s in cf.token_sources] == [
        "header:Cf-Access-Jwt-Assertion",
        "cookie:CF_Authorization",
    ]
    assert (iap.token_sources, iap.algorithms) == ((IAP_HEADER,), ("ES256",))
    assert iap.issuer == "https://cloud.google.com/iap"
    assert iap.jwks_url == "https://www.gstatic.com/iap/verify/public_key-jwk"
    assert (alb.token_sources, alb.algorithms) == ((ALB_HEADER,), ("ES256",))
    assert alb.alb_keys_url == "https://public-keys.auth.elb.eu-west-1.amazonaws.com"
    assert (okta.token_sources, okta.algorithms) == ((BEARER,), ("RS256",))
    assert okta.discovery_url == "https://okta.example.com/.well-known/openid-configuration"
    assert cf.get_identity_url == "https://team.cloudflareaccess.com/cdn-cgi/access/get-identity"


# --- Google IAP ------------------------------------------------------------------------------


async def test_an_iap_token_in_its_header_is_verified_as_iap(verifier, ec_key):
    v = await check(verifier, iap_token(ec_key), (IAP_AUD,), (IAP_HEADER,))
    c = v.claims
    assert (c.issuer_name, c.email, c.sub, c.alg) == (
        "iap",
        "alice@example.com",
        "accounts.google.com:1234567890",
        "ES256",
    )
    assert "iap (google-iap) reads header:x-goog-iap-jwt-assertion" in v.chosen_because


async def test_an_iap_token_for_another_backend_is_refused(verifier, ec_key):
    token = iap_token(ec_key, aud="/projects/1/global/backendServices/2")
    assert await reason(verifier, token, (IAP_AUD,), (IAP_HEADER,)) is Reason.BAD_AUDIENCE


async def test_an_iap_token_in_cloudflares_header_is_no_cloudflare_token(verifier, ec_key):
    # Cloudflare's issuer reads that header, and the token's iss is not Cloudflare's.
    assert await reason(verifier, iap_token(ec_key), (IAP_AUD,), (CF_HEADER,)) is Reason.BAD_ISSUER


async def test_a_cloudflare_token_in_iaps_header_is_no_iap_token(verifier, rsa_key):
    assert await reason(verifier, cf_token(rsa_key), (AUD,), (IAP_HEADER,)) is Reason.BAD_ISSUER


async def test_an_iap_token_signed_with_rs256_is_refused(verifier, rsa_key):
    token = jwt.encode(
        {"iss": "https://cloud.google.com/iap", "aud": IAP_AUD, "sub": "s", "exp": int(NOW) + 60},
        rsa_key,
        algorithm="RS256",
        headers={"kid": "rsa-1"},
    )
    assert await reason(verifier, token, (IAP_AUD,), (IAP_HEADER,)) is Reason.ALG_NOT_ALLOWED


# --- AWS ALB ---------------------------------------------------------------------------------


async def test_an_alb_token_with_padding_and_its_signer_is_verified(verifier, ec_key):
    token = alb_token(ec_key)
    assert "=" in token  # the shape under test: base64url with padding
    v = await check(verifier, token, (ALB_ARN,), (ALB_HEADER,))
    assert (v.claims.issuer_name, v.claims.email, v.claims.sub) == (
        "alb",
        "alice@example.com",
        "1234-abcd",
    )


async def test_an_alb_token_without_padding_is_verified_too(verifier, ec_key):
    token = alb_token(ec_key, pad=False)
    assert "=" not in token
    assert (await check(verifier, token, (ALB_ARN,), (ALB_HEADER,))).claims.issuer_name == "alb"


async def test_the_signer_binds_an_alb_token_to_the_policy(verifier, ec_key):
    # A token from another load balancer of the same account, signed with the region's key.
    token = alb_token(ec_key, signer=OTHER_ARN)
    assert await reason(verifier, token, (ALB_ARN,), (ALB_HEADER,)) is Reason.BAD_AUDIENCE


async def test_an_alb_token_without_a_signer_is_refused(verifier, ec_key):
    token = alb_token(ec_key, header={"signer": None})
    assert await reason(verifier, token, (ALB_ARN,), (ALB_HEADER,)) is Reason.BAD_HEADER


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ({"iss": "https://evil.example.com"}, Reason.BAD_CLAIMS),
        ({"exp": int(NOW) + 99999}, Reason.BAD_CLAIMS),
        ({"exp": str(int(NOW) + 120)}, Reason.BAD_CLAIMS),
        ({"jku": "https://evil.example.com/keys"}, Reason.BAD_HEADER),
        ({"x5t": "abc"}, Reason.BAD_HEADER),
        ({"typ": "at+jwt"}, Reason.BAD_HEADER),
        ({"alg": "RS256"}, Reason.ALG_NOT_ALLOWED),
    ],
)
async def test_hostile_alb_headers_are_refused(verifier, ec_key, header, expected):
    token = alb_token(ec_key, header=header)
    assert await reason(verifier, token, (ALB_ARN,), (ALB_HEADER,)) is expected


async def test_an_alb_token_with_a_tampered_padded_segment_is_refused(verifier, ec_key):
    token = alb_token(ec_key, payload={"email": "alice@example.co"})  # 1 byte short: "="s differ
    head, _, sig = token.split(".")
    other = alb_token(ec_key, payload={"email": "mallory@example.com"}).split(".")[1]
    assert await reason(verifier, f"{head}.{other}.{sig}", (ALB_ARN,), (ALB_HEADER,)) is (
        Reason.BAD_SIGNATURE
    )


@pytest.mark.parametrize("bad", ["===", "=A", "=="])
async def test_non_canonical_padding_is_malformed(verifier, ec_key, bad):
    head, body, sig = alb_token(ec_key, pad=False).split(".")
    assert await reason(verifier, f"{head}{bad}.{body}.{sig}", (ALB_ARN,), (ALB_HEADER,)) is (
        Reason.MALFORMED
    )


async def test_padding_is_accepted_from_alb_issuers_only(verifier, rsa_key):
    # A padded OIDC token as a bearer token: only an ALB pads, so it is malformed.
    head, body, sig = oidc_token(rsa_key).split(".")
    padded = ".".join(p + "=" * (-len(p) % 4) for p in (head, body, sig))
    assert padded != f"{head}.{body}.{sig}"
    assert await reason(verifier, padded, ("client-1",), (BEARER,)) is Reason.MALFORMED
    # ...and a padded token where both an ALB and an OIDC issuer read, naming the OIDC one.
    both = issuers()
    alb_and_okta = tuple(i for i in both if i.name in {"alb", "okta"})
    with pytest.raises(Denied) as ex:
        await verifier.verify_with_keys(padded, ("client-1",), sources=None, accepted=alb_and_okta)
    assert ex.value.reason is Reason.MALFORMED


async def test_an_alb_token_needs_sub(verifier, ec_key):
    token = alb_token(ec_key, payload={"sub": ""})
    assert await reason(verifier, token, (ALB_ARN,), (ALB_HEADER,)) is Reason.BAD_CLAIMS


async def test_an_expired_alb_token_is_refused(verifier, ec_key):
    token = alb_token(ec_key, payload={"exp": int(NOW) - 3600})
    assert await reason(verifier, token, (ALB_ARN,), (ALB_HEADER,)) is Reason.EXPIRED


# --- generic OIDC ----------------------------------------------------------------------------


async def test_an_oidc_bearer_token_is_verified(verifier, rsa_key):
    v = await check(
        verifier, oidc_token(rsa_key, email="bob@example.com"), ("client-1",), (BEARER,)
    )
    assert (v.claims.issuer_name, v.claims.user, v.claims.sub) == (
        "okta",
        "bob@example.com",
        "00u1",
    )


async def test_an_oidc_token_without_email_is_known_by_its_sub(verifier, rsa_key):
    v = await check(verifier, oidc_token(rsa_key), ("client-1",), (BEARER,))
    assert (v.claims.email, v.claims.user) == ("", "00u1")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"typ": "at+jwt"}, None),
        ({"x5t": "dGh1bWI"}, None),
        ({"jwk": {"kty": "RSA"}}, Reason.BAD_HEADER),
        ({"typ": "JWS"}, Reason.BAD_HEADER),
    ],
)
async def test_oidc_header_members(verifier, rsa_key, headers, expected):
    token = oidc_token(rsa_key, headers)
    if expected is None:
        assert (await check(verifier, token, ("client-1",), (BEARER,))).claims.issuer_name == "okta"
    else:
        assert await reason(verifier, token, ("client-1",), (BEARER,)) is expected


async def test_oidc_requires_its_audience_and_a_sub(verifier, rsa_key):
    assert (
        await reason(verifier, oidc_token(rsa_key), ("client-2",), (BEARER,)) is Reason.BAD_AUDIENCE
    )
    assert await reason(verifier, oidc_token(rsa_key, sub=7), ("client-1",), (BEARER,)) is (
        Reason.BAD_CLAIMS
    )


async def test_cloudflare_keeps_its_own_rules_beside_the_others(verifier, rsa_key):
    assert await reason(verifier, cf_token(rsa_key, type="org"), (AUD,), (CF_HEADER,)) is (
        Reason.BAD_TYPE
    )
    x5t = jwt.encode(
        {"aud": [AUD], "iss": ISSUER, "email": "a@b.c", "type": "app", "exp": int(NOW) + 60},
        rsa_key,
        algorithm="RS256",
        headers={"kid": "rsa-1", "x5t": "abc"},
    )
    assert await reason(verifier, x5t, (AUD,), (CF_HEADER,)) is Reason.BAD_HEADER


# --- choosing the issuer ---------------------------------------------------------------------


async def test_a_policy_that_accepts_some_issuers_refuses_the_others(verifier, ec_key):
    token = iap_token(ec_key)
    assert await reason(verifier, token, (IAP_AUD,), (IAP_HEADER,), accepted=("cf",)) is (
        Reason.BAD_ISSUER
    )
    assert await reason(verifier, token, (IAP_AUD,), None, accepted=("cf", "okta")) is (
        Reason.BAD_ISSUER
    )
    v = await check(verifier, token, (IAP_AUD,), (IAP_HEADER,), accepted=("cf", "iap"))
    assert v.claims.issuer_name == "iap"


async def test_an_alb_token_sent_as_a_bearer_token_is_no_oidc_token(ec_key, rsa_key):
    # The ALB and the OIDC issuer behind it share the iss; only the source tells them apart.
    shared = issuers({"name": "idp", "provider": "oidc", "issuer": IDP})
    store = Store(
        {
            "alb": Keys("alb", {"ec-1": VerifyKey("ec-1", ec_key.public_key(), "ES256")}),
            "idp": Keys("idp", {"rsa-1": VerifyKey("rsa-1", rsa_key.public_key(), "RS256")}),
        },
    )
    v = Verifier(shared, store, FakeClock(NOW), LEEWAY)  # type: ignore[arg-type]
    token = alb_token(ec_key, pad=False)
    assert (await check(v, token, (ALB_ARN,), (ALB_HEADER,))).claims.issuer_name == "alb"
    # As a bearer token it is the OIDC issuer's to judge: an ALB's header members (signer)
    # are no OIDC token's, and without them its ES256 is not the issuer's algorithm either.
    assert await reason(v, token, (ALB_ARN,), (BEARER,)) is Reason.BAD_HEADER
    bare = alb_token(
        ec_key, pad=False, header={"signer": None, "iss": None, "client": None, "exp": None}
    )
    assert await reason(v, bare, (ALB_ARN,), (BEARER,)) is Reason.ALG_NOT_ALLOWED
    # Arriving in both places at once, it fits both: refused, never guessed.
    assert await reason(v, token, (ALB_ARN,), (ALB_HEADER, BEARER)) is Reason.BAD_ISSUER


def test_two_issuers_reading_the_same_place_need_different_iss():
    raw = {
        "issuers": [
            {"name": "a", "provider": "oidc", "issuer": IDP},
            {"name": "b", "provider": "oidc", "issuer": IDP, "jwks_url": f"{IDP}/keys"},
        ],
    }
    with pytest.raises(config_mod.ConfigError) as ex:
        config_mod.parse(raw)
    assert any("both read bearer with issuer" in p for p in ex.value.problems)


@pytest.mark.parametrize("verified", [False, "false", None, 1, "yes"])
async def test_an_oidc_email_counts_only_when_the_provider_verified_it(verifier, rsa_key, verified):
    # A generic OpenID provider may let anyone sign up as ceo@example.com.
    token = oidc_token(rsa_key, email="ceo@example.com", email_verified=verified)  # None: absent
    v = await check(verifier, token, ("client-1",), (BEARER,))
    assert (v.claims.email, v.claims.user) == ("", "00u1")


async def test_an_alb_email_counts_when_cognito_says_verified_as_a_string(verifier, ec_key):
    token = alb_token(ec_key, payload={"email_verified": "true"})
    assert (await check(verifier, token, (ALB_ARN,), (ALB_HEADER,))).claims.email == (
        "alice@example.com"
    )
    unverified = alb_token(ec_key, payload={"email_verified": False})
    assert (await check(verifier, unverified, (ALB_ARN,), (ALB_HEADER,))).claims.email == ""


async def test_an_issuer_may_trust_unverified_emails_when_told_to(rsa_key):
    trusting = issuers(
        {
            "name": "azure",
            "provider": "oidc",
            "issuer": "https://login.microsoftonline.com/t/v2.0",
            "require_email_verified": False,
        },
    )
    store = Store(
        {"azure": Keys("azure", {"rsa-1": VerifyKey("rsa-1", rsa_key.public_key(), "RS256")})}
    )
    v = Verifier(trusting, store, FakeClock(NOW), LEEWAY)  # type: ignore[arg-type]
    token = oidc_token(rsa_key, iss="https://login.microsoftonline.com/t/v2.0", email="a@b.example")
    token_claims = (await v.verify_with_keys(token, ("client-1",), sources=(BEARER,))).claims
    assert token_claims.email == "a@b.example"


def test_require_email_verified_is_for_oidc_and_alb_only():
    raw = {"issuers": [{"name": "cf", "team": "t", "require_email_verified": True}]}
    with pytest.raises(config_mod.ConfigError) as ex:
        config_mod.parse(raw)
    assert "require_email_verified: only for provider = 'oidc' or 'aws-alb'" in ex.value.problems[0]


async def test_an_unverified_email_is_gone_for_require_claims_and_claim_headers_too(
    verifier, rsa_key
):
    token = oidc_token(rsa_key, email="boss@corp.example", email_verified=False)
    claims = (await check(verifier, token, ("client-1",), (BEARER,))).claims
    assert (claims.email, claims.get("email")) == ("", None)
    verified = oidc_token(rsa_key, email="boss@corp.example")
    assert (await check(verifier, verified, ("client-1",), (BEARER,))).claims.get("email") == (
        "boss@corp.example"
    )
