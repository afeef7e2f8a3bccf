import base64
import hashlib
import json
import re
import time
import uuid

import jwt
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from authd import dev


def test_keygen_writes_a_private_key_and_a_cloudflare_shaped_key_set(tmp_path):
    pem, jwks = dev.keygen(tmp_path / "keys")
    assert pem.stat().st_mode & 0o777 == 0o600
    doc = json.loads(jwks.read_text())
    (jwk,) = doc["keys"]
    assert set(doc) == {"keys", "public_cert", "public_certs"}
    assert len(jwk["kid"]) == 64
    assert all(c in "0123456789abcdef" for c in jwk["kid"])
    assert (jwk["kty"], jwk["alg"], jwk["use"]) == ("RSA", "RS256", "sig")
    assert set(jwk) == {"kid", "kty", "alg", "use", "e", "n"}  # no private "d", no key_ops
    assert doc["public_certs"][0]["kid"] == jwk["kid"]
    assert doc["public_cert"]["cert"].startswith("-----BEGIN CERTIFICATE-----")
    assert jwk["kid"] == dev.thumbprint(dev.load_private_key(pem).public_key())


def test_thumbprint_follows_rfc_7638():
    # RFC 7638 section 3.1's example key and thumbprint (base64url of the SHA-256).
    key = RSAAlgorithm.from_jwk(
        {
            "kty": "RSA",
            "e": "AQAB",
            "n": (
                "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1"
                "L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4"
                "QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbO"
                "pbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csF"
                "Cur-kEgU8awapJzKnqDKgw"
            ),
        },
    )
    expected_b64 = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    digest = base64.urlsafe_b64decode(expected_b64 + "=")
    assert dev.thumbprint(key) == digest.hex()


def test_user_claims_look_like_cloudflares():
    c = dev.claims(now=1000, email="bob@example.com", extra={"custom.groups": ["sre"]})
    assert c["type"] == "app"
    assert (c["iat"], c["nbf"], c["exp"]) == (1000, 1000, 4600)
    assert c["email"] == "bob@example.com"
    assert c["custom"] == {"groups": ["sre"]}
    assert c["aud"] == [dev.DEV_AUDIENCE]
    assert c["iss"] == dev.DEV_ISSUER
    assert c["sub"] == dev.claims(now=5, email="bob@example.com")["sub"]  # stable per email


def test_service_token_claims():
    c = dev.claims(now=1000, service_token="abc.access")
    assert (c["common_name"], c["sub"]) == ("abc.access", "")
    assert "email" not in c
    assert "nbf" not in c


def test_an_expired_token_was_issued_before_it_expired():
    c = dev.claims(now=10_000, ttl=-60)
    assert c["exp"] == 9940
    assert c["iat"] < c["exp"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("country=NL", ("country", "NL")),
        ("level=3", ("level", 3)),
        ('custom.groups=["a","b"]', ("custom.groups", ["a", "b"])),
        ("flag=true", ("flag", True)),
        ("note=not json", ("note", "not json")),
        ("empty=", ("empty", "")),
    ],
)
def test_claim_arguments(text, expected):
    assert dev.parse_claim_argument(text) == expected


@pytest.mark.parametrize("text", ["novalue", "=x"])
def test_bad_claim_arguments(text):
    with pytest.raises(ValueError, match="KEY=VALUE"):
        dev.parse_claim_argument(text)


def test_mint_signs_with_the_thumbprint_as_kid(tmp_path):
    pem, _ = dev.keygen(tmp_path)
    key = dev.load_private_key(pem)
    token = dev.mint(key, {"a": 1})
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "RS256", "kid": dev.thumbprint(key.public_key()), "typ": "JWT"}
    assert jwt.decode(token, key.public_key(), algorithms=["RS256"]) == {"a": 1}


# --- other providers' keys --------------------------------------------------------------------


