"""Several identity-aware proxies behind one authd, through the real nginx.

The module's authd has five issuers at once, every key source on loopback:

- ``cf`` and ``cf-other``: two Cloudflare Access teams (each its own key server), reading
  ``Cf-Access-Jwt-Assertion`` and the ``CF_Authorization`` cookie;
- ``iap``: Google IAP (ES256 JWKS on a `KeyServer`), reading ``x-goog-iap-jwt-assertion``;
- ``alb``: an AWS ALB (one PEM public key per kid under ``alb_keys_url``, a `StaticServer`),
  reading ``x-amzn-oidc-data``; its tokens' ``iss`` is the OpenID provider's below, as an ALB
  in front of that provider would sign them;
- ``oidc``: a generic OpenID provider at ``http://127.0.0.1:PORT`` whose discovery document
  and key set another `StaticServer` serves, reading ``Authorization: Bearer``.

Keys and tokens come from `authd.dev` (what ``authd dev keygen/mint --provider`` write and print).
Each provider's token must reach the upstream as its user with ``X-Authd-Issuer`` naming its
issuer, and only there: in another provider's place, for a policy restricted to other issuers,
or bent in the ways each provider's format invites, it is refused with a reason code.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm

from authd import dev
from devtools.stack import (
    DEFAULT_ISSUER,
    WIKI_AUD,
    KeyServer,
    StaticServer,
    running_stack,
    wait_for,
    write_config,
)
from tests import leakcheck
from tests.e2e.conftest import Visitor

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from pathlib import Path

    from devtools.stack import Stack
    from tests.e2e.conftest import Visit

pytestmark = pytest.mark.e2e

OTHER_TEAM = "https://other.cloudflareaccess.com"
OTHER_ALB = dev.DEV_ALB_SIGNER.replace("authd-dev/50dc6c495c0c9188", "other/1b2c3d4e5f607182")
OTHER_IAP_AUDIENCE = "/projects/123456789012/global/backendServices/999"
DISCOVERY_PATH = "/.well-known/openid-configuration"
ALB_KEYS_PREFIX = "/alb-keys"
AUDIENCES = [WIKI_AUD, dev.DEV_IAP_AUDIENCE, dev.DEV_ALB_SIGNER, dev.DEV_OIDC_CLIENT_ID]

POLICIES: Mapping[str, Mapping[str, Any]] = {
    # Every issuer: the token's source and iss choose which one verifies it.
    "any": {"audience": AUDIENCES, "allow_email_domains": ["example.com"]},
    "cf-only": {"audience": [WIKI_AUD], "issuers": ["cf"]},
    "iap": {"audience": [dev.DEV_IAP_AUDIENCE], "issuers": ["iap"]},
    "alb": {"audience": [dev.DEV_ALB_SIGNER], "issuers": ["alb"]},
    "oidc": {"audience": [dev.DEV_OIDC_CLIENT_ID], "issuers": ["oidc"]},
}

# Where each place puts a token: a request header (name, value).
PLACES: Mapping[str, Callable[[str], tuple[str, str]]] = {
    "cloudflare": lambda token: ("Cf-Access-Jwt-Assertion", token),
    "cookie": lambda token: ("Cookie", f"CF_Authorization={token}"),
    "iap": lambda token: ("x-goog-iap-jwt-assertion", token),
    "alb": lambda token: ("x-amzn-oidc-data", token),
    "bearer": lambda token: ("Authorization", f"Bearer {token}"),
}


# --- keys, key servers, the stack -----------------------------------------------------------------


@pytest.fixture(scope="module")
def keydir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("provider-keys")


@pytest.fixture(scope="module")
def iap_keys(keydir) -> dev.KeyFiles:
    return dev.write_keys(keydir / "iap", "google-iap")


@pytest.fixture(scope="module")
def alb_keys(keydir) -> dev.KeyFiles:
    return dev.write_keys(keydir / "alb", "aws-alb")


@pytest.fixture(scope="module")
def idp() -> Iterator[StaticServer]:
    """The OpenID provider: its discovery document and key set (served once keys exist)."""
    with StaticServer() as server:
        yield server


@pytest.fixture(scope="module")
def oidc_keys(keydir, idp) -> dev.KeyFiles:
    """The provider's keys, and its discovery document naming itself as the issuer."""
    files = dev.write_keys(keydir / "oidc", "oidc", issuer=idp.base_url)
    idp.put(DISCOVERY_PATH, (keydir / "oidc" / dev.OIDC_DISCOVERY_JSON).read_bytes())
    idp.put(f"/{dev.JWKS_JSON}", (keydir / "oidc" / dev.JWKS_JSON).read_bytes())
    return files


