import base64
import json

import jwt
import pytest
from jwt.algorithms import RSAAlgorithm

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
    assert "d" not in jwk
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