def b64decode_padded(segment: str) -> bytes:
    """base64url that must carry its '=' padding, as an ALB writes every segment."""
    assert len(segment) % 4 == 0, segment
    return base64.urlsafe_b64decode(segment)


def test_keygen_without_a_provider_is_cloudflares(tmp_path):
    files = dev.write_keys(tmp_path)
    assert (files.provider, files.public) == ("cloudflare", (tmp_path / "jwks.json",))
    assert set(json.loads(files.public[0].read_text())) == {"keys", "public_cert", "public_certs"}


def test_iap_keygen_writes_an_ec_jwks_in_iaps_shape(tmp_path):
    files = dev.write_keys(tmp_path, "google-iap")
    assert files.private.stat().st_mode & 0o777 == 0o600
    assert files.public == (tmp_path / "jwks.json",)
    doc = json.loads(files.public[0].read_text())
    (key,) = doc["keys"]
    assert set(doc) == {"keys"}
    assert set(key) == {"kid", "alg", "use", "kty", "crv", "x", "y"}  # no private "d"
    assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("EC", "P-256", "ES256", "sig")
    private = dev.load_ec_private_key(files.private)
    assert key["kid"] == files.kid == dev.thumbprint(private.public_key())
    assert ECAlgorithm.from_jwk(key).public_numbers() == private.public_key().public_numbers()


def test_alb_keygen_writes_the_pem_public_key_under_its_kid(tmp_path):
    files = dev.write_keys(tmp_path, "aws-alb")
    private = dev.load_ec_private_key(files.private)
    assert files.public == (tmp_path / "alb-keys" / files.kid,)
    assert not (tmp_path / "jwks.json").exists()
    assert str(uuid.UUID(files.kid)) == files.kid  # UUID-shaped, like an ALB's kids
    assert re.fullmatch(r"[A-Za-z0-9-]{1,128}", files.kid)  # what authd puts in a URL
    pem = files.public[0].read_bytes()
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----\n")
    public = serialization.load_pem_public_key(pem)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)
    assert public.public_numbers() == private.public_key().public_numbers()
    assert files.kid == dev.alb_kid(private.public_key())


def test_a_second_alb_keygen_keeps_the_first_public_key(tmp_path):
    first = dev.write_keys(tmp_path, "aws-alb")
    second = dev.write_keys(tmp_path, "aws-alb")
    assert first.kid != second.kid
    assert sorted(p.name for p in (tmp_path / "alb-keys").iterdir()) == sorted(
        [first.kid, second.kid],
    )


def test_oidc_keygen_writes_a_jwks_and_a_discovery_document(tmp_path):
    files = dev.write_keys(tmp_path, "oidc", issuer="http://127.0.0.1:8002")
    assert files.public == (tmp_path / "jwks.json", tmp_path / "openid-configuration.json")
    doc = json.loads(files.public[0].read_text())
    (key,) = doc["keys"]
    assert set(doc) == {"keys"}
    assert set(key) == {"kid", "alg", "use", "kty", "n", "e"}
    assert (
        key["kid"] == files.kid == dev.thumbprint(dev.load_private_key(files.private).public_key())
    )
    discovery = json.loads(files.public[1].read_text())
    assert discovery["issuer"] == "http://127.0.0.1:8002"
    assert discovery["jwks_uri"] == "http://127.0.0.1:8002/jwks.json"
    for member in ("response_types_supported", "subject_types_supported"):
        assert discovery[member]  # required by OpenID Connect Discovery
    assert discovery["id_token_signing_alg_values_supported"] == ["RS256"]


def test_the_discovery_document_keeps_the_issuer_exactly():
    discovery = dev.oidc_discovery("https://idp.example.com/realms/x/")
    assert discovery["issuer"] == "https://idp.example.com/realms/x/"
    assert discovery["jwks_uri"] == "https://idp.example.com/realms/x/jwks.json"