@pytest.fixture(scope="module")
def alb_endpoint(alb_keys) -> Iterator[StaticServer]:
    """The ALB's key endpoint: the PEM public key of each kid at /alb-keys/<kid>."""
    with StaticServer() as server:
        server.put_directory(
            ALB_KEYS_PREFIX, alb_keys.private.parent / dev.ALB_KEYS_DIR, "application/x-pem-file"
        )
        yield server


@pytest.fixture(scope="module")
def iap_key_server(iap_keys) -> Iterator[KeyServer]:
    with KeyServer(iap_keys.public[0].read_bytes()) as server:
        yield server


@pytest.fixture(scope="module")
def other_team_key_server(next_key) -> Iterator[KeyServer]:
    with KeyServer(next_key.jwks) as server:
        yield server


def issuer_tables(
    *,
    cf: KeyServer,
    cf_other: KeyServer,
    iap: KeyServer,
    alb: StaticServer,
    idp: StaticServer,
) -> list[dict[str, Any]]:
    """The module's five issuers, each with its keys on loopback."""
    return [
        {"name": "cf", "issuer": DEFAULT_ISSUER, "jwks_url": cf.url},
        {"name": "cf-other", "issuer": OTHER_TEAM, "jwks_url": cf_other.url},
        {"name": "iap", "provider": "google-iap", "jwks_url": iap.url},
        {
            "name": "alb",
            "provider": "aws-alb",
            "issuer": idp.base_url,
            "alb_keys_url": alb.base_url + ALB_KEYS_PREFIX,
        },
        {"name": "oidc", "provider": "oidc", "issuer": idp.base_url},
    ]


@pytest.fixture(scope="module")
def issuers(  # noqa: PLR0917 -- pytest passes fixtures by name
    module_key_server,
    other_team_key_server,
    iap_key_server,
    alb_endpoint,
    idp,
    oidc_keys,  # noqa: ARG001 -- served by idp from now on
) -> list[dict[str, Any]]:
    return issuer_tables(
        cf=module_key_server,
        cf_other=other_team_key_server,
        iap=iap_key_server,
        alb=alb_endpoint,
        idp=idp,
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory, issuers) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("providers")
    config = write_config(workdir, issuers=issuers, policies=POLICIES)
    with running_stack(workdir, config) as running:
        yield running


# --- tokens ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    """A token, the claims it carries, and where its provider sends it."""

    value: str = field(repr=False)  # never in a test report
    claims: dict[str, Any]
    place: str

    def header(self, place: str | None = None) -> tuple[str, str]:
        return PLACES[place or self.place](self.value)


def _b64(raw: bytes, *, padded: bool) -> str:
    text = base64.urlsafe_b64encode(raw).decode("ascii")
    return text if padded else text.rstrip("=")


def _json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def alb_sign(
    key: ec.EllipticCurvePrivateKey,
    header: Mapping[str, Any],
    payload: Mapping[str, Any],
    *,
    padded: bool = True,
) -> str:
    """Sign like an ALB (ES256, raw r||s, over the segments as written), with or without the
    '=' padding an ALB writes."""
    signing_input = f"{_b64(_json(header), padded=padded)}.{_b64(_json(payload), padded=padded)}"
    signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input.encode("ascii"), key)
    token = f"{signing_input}.{_b64(signature, padded=padded)}"
    leakcheck.register(token)  # x-amzn-oidc-data is not a header the leak check knows
    return token


def alb_header(payload: Mapping[str, Any], kid: str, **changes: Any) -> dict[str, Any]:
    """The JOSE header an ALB writes for ``payload`` (a None in ``changes`` drops a member)."""
    header = {
        "alg": "ES256",
        "kid": kid,
        "signer": dev.DEV_ALB_SIGNER,
        "iss": payload["iss"],
        "client": dev.DEV_ALB_CLIENT,
        "exp": payload["exp"],
        "typ": "JWT",
    }
    header.update(changes)
    return {k: v for k, v in header.items() if v is not None}