@pytest.mark.parametrize(
    ("provider", "issuer", "message"),
    [
        ("oidc", None, "needs its issuer URL"),
        ("oidc", "http://idp.example.com", "plain http is allowed only for loopback"),
        ("oidc", "ftp://127.0.0.1", "https"),
        ("cloudflare", "https://idp.example.com", "only an OIDC provider"),
        ("aws-alb", "https://idp.example.com", "only an OIDC provider"),
    ],
)
def test_keygen_refuses_a_missing_or_unfetchable_issuer(tmp_path, provider, issuer, message):
    with pytest.raises(ValueError, match=message):
        dev.write_keys(tmp_path / "k", provider, issuer=issuer)
    assert not (tmp_path / "k").exists()  # checked before anything is written


def test_keygen_makes_an_existing_private_key_file_0600(tmp_path):
    (tmp_path / "private.pem").write_text("old")
    (tmp_path / "private.pem").chmod(0o644)
    files = dev.write_keys(tmp_path, "google-iap")
    assert files.private.stat().st_mode & 0o777 == 0o600
    dev.load_ec_private_key(files.private)


def test_ec_thumbprint_follows_rfc_7638():
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    members = ECAlgorithm.to_jwk(key, as_dict=True)
    canonical = json.dumps(
        {m: members[m] for m in ("crv", "kty", "x", "y")},
        separators=(",", ":"),
    )
    assert dev.thumbprint(key) == hashlib.sha256(canonical.encode()).hexdigest()


def test_ec_thumbprint_keeps_a_coordinates_leading_zero_bytes():
    # RFC 7518 6.2.1.2: x is the full 32 bytes; a minimal encoding would change the thumbprint.
    key = next(
        k
        for k in (ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(5000))
        if k.public_numbers().x < 2**248
    )
    x = key.public_numbers().x.to_bytes(32, "big")
    y = key.public_numbers().y.to_bytes(32, "big")
    canonical = json.dumps(
        {
            "crv": "P-256",
            "kty": "EC",
            "x": base64.urlsafe_b64encode(x).rstrip(b"=").decode(),
            "y": base64.urlsafe_b64encode(y).rstrip(b"=").decode(),
        },
        separators=(",", ":"),
    )
    assert dev.thumbprint(key) == hashlib.sha256(canonical.encode()).hexdigest()
    assert dev.jwk(key)["x"] == base64.urlsafe_b64encode(x).rstrip(b"=").decode()


def test_an_es256_jwk_must_be_on_p256():
    with pytest.raises(TypeError, match="P-256"):
        dev.jwk(ec.generate_private_key(ec.SECP384R1()).public_key())


# --- other providers' claims ------------------------------------------------------------------


def test_iap_claims_look_like_iaps():
    c = dev.iap_claims(now=1000, email="bob@corp.example")
    assert c == {
        "aud": dev.DEV_IAP_AUDIENCE,
        "email": "bob@corp.example",
        "exp": 1600,
        "iat": 1000,
        "iss": "https://cloud.google.com/iap",
        "sub": c["sub"],
        "hd": "corp.example",
        "google": {"access_levels": []},
    }
    assert re.fullmatch(r"accounts\.google\.com:1\d{20}", c["sub"])
    assert c["sub"] == dev.iap_claims(now=5, email="bob@corp.example")["sub"]  # stable per email
    assert c["sub"] != dev.iap_claims(now=5, email="eve@corp.example")["sub"]
    assert re.fullmatch(r"/projects/\d+/global/backendServices/\d+", dev.DEV_IAP_AUDIENCE)


def test_alb_claims_are_user_info_with_exp_and_iss_and_no_aud():
    c = dev.alb_claims(now=1000, email="bob@example.com", extra={"name": "Bob"})
    assert c == {
        "sub": c["sub"],
        "email": "bob@example.com",
        "email_verified": True,
        "exp": 4600,
        "iss": dev.DEV_ALB_ISSUER,
        "name": "Bob",
    }
    assert c["sub"] == dev.claims(now=1, email="bob@example.com")["sub"]