def sized(payload: dict[str, Any], remainder: int) -> dict[str, Any]:
    """``payload`` grown by a claim so that its JSON's length leaves ``remainder`` modulo 3:
    1 and its base64url ends in "==", 0 and it has no padding at all."""
    for filler in ("", "x", "xx"):
        grown = {**payload, "name": f"Alice Example{filler}"}
        if len(_json(grown)) % 3 == remainder:
            return grown
    raise AssertionError("unreachable: three lengths in a row leave every remainder")


@dataclass(frozen=True)
class Minter:
    """Tokens of each provider's shape, signed with the module's keys."""

    cf_key: Path
    other_team_key: Path
    iap_files: dev.KeyFiles
    alb_files: dev.KeyFiles
    oidc_files: dev.KeyFiles
    oidc_issuer: str

    def iap_key(self) -> ec.EllipticCurvePrivateKey:
        return dev.load_ec_private_key(self.iap_files.private)

    def alb_key(self) -> ec.EllipticCurvePrivateKey:
        return dev.load_ec_private_key(self.alb_files.private)

    def oidc_key(self) -> rsa.RSAPrivateKey:
        return dev.load_private_key(self.oidc_files.private)

    def cloudflare(self, *, other_team: bool = False) -> Token:
        key = self.other_team_key if other_team else self.cf_key
        iss = OTHER_TEAM if other_team else DEFAULT_ISSUER
        claims = dev.claims(now=time.time(), iss=iss, aud=[WIKI_AUD])
        return Token(dev.mint(dev.load_private_key(key), claims), claims, "cloudflare")

    def google_iap(self, **changes: Any) -> Token:
        claims = dev.iap_claims(now=time.time(), **changes)
        return Token(dev.mint(self.iap_key(), claims), claims, "iap")

    def aws_alb(self, **changes: Any) -> Token:
        """As `authd dev mint --provider aws-alb` makes them."""
        claims = self.alb_claims(**changes)
        token = dev.mint_alb(self.alb_key(), claims)
        leakcheck.register(token)  # x-amzn-oidc-data is not a header the leak check knows
        return Token(token, claims, "alb")

    def oidc(self, **changes: Any) -> Token:
        claims = dev.oidc_claims(now=time.time(), iss=self.oidc_issuer, **changes)
        return Token(dev.mint(self.oidc_key(), claims), claims, "bearer")

    def alb_claims(self, **changes: Any) -> dict[str, Any]:
        return dev.alb_claims(now=time.time(), iss=self.oidc_issuer, **changes)

    def alb_token(
        self,
        *,
        key: ec.EllipticCurvePrivateKey | None = None,
        padded: bool = True,
        remainder: int = 1,
        ttl: int = 3600,
        payload: Mapping[str, Any] | None = None,
        drop: tuple[str, ...] = (),
        **header: Any,
    ) -> str:
        """A token signed like an ALB's for this module's ALB, bent as asked.

        The payload's JSON length leaves `remainder` modulo 3 (1: its base64url ends in "==",
        0: no padding); the header copies its iss and exp, then takes `header`'s members (None
        drops one); `payload` then changes claims and `drop` removes some; `key` signs instead
        of the ALB's key.
        """
        claims = sized(self.alb_claims(ttl=ttl), remainder)
        jose = alb_header(claims, header.pop("kid", self.alb_files.kid), **header)
        body = {k: v for k, v in {**claims, **(payload or {})}.items() if k not in drop}
        return alb_sign(key or self.alb_key(), jose, body, padded=padded)


@pytest.fixture(scope="module")
def mint(  # noqa: PLR0917 -- pytest passes fixtures by name
    dev_key, next_key, iap_keys, alb_keys, oidc_keys, idp
) -> Minter:
    return Minter(
        cf_key=dev_key.private_pem_path,
        other_team_key=next_key.private_pem_path,
        iap_files=iap_keys,
        alb_files=alb_keys,
        oidc_files=oidc_keys,
        oidc_issuer=idp.base_url,
    )


def send(visit: Visitor, location: str, token: Token | str, place: str | None = None) -> Visit:
    """Visit `location` with the token in its provider's place, or in `place`."""
    if isinstance(token, str):
        assert place is not None
        return visit(location, headers=[PLACES[place](token)])
    return visit(location, headers=[token.header(place)])


def assert_refused(seen: Visit, status: int, reason: str) -> None:
    assert seen.status == status, seen.audit
    assert seen.received is None
    assert seen.audit["reason"] == reason, seen.audit