def test_oidc_claims_have_the_client_id_as_audience():
    c = dev.oidc_claims(now=1000, iss="https://idp.example.com", ttl=-60)
    assert c == {
        "iss": "https://idp.example.com",
        "aud": dev.DEV_OIDC_CLIENT_ID,
        "sub": c["sub"],
        "email": dev.DEV_EMAIL,
        "email_verified": True,
        "iat": 940 - 3600,
        "exp": 940,
    }
    assert dev.oidc_claims(now=0, iss="https://i", aud=["a", "b"])["aud"] == ["a", "b"]


# --- other providers' tokens, verified with the public half keygen wrote ---------------------


def test_an_iap_token_verifies_with_the_jwks_keygen_wrote(tmp_path):
    files = dev.write_keys(tmp_path, "google-iap")
    token = dev.mint_token("google-iap", files.private, now=time.time(), email="bob@corp.example")
    (key,) = json.loads(files.public[0].read_text())["keys"]
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": key["kid"], "typ": "JWT"}
    assert "=" not in token
    claims = jwt.decode(
        token,
        ECAlgorithm.from_jwk(key),
        algorithms=["ES256"],
        audience=dev.DEV_IAP_AUDIENCE,
        issuer="https://cloud.google.com/iap",
    )
    assert (claims["email"], claims["hd"]) == ("bob@corp.example", "corp.example")
    assert claims["exp"] - claims["iat"] == 600  # IAP's tokens live 10 minutes


def alb_parts(token):
    header, payload, signature = token.split(".")
    return (
        json.loads(b64decode_padded(header)),
        json.loads(b64decode_padded(payload)),
        b64decode_padded(signature),
    )


def verify_alb(token, public):
    """ECDSA P-256 SHA-256 over the segments as they are, padding included (as AWS signs)."""
    header, payload, signature = token.split(".")
    raw = b64decode_padded(signature)
    assert len(raw) == 64  # r || s, not DER
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public.verify(der, f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))


def test_an_alb_token_is_padded_and_verifies_over_the_padded_segments(tmp_path):
    files = dev.write_keys(tmp_path, "aws-alb")
    token = dev.mint_token(
        "aws-alb",
        files.private,
        now=time.time(),
        signer="arn:aws:elasticloadbalancing:us-east-1:111122223333:loadbalancer/app/wiki/1",
        client="wiki-client",
    )
    public = serialization.load_pem_public_key(files.public[0].read_bytes())
    verify_alb(token, public)
    header, payload, _ = alb_parts(token)
    assert header == {
        "alg": "ES256",
        "kid": files.kid,
        "signer": "arn:aws:elasticloadbalancing:us-east-1:111122223333:loadbalancer/app/wiki/1",
        "iss": dev.DEV_ALB_ISSUER,
        "client": "wiki-client",
        "exp": payload["exp"],
        "typ": "JWT",
    }
    assert set(payload) == {"sub", "email", "email_verified", "exp", "iss"}
    assert payload["iss"] == header["iss"]
    # Every segment is exactly the padded encoding of its bytes; the signature's 64 bytes
    # always need padding, so the token always shows it.
    for segment in token.split("."):
        assert segment == base64.urlsafe_b64encode(b64decode_padded(segment)).decode()
    assert token.endswith("==")


def test_an_alb_signature_does_not_survive_stripping_the_padding(tmp_path):
    files = dev.write_keys(tmp_path, "aws-alb")
    public = serialization.load_pem_public_key(files.public[0].read_bytes())
    # A payload whose encoding needs padding (one of three lengths in a row does).
    tokens = [
        dev.mint_token("aws-alb", files.private, now=time.time(), extra={"pad": "x" * n})
        for n in range(3)
    ]
    token = next(t for t in tokens if t.split(".")[1].endswith("="))
    verify_alb(token, public)
    header, payload, signature = token.split(".")
    with pytest.raises(InvalidSignature):
        verify_alb(f"{header.rstrip('=')}.{payload.rstrip('=')}.{signature}", public)