def assert_not_logged(stack: Stack, token: str) -> None:
    """Neither the token (padding or not) nor its signature is in what authd or nginx wrote."""
    pieces = {token, token.replace("=", ""), token.rsplit(".", 1)[1].rstrip("=")}
    for where, text in (("authd", stack.authd.all_output()), ("nginx", stack.nginx.all_output())):
        for piece in pieces:
            assert piece not in text, f"token material in {where}'s output"


# --- each provider's token reaches the upstream as its user ---------------------------------------

PROVIDERS = [
    pytest.param("cloudflare", "cf", "/cf-only/", id="cloudflare"),
    pytest.param("google_iap", "iap", "/iap/", id="google-iap"),
    pytest.param("aws_alb", "alb", "/alb/", id="aws-alb"),
    pytest.param("oidc", "oidc", "/oidc/", id="oidc"),
]


@pytest.mark.parametrize(("provider", "issuer", "own"), PROVIDERS)
@pytest.mark.parametrize("location", ["own", "/any/"])
def test_each_providers_token_reaches_the_upstream_as_its_user(  # noqa: PLR0917 -- fixtures
    visit, mint, provider, issuer, own, location
):
    token = getattr(mint, provider)()
    location = own if location == "own" else location

    seen = send(visit, location, token)

    assert seen.status == 200, seen.audit
    assert seen.received is not None
    assert seen.received.values("x-authd-issuer") == [issuer]
    assert seen.received.values("x-authd-email") == [token.claims["email"]]
    assert seen.received.values("x-authd-user") == [token.claims["email"]]
    assert seen.received.values("x-authd-sub") == [token.claims["sub"]]
    assert seen.received.values("x-authd-policy") == [location.strip("/")]
    assert seen.audit["decision"] == "allow"
    assert seen.audit["issuer"] == issuer
    assert seen.audit["iss"] == token.claims["iss"]
    assert_not_logged(visit.stack, token.value)


def test_the_alb_token_arrives_padded_and_its_key_is_fetched_once(visit, mint, alb_endpoint):
    token = mint.aws_alb()
    assert "=" in token.value  # what an ALB sends, and what RFC 7515 never has
    kid_path = f"{ALB_KEYS_PREFIX}/{mint.alb_files.kid}"

    first = send(visit, "/alb/", token)
    second = send(visit, "/alb/", mint.aws_alb(email="bob@example.com"))

    assert (first.status, second.status) == (200, 200)
    assert alb_endpoint.paths.count(kid_path) == 1  # known kids are kept


def test_the_oidc_keys_are_found_through_discovery(visit, mint, idp):
    seen = send(visit, "/oidc/", mint.oidc())

    assert seen.status == 200
    assert DISCOVERY_PATH in idp.paths
    assert f"/{dev.JWKS_JSON}" in idp.paths
    assert idp.paths.index(DISCOVERY_PATH) < idp.paths.index(f"/{dev.JWKS_JSON}")


# --- one issuer's token never satisfies another ---------------------------------------------------


def test_a_policy_restricted_to_other_issuers_refuses_a_valid_token(visit, mint):
    other_team = mint.cloudflare(other_team=True)

    restricted = send(visit, "/cf-only/", other_team)
    open_to_all = send(visit, "/any/", other_team)

    assert_refused(restricted, 401, "bad_issuer")
    assert open_to_all.status == 200
    assert open_to_all.received is not None
    assert open_to_all.received.values("x-authd-issuer") == ["cf-other"]


@pytest.mark.parametrize(
    ("location", "provider"),
    [
        pytest.param("/cf-only/", "google_iap", id="iap-token-cloudflare-policy"),
        pytest.param("/alb/", "oidc", id="oidc-token-alb-policy"),
        pytest.param("/oidc/", "aws_alb", id="alb-token-oidc-policy"),
        pytest.param("/iap/", "cloudflare", id="cloudflare-token-iap-policy"),
    ],
)
def test_a_restricted_policy_does_not_even_read_other_issuers_places(
    visit, mint, location, provider
):
    seen = send(visit, location, getattr(mint, provider)())

    assert_refused(seen, 401, "no_token")


@pytest.mark.parametrize(
    ("provider", "place", "reason"),
    [
        pytest.param("google_iap", "cloudflare", "bad_issuer", id="iap-in-cloudflare-header"),
        pytest.param("google_iap", "bearer", "bad_issuer", id="iap-as-bearer"),
        pytest.param("google_iap", "cookie", "bad_issuer", id="iap-in-cloudflare-cookie"),
        pytest.param("cloudflare", "iap", "bad_issuer", id="cloudflare-in-iap-header"),
        pytest.param("cloudflare", "bearer", "bad_issuer", id="cloudflare-as-bearer"),
        pytest.param("cloudflare", "alb", "bad_issuer", id="cloudflare-in-alb-header"),
        # The ALB and the OIDC issuer share the iss: the place alone tells them apart.
        pytest.param("oidc", "alb", "alg_not_allowed", id="oidc-in-alb-header"),
        pytest.param("oidc", "cloudflare", "bad_issuer", id="oidc-in-cloudflare-header"),
        pytest.param("aws_alb", "bearer", "malformed", id="alb-as-bearer"),
        pytest.param("aws_alb", "cloudflare", "malformed", id="alb-in-cloudflare-header"),
        pytest.param("aws_alb", "iap", "malformed", id="alb-in-iap-header"),
    ],
)
def test_a_token_in_another_providers_place_is_refused(visit, mint, provider, place, reason):
    token = getattr(mint, provider)()

    seen = send(visit, "/any/", token, place)

    assert_refused(seen, 401, reason)


def test_an_unpadded_alb_token_as_bearer_is_not_an_oidc_token(visit, mint):
    """Without its padding, the ALB token parses anywhere; as a bearer token the OIDC issuer
    (same iss) is chosen, and its rules refuse the ALB's own header members."""
    token = mint.alb_token(padded=False)
    assert "=" not in token

    as_bearer = send(visit, "/any/", token, "bearer")
    as_alb = send(visit, "/any/", token, "alb")

    assert_refused(as_bearer, 401, "bad_header")
    assert as_alb.status == 200


# --- each provider's hostile variants ------------------------------------------------------------


def _strip_padding(token: str) -> str:
    return token.replace("=", "")


def _payload_padding(token: str, padding: str) -> str:
    header, payload, signature = token.split(".")
    return f"{header}.{payload.rstrip('=')}{padding}.{signature}"


def _mid_segment_padding(token: str) -> str:
    header, payload, signature = token.split(".")
    return f"{header}.{payload[:8]}={payload[8:]}.{signature}"


def _pad_signature(token: str) -> str:
    """A token of another provider with '=' padding, as only an ALB's may have."""
    header, payload, signature = token.split(".")
    return f"{header}.{payload}.{signature}{'=' * (-len(signature) % 4) or '=='}"


def _another_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


ALB_VARIANTS = [
    pytest.param(lambda m: m.alb_token(), 200, None, id="padded-as-albs-sign"),
    pytest.param(lambda m: m.alb_token(padded=False), 200, None, id="signed-without-padding"),
    # The signature covers the padded text: without it, that text is not what was signed.
    pytest.param(
        lambda m: _strip_padding(m.alb_token()), 401, "bad_signature", id="padding-stripped"
    ),
    pytest.param(
        lambda m: _payload_padding(m.alb_token(), "="), 401, "malformed", id="one-pad-short"
    ),
    pytest.param(
        lambda m: _payload_padding(m.alb_token(), "==="), 401, "malformed", id="three-pads"
    ),
    pytest.param(
        lambda m: _mid_segment_padding(m.alb_token()),
        401,
        "malformed",
        id="padding-inside-a-segment",
    ),
    pytest.param(
        lambda m: _payload_padding(m.alb_token(remainder=0), "=="),
        401,
        "malformed",
        id="padding-where-none-belongs",
    ),
    pytest.param(
        lambda m: m.alb_token(signer=OTHER_ALB), 401, "bad_audience", id="another-albs-signer"
    ),
    pytest.param(lambda m: m.alb_token(signer=None), 401, "bad_header", id="no-signer"),
    pytest.param(
        lambda m: m.alb_token(iss=DEFAULT_ISSUER), 401, "bad_claims", id="header-iss-differs"
    ),
    pytest.param(
        lambda m: m.alb_token(payload={"exp": int(time.time()) + 60}),
        401,
        "bad_claims",
        id="payload-exp-differs",
    ),
    pytest.param(lambda m: m.alb_token(jku="http://127.0.0.1:1/keys"), 401, "bad_header", id="jku"),
    pytest.param(lambda m: m.alb_token(alg="ES384"), 401, "alg_not_allowed", id="es384"),
    pytest.param(
        lambda m: m.alb_token(key=_another_ec_key()),
        401,
        "bad_signature",
        id="another-key-under-the-kid",
    ),
    pytest.param(lambda m: m.alb_token(ttl=-600), 401, "expired", id="expired"),
    pytest.param(lambda m: m.alb_token(drop=("sub",)), 401, "bad_claims", id="no-sub"),
]