def test_an_oidc_token_verifies_with_the_jwks_keygen_wrote(tmp_path):
    files = dev.write_keys(tmp_path, "oidc", issuer="https://idp.example.com")
    token = dev.mint_token(
        "oidc", files.private, now=time.time(), iss="https://idp.example.com", aud=["wiki"]
    )
    (key,) = json.loads(files.public[0].read_text())["keys"]
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": key["kid"], "typ": "JWT"}
    claims = jwt.decode(
        token,
        RSAAlgorithm.from_jwk(key),
        algorithms=["RS256"],
        audience="wiki",
        issuer="https://idp.example.com",
    )
    assert claims["aud"] == "wiki"
    assert set(claims) == {"iss", "aud", "sub", "email", "email_verified", "iat", "exp"}


def test_a_cloudflare_token_from_mint_token_is_as_before(tmp_path):
    pem, jwks = dev.keygen(tmp_path)
    token = dev.mint_token("cloudflare", pem, now=time.time(), service_token="abc.access")
    (key,) = json.loads(jwks.read_text())["keys"]
    claims = jwt.decode(
        token, RSAAlgorithm.from_jwk(key), algorithms=["RS256"], audience=dev.DEV_AUDIENCE
    )
    assert (claims["iss"], claims["common_name"], claims["type"]) == (
        dev.DEV_ISSUER,
        "abc.access",
        "app",
    )


@pytest.mark.parametrize(
    ("provider", "options", "message"),
    [
        ("google-iap", {"token_type": "org"}, "--type is only for --provider cloudflare"),
        ("oidc", {"service_token": "x"}, "--service-token is only for --provider cloudflare"),
        ("cloudflare", {"signer": "arn:x"}, "--signer is only for --provider aws-alb"),
        ("google-iap", {"client": "c"}, "--client is only for --provider aws-alb"),
        ("aws-alb", {"aud": ["x"]}, "no aud"),
        ("google-iap", {"aud": ["a", "b"]}, "one string"),
        ("oidc", {}, "needs --iss"),
    ],
)
def test_mint_token_refuses_options_the_provider_has_no_place_for(
    tmp_path, provider, options, message
):
    with pytest.raises(ValueError, match=message):
        dev.mint_token(provider, tmp_path / "unread.pem", now=0, **options)


@pytest.mark.parametrize(
    ("key_provider", "provider", "message"),
    [
        ("cloudflare", "google-iap", "not an EC P-256 private key: google-iap tokens are ES256"),
        ("oidc", "aws-alb", "not an EC P-256 private key: aws-alb tokens are ES256"),
        ("google-iap", "cloudflare", "not an RSA private key: cloudflare tokens are RS256"),
        ("aws-alb", "oidc", "not an RSA private key: oidc tokens are RS256"),
    ],
)
def test_mint_token_refuses_a_key_of_the_wrong_kind(tmp_path, key_provider, provider, message):
    issuer = "https://idp.example.com" if key_provider == "oidc" else None
    files = dev.write_keys(tmp_path, key_provider, issuer=issuer)
    iss = "https://idp.example.com" if provider == "oidc" else None
    with pytest.raises(TypeError, match=message):
        dev.mint_token(provider, files.private, now=0, iss=iss)


def test_mint_refuses_an_ec_key_off_p256():
    with pytest.raises(TypeError, match="P-256"):
        dev.mint(ec.generate_private_key(ec.SECP384R1()), {"a": 1})


def test_mint_token_refuses_a_file_that_is_not_a_private_key(tmp_path):
    files = dev.write_keys(tmp_path, "aws-alb")
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        dev.mint_token("aws-alb", files.public[0], now=0)