@pytest.mark.parametrize(("build", "status", "reason"), ALB_VARIANTS)
def test_alb_hostile_variants(visit, mint, build, status, reason):
    seen = send(visit, "/alb/", build(mint), "alb")

    if status == 200:
        assert seen.status == 200, seen.audit
        assert seen.audit["issuer"] == "alb"
    else:
        assert_refused(seen, status, reason)


def test_an_alb_token_with_an_unknown_kid_is_asked_for_once(visit, mint, alb_endpoint):
    kid = str(uuid.uuid4())

    seen = send(visit, "/alb/", mint.alb_token(kid=kid), "alb")
    again = send(visit, "/alb/", mint.alb_token(kid=kid), "alb")

    assert_refused(seen, 401, "unknown_kid")
    assert_refused(again, 401, "unknown_kid")
    assert alb_endpoint.paths.count(f"{ALB_KEYS_PREFIX}/{kid}") == 1  # remembered as unknown


@pytest.mark.parametrize(
    "kid",
    ["../alb-keys/x", "x/../../etc", "%2e%2e", "a?b", "a#b", "a.pem", "k" * 129],
    ids=["dot-dot", "slash", "percent", "query", "fragment", "dot", "129-characters"],
)
def test_an_alb_kid_that_could_leave_the_key_directory_is_never_fetched(
    visit, mint, alb_endpoint, kid
):
    before = len(alb_endpoint.paths)

    seen = send(visit, "/alb/", mint.alb_token(kid=kid), "alb")

    assert_refused(seen, 401, "unknown_kid")
    assert len(alb_endpoint.paths) == before


def _iap_signed(key: Any, algorithm: str, **header: Any) -> Callable[[Minter], str]:
    """An IAP token signed with ``key(m)`` and ``algorithm``, under the IAP key's kid."""

    def build(m: Minter) -> str:
        claims = dev.iap_claims(now=time.time())
        headers = {"kid": m.iap_files.kid, **header}
        return jwt.encode(claims, key(m), algorithm=algorithm, headers=headers)

    return build


IAP_VARIANTS = [
    pytest.param(lambda m: m.google_iap().value, 200, None, id="as-iap-signs"),
    pytest.param(
        _iap_signed(Minter.oidc_key, "RS256"), 401, "alg_not_allowed", id="rs256-with-an-rsa-key"
    ),
    pytest.param(
        lambda m: _iap_signed(lambda _: None, "none")(m) + "AAAA",
        401,
        "alg_not_allowed",
        id="alg-none",
    ),
    pytest.param(
        lambda m: m.google_iap(aud=OTHER_IAP_AUDIENCE).value,
        401,
        "bad_audience",
        id="another-backend-service",
    ),
    pytest.param(
        lambda m: m.google_iap(iss="https://cloud.google.com/iap/").value,
        401,
        "bad_issuer",
        id="iss-trailing-slash",
    ),
    pytest.param(
        _iap_signed(lambda _: _another_ec_key(), "ES256"),
        401,
        "bad_signature",
        id="another-key-under-the-kid",
    ),
    pytest.param(lambda m: m.google_iap(ttl=-600).value, 401, "expired", id="expired"),
    pytest.param(
        lambda m: dev.mint(
            m.iap_key(),
            {k: v for k, v in dev.iap_claims(now=time.time()).items() if k != "sub"},
        ),
        401,
        "bad_claims",
        id="no-sub",
    ),
    pytest.param(
        _iap_signed(Minter.iap_key, "ES256", typ="at+jwt"),
        401,
        "bad_header",
        id="access-token-typ",
    ),
    pytest.param(
        lambda m: _pad_signature(m.google_iap().value), 401, "malformed", id="padded-like-an-alb"
    ),
]


@pytest.mark.parametrize(("build", "status", "reason"), IAP_VARIANTS)
def test_iap_hostile_variants(visit, mint, build, status, reason):
    seen = send(visit, "/iap/", build(mint), "iap")

    if status == 200:
        assert seen.status == 200, seen.audit
        assert seen.audit["issuer"] == "iap"
    else:
        assert_refused(seen, status, reason)


def _oidc_signed(m: Minter, key: Any = None, algorithm: str = "RS256", **header: Any) -> str:
    claims = dev.oidc_claims(now=time.time(), iss=m.oidc_issuer)
    headers = {"kid": m.oidc_files.kid, **header}
    return jwt.encode(claims, key or m.oidc_key(), algorithm=algorithm, headers=headers)


OIDC_VARIANTS = [
    pytest.param(lambda m: m.oidc().value, 200, None, id="as-the-provider-signs"),
    pytest.param(lambda m: _oidc_signed(m, x5t="AbCd"), 200, None, id="x5t"),
    pytest.param(lambda m: _oidc_signed(m, typ="at+jwt"), 200, None, id="access-token"),
    pytest.param(
        lambda m: _oidc_signed(m, jku=f"{m.oidc_issuer}/jwks.json"), 401, "bad_header", id="jku"
    ),
    pytest.param(
        lambda m: m.oidc(aud=["someone-else"]).value, 401, "bad_audience", id="another-client"
    ),
    pytest.param(
        lambda m: dev.mint(m.oidc_key(), dev.oidc_claims(now=time.time(), iss=m.oidc_issuer + "/")),
        401,
        "bad_issuer",
        id="iss-trailing-slash",
    ),
    pytest.param(
        lambda m: _oidc_signed(m, _another_ec_key(), "ES256"), 401, "alg_not_allowed", id="es256"
    ),
    pytest.param(
        lambda m: _oidc_signed(m, kid="no-such-kid"), 401, "unknown_kid", id="unknown-kid"
    ),
    pytest.param(
        lambda m: _pad_signature(m.oidc().value), 401, "malformed", id="padded-like-an-alb"
    ),
]


@pytest.mark.parametrize(("build", "status", "reason"), OIDC_VARIANTS)
def test_oidc_hostile_variants(visit, mint, build, status, reason):
    seen = send(visit, "/oidc/", build(mint), "bearer")

    if status == 200:
        assert seen.status == 200, seen.audit
        assert seen.audit["issuer"] == "oidc"
    else:
        assert_refused(seen, status, reason)


# --- nginx's micro-cache keeps each provider's users apart ----------------------------------------


@pytest.fixture(scope="module")
def microcache_visit(tmp_path_factory, issuers) -> Iterator[Visitor]:
    """A stack of its own in micro-cache mode, with the server snippet rendered for these
    issuers: its cache key must hold every place a token may arrive, not only Cloudflare's."""
    workdir = tmp_path_factory.mktemp("providers-microcache")
    policies = {"any": POLICIES["any"]}
    config = write_config(workdir, issuers=issuers, policies=policies, nginx_cache_seconds=30)
    with (
        running_stack(workdir, config, microcache=True) as running,
        httpx.Client(base_url=running.url, timeout=15.0) as http,
    ):
        yield Visitor(running, http)


def cache_status(visit: Visitor, seen: Visit) -> str:
    """HIT or MISS: what nginx's micro-cache access log says of this visit."""

    def logged() -> str | None:
        lines = [x for x in visit.stack.nginx.microcache_lines() if x["uri"] == seen.path]
        return str(lines[0]["cache"]) if lines else None

    return wait_for(logged, what=f"the access log line of {seen.path}", timeout=5.0)


@pytest.mark.parametrize("provider", ["google_iap", "aws_alb", "oidc"])
def test_the_micro_cache_never_hands_one_users_allow_to_another(microcache_visit, mint, provider):
    visit = microcache_visit
    alice = getattr(mint, provider)(email="alice@example.com")
    bob = getattr(mint, provider)(email="bob@example.com")

    first = send(visit, "/any/", alice)
    other_user = send(visit, "/any/", bob)  # must reach authd: another token, another key
    again = visit("/any/", headers=[alice.header()], audited=False)
    nobody = visit("/any/")

    assert (first.status, cache_status(visit, first)) == (200, "MISS")
    assert (other_user.status, cache_status(visit, other_user)) == (200, "MISS")
    assert other_user.audit["email"] == "bob@example.com"
    assert other_user.received is not None
    assert other_user.received.values("x-authd-email") == ["bob@example.com"]
    assert (again.status, cache_status(visit, again)) == (200, "HIT")
    assert again.received is not None
    assert again.received.values("x-authd-email") == ["alice@example.com"]
    assert_refused(nobody, 401, "no_token")
    assert cache_status(visit, nobody) == "MISS"
