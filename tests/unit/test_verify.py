# ruff: noqa: ARG005 -- table rows share one builder signature; not every row needs its argument
"""authd.verify: every class of hostile token in the threat model, one table per reason code.

Each case is a concrete token built byte for byte and pushed through ``Verifier.verify``; the
assertion is the exact reason code nginx and the audit log would see. Property-based tests then
throw arbitrary text, arbitrary JSON and arbitrary mutations at the verifier, and Wycheproof's
vectors check the signature primitives authd hands tokens to.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jwt.algorithms import RSAAlgorithm

from authd.claims import Claims
from authd.config import ASYMMETRIC_ALGORITHMS
from authd.dev import key_set, thumbprint
from authd.errors import Denied, FetchError, KeysUnavailable, Reason
from authd.keys import IssuerKeys, KeyStore, VerifyKey, parse_key_set
from authd.verify import (
    MAX_LIFETIME_SECONDS,
    MAX_TOKEN_BYTES,
    Verifier,
    check_header,
    check_signature,
    decode_json_segment,
    split,
)
from tests.conftest import (
    AUD,
    DROP,
    ISSUER,
    NOW,
    OTHER_AUD,
    FakeClock,
    FakeSource,
    Forge,
    Raw,
    b64,
    issuer_config,
    to_json,
)

LEEWAY = 30
OTHER_ISSUER = "https://other.cloudflareaccess.com"
SERVICE_TOKEN_ID = "e367826f93b8d71185e03fe518aff3b4.access"
WYCHEPROOF = Path(__file__).resolve().parents[1] / "data" / "wycheproof"


def with_duplicate(obj: dict[str, object], name: str, value: object) -> str:
    """The JSON of ``obj`` with a second ``name`` member appended."""
    text = to_json(obj)
    return text[:-1] + f",{json.dumps(name)}:{json.dumps(value)}}}"


class Mint(Forge):
    """The shared forge, plus real signatures in every other algorithm and HMAC forgeries."""

    def __init__(self, key: rsa.RSAPrivateKey, kid: str, foreign: rsa.RSAPrivateKey) -> None:
        super().__init__(key, kid)
        self.foreign = foreign
        self.ec_key = ec.generate_private_key(ec.SECP256R1())
        self.ed_key = ed25519.Ed25519PrivateKey.generate()

    def with_claims(self, **overrides: object) -> str:
        return self.token(payload=self.claims(**overrides))

    def with_header(self, **overrides: object) -> str:
        return self.token(header=self.header(**overrides))

    def signed_by(self, alg: str, header: dict[str, object] | None = None, **claims) -> str:
        """A token whose header says ``alg`` and whose signature really is ``alg``."""
        h = self.header(alg=alg) if header is None else header
        signing_input = f"{b64(to_json(h))}.{b64(to_json(self.claims(**claims)))}"
        data = signing_input.encode()
        if alg.startswith("RS"):
            digest = {"RS256": hashes.SHA256(), "RS384": hashes.SHA384(), "RS512": hashes.SHA512()}
            sig = self.key.sign(data, padding.PKCS1v15(), digest[alg])
        elif alg == "PS256":
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            sig = self.key.sign(data, pss, hashes.SHA256())
        elif alg == "ES256":
            r, s = decode_dss_signature(self.ec_key.sign(data, ec.ECDSA(hashes.SHA256())))
            sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        elif alg == "EdDSA":
            sig = self.ed_key.sign(data)
        else:
            raise AssertionError(alg)
        return f"{signing_input}.{b64(sig)}"

    def hmac(self, alg: str, secret: bytes, header: dict[str, object] | None = None) -> str:
        """HS* keyed with ``secret``: the RS256 -> HS256 confusion attack."""
        h = self.header(alg=alg) if header is None else header
        signing_input = f"{b64(to_json(h))}.{b64(to_json(self.claims()))}"
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
        mac = hmac.new(secret, signing_input.encode(), digest.get(alg, hashlib.sha256)).digest()
        return f"{signing_input}.{b64(mac)}"

    def public_encodings(self) -> dict[str, bytes]:
        """Every form of the public key an attacker could use as an HMAC secret."""
        public = self.key.public_key()
        ser = serialization
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        n = public.public_numbers().n
        return {
            "spki-pem": public.public_bytes(
                ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo
            ),
            "pkcs1-pem": public.public_bytes(ser.Encoding.PEM, ser.PublicFormat.PKCS1),
            "spki-der": public.public_bytes(
                ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo
            ),
            "pkcs1-der": public.public_bytes(ser.Encoding.DER, ser.PublicFormat.PKCS1),
            "openssh": public.public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH),
            "jwk-json": json.dumps(jwk).encode(),
            "jwk-n-bytes": n.to_bytes((n.bit_length() + 7) // 8, "big"),
            "jwk-n-b64": jwk["n"].encode(),
            "kid": self.kid.encode(),
            "empty": b"",
        }


@pytest.fixture(scope="session")
def mint(rsa_key, kid, foreign_key) -> Mint:
    return Mint(rsa_key, kid, foreign_key)


@pytest.fixture
def verifier(store, clock) -> Verifier:
    return Verifier(issuers=(issuer_config(),), keys=store, clock=clock, leeway=LEEWAY)


async def reason_of(verifier: Verifier, token: str, audience: tuple[str, ...] = (AUD,)) -> Reason:
    with pytest.raises(Denied) as ex:
        await verifier.verify(token, audience)
    return ex.value.reason


Build = Callable[[Mint], str]


def segments(token: str) -> list[str]:
    return token.split(".")


def replace_segment(token: str, index: int, new: str) -> str:
    parts = segments(token)
    parts[index] = new
    return ".".join(parts)


def replace_char(token: str, segment: int, position: int, char: str) -> str:
    seg = segments(token)[segment]
    return replace_segment(token, segment, seg[:position] + char + seg[position + 1 :])


def signing_input(token: str) -> str:
    return token.rsplit(".", 1)[0]


def resigned(
    m: Mint,
    *,
    over: str | None = None,
    scheme: padding.AsymmetricPadding | None = None,
    digest: hashes.HashAlgorithm | None = None,
) -> str:
    """A valid token whose signature is the real key's, but over ``over`` or in another scheme."""
    head = signing_input(m.valid())
    data = (head if over is None else over).encode()
    signature = m.key.sign(data, scheme or padding.PKCS1v15(), digest or hashes.SHA256())
    return f"{head}.{b64(signature)}"


def padded(segment: str) -> str:
    """The segment with the ``=`` padding RFC 7515 forbids."""
    assert len(segment) % 4, "segment needs a length that is not a multiple of 4"
    return segment + "=" * (-len(segment) % 4)


def length_mod4_is_1(segment: str) -> str:
    """A length no base64 can have (one character beyond a full quantum)."""
    return segment + "A" * ((1 - len(segment)) % 4)


_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def noncanonical(segment: str) -> str:
    """Same bytes, different spelling: set a stray bit in the unused low bits of the last char."""
    assert len(segment) % 4 in (2, 3)
    last = _ALPHABET.index(segment[-1])
    return segment[:-1] + _ALPHABET[last + 1]


def odd_length_json(obj: dict[str, object]) -> str:
    """The JSON of ``obj`` padded with trailing blanks so its base64url length % 4 == 2."""
    text = to_json(obj)
    return text + " " * ((1 - len(text)) % 3)


def odd_length_token(m: Mint) -> str:
    return m.raw(odd_length_json(m.header()), odd_length_json(m.claims()))


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# ---------------------------------------------------------------------------------------------
# 0. The valid token: the fixed point every hostile variant below departs from


async def test_valid_token_returns_claims_with_every_derived_field(verifier, mint, kid):
    claims = await verifier.verify(mint.valid(), (AUD,))
    assert isinstance(claims, Claims)
    assert claims.email == "alice@example.com"
    assert claims.sub == "7335d417-61da-459d-899c-0a01c76a8e1f"
    assert claims.user == "alice@example.com"
    assert claims.service_token == ""
    assert claims.iss == ISSUER
    assert claims.issuer_name == "team"
    assert claims.kid == kid
    assert claims.alg == "RS256"
    assert claims.exp == NOW + 3600
    assert claims.get("custom.groups") == ["sre", "ops"]
    with pytest.raises(TypeError):  # verified claims cannot be edited after the fact
        claims.payload["email"] = "mallory@example.com"  # type: ignore[index]


async def test_valid_token_from_the_shared_forge_is_accepted(verifier, forge):
    claims = await verifier.verify(forge.valid(), (AUD,))
    assert claims.email == "alice@example.com"


async def test_policy_with_several_audiences_accepts_any_of_them(verifier, mint):
    claims = await verifier.verify(mint.with_claims(aud=[OTHER_AUD]), (AUD, OTHER_AUD))
    assert claims.email == "alice@example.com"


# ---------------------------------------------------------------------------------------------
# 3 + 4. Size and structure

STRUCTURE: list = [
    pytest.param(lambda m: "", Reason.MALFORMED, id="empty-string"),
    pytest.param(lambda m: segments(m.valid())[0], Reason.MALFORMED, id="one-segment"),
    pytest.param(
        lambda m: ".".join(segments(m.valid())[:2]),
        Reason.MALFORMED,
        id="two-segments",
    ),
    pytest.param(lambda m: m.valid() + "." + b64("x"), Reason.MALFORMED, id="four-segments"),
    pytest.param(
        lambda m: (
            f"{b64(json.dumps({'alg': 'RSA-OAEP', 'enc': 'A256GCM'}))}"
            ".OKOawDo13gRp2ojaHV7LFpZcgV7T6DVZKTyKOMTYUmKoTCVJRgckCL9kiMT03JGe"
            ".48V1_ALb6US04U3b.5eym8TW_c8SuK0ltJ3rpYIzOeDQz7TALvtu6UG9oMo4vpzs9tX_EFShS8iB7j6ji"
            ".XFBoMYUZodetZdvTiFvSkQ"
        ),
        Reason.MALFORMED,
        id="five-segments-jwe",
    ),
    pytest.param(
        lambda m: json.dumps(
            dict(zip(("protected", "payload", "signature"), segments(m.valid()), strict=True)),
        ),
        Reason.MALFORMED,
        id="json-serialization-flattened",
    ),
    pytest.param(
        lambda m: json.dumps(
            {
                "payload": segments(m.valid())[1],
                "signatures": [
                    {"protected": segments(m.valid())[0], "signature": segments(m.valid())[2]},
                ],
            },
        ),
        Reason.MALFORMED,
        id="json-serialization-general",
    ),
    pytest.param(lambda m: "..", Reason.MALFORMED, id="only-dots"),
    pytest.param(lambda m: "." + m.valid(), Reason.MALFORMED, id="leading-dot"),
    pytest.param(lambda m: m.valid() + ".", Reason.MALFORMED, id="trailing-dot"),
    pytest.param(lambda m: replace_segment(m.valid(), 0, ""), Reason.MALFORMED, id="empty-header"),
    pytest.param(
        lambda m: replace_segment(m.valid(), 1, ""),
        Reason.MALFORMED,
        id="empty-payload",
    ),
    pytest.param(
        lambda m: replace_segment(m.valid(), 2, ""),
        Reason.BAD_SIGNATURE,
        id="empty-signature",
    ),
    pytest.param(
        lambda m: m.valid().replace(".", ".."),
        Reason.MALFORMED,
        id="double-dots",
    ),
    # base64url alphabet and padding
    pytest.param(
        lambda m: replace_segment(odd_length_token(m), 0, padded(segments(odd_length_token(m))[0])),
        Reason.MALFORMED,
        id="padding-in-header",
    ),
    pytest.param(
        lambda m: replace_segment(odd_length_token(m), 1, padded(segments(odd_length_token(m))[1])),
        Reason.MALFORMED,
        id="padding-in-payload",
    ),
    pytest.param(
        lambda m: replace_segment(m.valid(), 2, padded(segments(m.valid())[2])),
        Reason.MALFORMED,
        id="padding-in-signature",
    ),
    pytest.param(lambda m: replace_char(m.valid(), 0, 3, "+"), Reason.MALFORMED, id="plus-header"),
    pytest.param(
        lambda m: replace_char(m.valid(), 1, 7, "/"), Reason.MALFORMED, id="slash-payload"
    ),
    pytest.param(lambda m: replace_char(m.valid(), 2, 0, "+"), Reason.MALFORMED, id="plus-sig"),
    pytest.param(lambda m: replace_char(m.valid(), 2, 9, "/"), Reason.MALFORMED, id="slash-sig"),
    pytest.param(
        lambda m: replace_char(m.valid(), 1, 4, "="), Reason.MALFORMED, id="equals-inside"
    ),
    pytest.param(lambda m: replace_char(m.valid(), 0, 4, "*"), Reason.MALFORMED, id="asterisk"),
    pytest.param(
        lambda m: m.valid().replace(".", "%2E", 1), Reason.MALFORMED, id="url-encoded-dot"
    ),
    # whitespace
    pytest.param(lambda m: " " + m.valid(), Reason.MALFORMED, id="leading-space"),
    pytest.param(lambda m: m.valid() + " ", Reason.MALFORMED, id="trailing-space"),
    pytest.param(lambda m: replace_char(m.valid(), 1, 10, " "), Reason.MALFORMED, id="inner-space"),
    pytest.param(lambda m: m.valid() + "\t", Reason.MALFORMED, id="trailing-tab"),
    pytest.param(lambda m: replace_char(m.valid(), 0, 2, "\t"), Reason.MALFORMED, id="inner-tab"),
    pytest.param(lambda m: m.valid() + "\n", Reason.MALFORMED, id="trailing-newline"),
    pytest.param(lambda m: m.valid() + "\r\n", Reason.MALFORMED, id="trailing-crlf"),
    pytest.param(lambda m: "\n" + m.valid(), Reason.MALFORMED, id="leading-newline"),
    pytest.param(
        lambda m: m.valid().replace(".", ".\n", 1),
        Reason.MALFORMED,
        id="newline-after-dot",
    ),
    pytest.param(
        lambda m: replace_segment(
            m.valid(),
            2,
            "\n".join(segments(m.valid())[2][i : i + 76] for i in range(0, 342, 76)),
        ),
        Reason.MALFORMED,
        id="mime-wrapped-signature",
    ),
    # non-ASCII and NUL
    pytest.param(lambda m: replace_char(m.valid(), 1, 5, "é"), Reason.MALFORMED, id="latin1-char"),
    pytest.param(
        lambda m: replace_char(m.valid(), 0, 1, "\u0410"), Reason.MALFORMED, id="cyrillic-A"
    ),
    pytest.param(lambda m: m.valid().replace(".", "\uff0e"), Reason.MALFORMED, id="fullwidth-dots"),
    pytest.param(lambda m: m.valid() + "\u200b", Reason.MALFORMED, id="zero-width-space"),
    pytest.param(lambda m: "\ufeff" + m.valid(), Reason.MALFORMED, id="bom-prefix"),
    pytest.param(lambda m: m.valid() + "\x00", Reason.MALFORMED, id="trailing-nul"),
    pytest.param(lambda m: replace_char(m.valid(), 1, 3, "\x00"), Reason.MALFORMED, id="inner-nul"),
    pytest.param(lambda m: m.valid() + "\x00.AAAA", Reason.MALFORMED, id="nul-then-more"),
    # impossible lengths and non-canonical spellings
    pytest.param(
        lambda m: replace_segment(m.valid(), 0, length_mod4_is_1(segments(m.valid())[0])),
        Reason.MALFORMED,
        id="header-length-mod4-1",
    ),
    pytest.param(
        lambda m: replace_segment(m.valid(), 1, length_mod4_is_1(segments(m.valid())[1])),
        Reason.MALFORMED,
        id="payload-length-mod4-1",
    ),
    pytest.param(
        lambda m: replace_segment(m.valid(), 2, length_mod4_is_1(segments(m.valid())[2])),
        Reason.MALFORMED,
        id="signature-length-mod4-1",
    ),
    pytest.param(lambda m: "A.B.C", Reason.MALFORMED, id="one-char-segments"),
    pytest.param(
        lambda m: replace_segment(
            odd_length_token(m), 0, noncanonical(segments(odd_length_token(m))[0])
        ),
        Reason.MALFORMED,
        id="noncanonical-header",
    ),
    pytest.param(
        lambda m: replace_segment(
            odd_length_token(m), 1, noncanonical(segments(odd_length_token(m))[1])
        ),
        Reason.MALFORMED,
        id="noncanonical-payload",
    ),
    pytest.param(
        lambda m: replace_segment(m.valid(), 2, noncanonical(segments(m.valid())[2])),
        Reason.MALFORMED,
        id="noncanonical-signature",
    ),
    # bytes that are not UTF-8, text that is not JSON
    pytest.param(
        lambda m: m.raw(b'{"alg":"RS256\xff","kid":"k"}', to_json(m.claims())),
        Reason.MALFORMED,
        id="header-not-utf8",
    ),
    pytest.param(
        lambda m: m.raw(to_json(m.header()), to_json(m.claims())[:-1].encode() + b',"x":"\xff"}'),
        Reason.MALFORMED,
        id="payload-not-utf8",
    ),
    pytest.param(
        lambda m: m.raw(
            to_json(m.header()), to_json(m.claims())[:-1].encode() + b',"x":"\xc0\xaf"}'
        ),
        Reason.MALFORMED,
        id="payload-overlong-utf8",
    ),
    pytest.param(
        lambda m: m.raw(
            to_json(m.header()), to_json(m.claims())[:-1].encode() + b',"x":"\xed\xa0\x80"}'
        ),
        Reason.MALFORMED,
        id="payload-utf8-encoded-surrogate",
    ),
    pytest.param(
        lambda m: m.raw(to_json(m.header()), to_json(m.claims()).encode("utf-16")),
        Reason.MALFORMED,
        id="payload-utf16",
    ),
    pytest.param(
        lambda m: m.raw(to_json(m.header()), b"\xef\xbb\xbf" + to_json(m.claims()).encode()),
        Reason.MALFORMED,
        id="payload-utf8-bom",
    ),
    pytest.param(lambda m: m.raw("hello", to_json(m.claims())), Reason.MALFORMED, id="header-text"),
    pytest.param(
        lambda m: m.raw(to_json(m.header()), "hello"), Reason.MALFORMED, id="payload-text"
    ),
    pytest.param(
        lambda m: m.raw("{'alg':'RS256','kid':'k'}", to_json(m.claims())),
        Reason.MALFORMED,
        id="header-single-quotes",
    ),
    pytest.param(
        lambda m: m.raw(to_json(m.header())[:-1] + ",}", to_json(m.claims())),
        Reason.MALFORMED,
        id="header-trailing-comma",
    ),
    pytest.param(
        lambda m: m.raw(to_json(m.header()), "/* c */" + to_json(m.claims())),
        Reason.MALFORMED,
        id="payload-comment",
    ),
    pytest.param(
        lambda m: m.raw(to_json(m.header()), '{exp:1800003600,"iss":"x"}'),
        Reason.MALFORMED,
        id="payload-unquoted-key",
    ),
    pytest.param(
        lambda m: m.raw(to_json(m.header()), to_json(m.claims()) + "x"),
        Reason.MALFORMED,
        id="payload-trailing-garbage",
    ),
    pytest.param(
        lambda m: m.raw(to_json(m.header()), to_json(m.claims()) + "{}"),
        Reason.MALFORMED,
        id="payload-two-objects",
    ),
    pytest.param(
        lambda m: m.raw(to_json(m.header())[:-1], to_json(m.claims())),
        Reason.MALFORMED,
        id="header-truncated",
    ),
    pytest.param(lambda m: m.raw(to_json(m.header()), "   "), Reason.MALFORMED, id="payload-blank"),
    pytest.param(
        lambda m: m.raw(to_json(m.header()), to_json(m.claims()).replace('"', "\\u0022", 1)),
        Reason.MALFORMED,
        id="payload-escaped-structural-quote",
    ),
    # JSON, but not an object
    *(
        pytest.param(
            lambda m, v=v: m.raw(v, to_json(m.claims())),
            Reason.MALFORMED,
            id=f"header-is-{name}",
        )
        for name, v in [
            ("array", '["RS256"]'),
            ("empty-array", "[]"),
            ("string", '"RS256"'),
            ("number", "256"),
            ("null", "null"),
            ("true", "true"),
        ]
    ),
    *(
        pytest.param(
            lambda m, v=v: m.raw(to_json(m.header()), v),
            Reason.MALFORMED,
            id=f"payload-is-{name}",
        )
        for name, v in [
            ("array", '[{"iss":"https://team.cloudflareaccess.com"}]'),
            ("empty-array", "[]"),
            ("string", '"alice@example.com"'),
            ("number", "1800003600"),
            ("null", "null"),
            ("false", "false"),
        ]
    ),
    # duplicate members: the signer's parser and ours might pick different ones
    pytest.param(
        lambda m: m.raw(with_duplicate(m.header(), "alg", "none"), to_json(m.claims())),
        Reason.MALFORMED,
        id="dup-header-alg",
    ),
    pytest.param(
        lambda m: m.raw(with_duplicate(m.header(), "alg", "RS256"), to_json(m.claims())),
        Reason.MALFORMED,
        id="dup-header-alg-same-value",
    ),
    pytest.param(
        lambda m: m.raw(with_duplicate(m.header(), "kid", "other"), to_json(m.claims())),
        Reason.MALFORMED,
        id="dup-header-kid",
    ),
    pytest.param(
        lambda m: m.raw(with_duplicate(m.header(), "typ", "JWT"), to_json(m.claims())),
        Reason.MALFORMED,
        id="dup-header-typ",
    ),
    *(
        pytest.param(
            lambda m, n=n, v=v: m.raw(to_json(m.header()), with_duplicate(m.claims(), n, v)),
            Reason.MALFORMED,
            id=f"dup-payload-{n}",
        )
        for n, v in [
            ("exp", int(NOW) + 10**7),
            ("iss", "https://evil.example"),
            ("aud", [OTHER_AUD]),
            ("email", "admin@example.com"),
            ("type", "org"),
            ("sub", ""),
        ]
    ),
    pytest.param(
        lambda m: m.raw(
            to_json(m.header()),
            with_duplicate(m.claims(), "e", 1).replace('"e":1', '"\\u0065mail":"x@example.com"'),
        ),
        Reason.MALFORMED,
        id="dup-payload-email-escaped-spelling",
    ),
    pytest.param(
        lambda m: m.raw(
            to_json(m.header()),
            to_json(m.claims(custom=Raw('{"groups":["sre"],"groups":["admin"]}'))),
        ),
        Reason.MALFORMED,
        id="dup-nested-custom-groups",
    ),
    # non-finite literals (not JSON)
    *(
        pytest.param(
            lambda m, claim=claim, lit=lit: m.raw(
                to_json(m.header()),
                to_json(m.claims(**{claim: Raw(lit)})),
            ),
            Reason.MALFORMED,
            id=f"{claim}-{lit}",
        )
        for claim, lit in [
            ("exp", "NaN"),
            ("exp", "Infinity"),
            ("exp", "-Infinity"),
            ("nbf", "NaN"),
            ("iat", "Infinity"),
            ("country", "NaN"),
            ("custom", '{"n":-Infinity}'),
        ]
    ),
    pytest.param(
        lambda m: m.raw(to_json(m.header(typ=Raw("NaN"))), to_json(m.claims())),
        Reason.MALFORMED,
        id="header-NaN",
    ),
    # nesting beyond the parser's recursion limit, inside the size cap
    pytest.param(
        lambda m: m.raw(to_json(m.header()), to_json(m.claims(custom=Raw(nested(1700))))),
        Reason.MALFORMED,
        id="payload-nested-1700",
    ),
    pytest.param(
        lambda m: m.raw(to_json(m.header(x=Raw(nested(1900)))), to_json(m.claims())),
        Reason.MALFORMED,
        id="header-nested-1900",
    ),
    pytest.param(
        lambda m: m.raw(to_json(m.header()), nested(2000)),
        Reason.MALFORMED,
        id="payload-bare-nested-2000",
    ),
]


@pytest.mark.parametrize(("build", "reason"), STRUCTURE)
async def test_structure(verifier, mint, source, build, reason):
    assert await reason_of(verifier, build(mint)) is reason
    assert source.calls == 1  # garbage never reaches the key store


def test_segment_helpers_build_what_they_claim(mint):
    """Guards the table above: the helpers really produce the odd spellings they name."""
    token = odd_length_token(mint)
    header, payload, sig = segments(token)
    assert len(header) % 4 == 2
    assert len(payload) % 4 == 2
    assert len(sig) % 4 == 2
    assert padded(sig).endswith("==")
    assert base64.urlsafe_b64decode(padded(noncanonical(sig))) == base64.urlsafe_b64decode(
        padded(sig),
    )
    assert noncanonical(sig) != sig


def test_nesting_10000_deep_is_malformed_not_a_crash():
    with pytest.raises(Denied) as ex:
        decode_json_segment(b64(nested(10000)))
    assert ex.value.reason is Reason.MALFORMED
    with pytest.raises(Denied) as ex:
        decode_json_segment(b64('{"a":' * 10000 + "1" + "}" * 10000))
    assert ex.value.reason is Reason.MALFORMED


def test_integer_of_5000_digits_is_malformed():
    with pytest.raises(Denied) as ex:
        decode_json_segment(b64('{"exp":' + "9" * 5000 + "}"))
    assert ex.value.reason is Reason.MALFORMED


def test_duplicate_members_are_refused_by_the_segment_decoder():
    with pytest.raises(Denied) as ex:
        decode_json_segment(b64('{"a":1,"a":1}'))
    assert ex.value.reason is Reason.MALFORMED


def pad_claim(m: Mint, total: int) -> str:
    """A valid token grown with a filler claim to exactly ``total`` characters."""
    base = len(m.with_claims(filler=""))
    # Each 4 base64 characters carry 3 bytes; aim the filler so the token lands on ``total``.
    for extra in range(max(0, (total - base) * 3 // 4 - 8), (total - base) * 3 // 4 + 8):
        token = m.with_claims(filler="x" * extra)
        if len(token) == total:
            return token
    raise AssertionError(f"cannot build a token of exactly {total} characters")


SIZE: list = [
    pytest.param(lambda m: "A" * (MAX_TOKEN_BYTES + 1), id="garbage-one-over"),
    pytest.param(lambda m: "A" * (1 << 20), id="garbage-1MiB"),
    pytest.param(lambda m: "." * (1 << 20), id="dots-1MiB"),
    pytest.param(lambda m: "é" * (1 << 20), id="non-ascii-1MiB"),
    pytest.param(lambda m: "\x00" * (MAX_TOKEN_BYTES + 1), id="nul-one-over"),
    pytest.param(lambda m: pad_claim(m, MAX_TOKEN_BYTES + 1), id="valid-but-one-over"),
    pytest.param(lambda m: m.with_claims(filler="x" * (1 << 20)), id="valid-1MiB"),
    pytest.param(
        lambda m: m.raw(to_json(m.header()), '{"exp":' + "9" * 5000 + "}"),
        id="int-5000-digits",
    ),
    pytest.param(
        lambda m: m.raw(to_json(m.header()), to_json(m.claims(custom=Raw(nested(10000))))),
        id="nested-10000",
    ),
    pytest.param(lambda m: ".".join(["A" * 3000] * 3), id="three-big-segments"),
]


@pytest.mark.parametrize("build", SIZE)
async def test_oversized_tokens_are_refused_before_decoding(verifier, mint, source, build):
    assert await reason_of(verifier, build(mint)) is Reason.TOKEN_TOO_LARGE
    assert source.calls == 1


async def test_token_of_exactly_the_cap_is_still_verified(verifier, mint):
    token = pad_claim(mint, MAX_TOKEN_BYTES)
    assert len(token) == MAX_TOKEN_BYTES
    claims = await verifier.verify(token, (AUD,))
    assert claims.email == "alice@example.com"


# ---------------------------------------------------------------------------------------------
# 5. Algorithm games

ALG_SPELLINGS: list = [
    pytest.param(DROP, id="missing"),
    pytest.param(None, id="null"),
    pytest.param(256, id="number"),
    pytest.param(True, id="bool"),
    pytest.param(["RS256"], id="list"),
    pytest.param({"name": "RS256"}, id="object"),
    pytest.param("", id="empty"),
    pytest.param("none", id="none"),
    pytest.param("None", id="None"),
    pytest.param("NONE", id="NONE"),
    pytest.param("nOnE", id="nOnE"),
    pytest.param(" none", id="space-none"),
    pytest.param("none ", id="none-space"),
    pytest.param("none\x00", id="none-nul"),
    pytest.param("RS256 ", id="RS256-space"),
    pytest.param(" RS256", id="space-RS256"),
    pytest.param("rs256", id="rs256"),
    pytest.param("Rs256", id="Rs256"),
    pytest.param("RS256\x00", id="RS256-nul"),
    pytest.param("RS256\n", id="RS256-newline"),
    pytest.param("RS\uff12\uff15\uff16", id="fullwidth-digits"),
    pytest.param("R\u0405256", id="cyrillic-dze"),
    pytest.param("\uff32\uff33256", id="fullwidth-letters"),
    pytest.param("RS 256", id="inner-space"),
    pytest.param("RS-256", id="dash"),
    pytest.param("RSA256", id="RSA256"),
    pytest.param("HS256", id="HS256"),
    pytest.param("HS384", id="HS384"),
    pytest.param("HS512", id="HS512"),
    pytest.param("ES256", id="ES256"),
    pytest.param("ES384", id="ES384"),
    pytest.param("PS256", id="PS256"),
    pytest.param("PS512", id="PS512"),
    pytest.param("RS384", id="RS384"),
    pytest.param("RS512", id="RS512"),
    pytest.param("EdDSA", id="EdDSA"),
    pytest.param("Ed25519", id="Ed25519"),
    pytest.param("ES256K", id="ES256K"),
    pytest.param("RSA-OAEP", id="RSA-OAEP"),
    pytest.param("dir", id="dir"),
]


@pytest.mark.parametrize("alg", ALG_SPELLINGS)
async def test_alg_outside_the_allow_list_is_refused(verifier, mint, source, alg):
    # The signature is a real RS256 signature: only the alg claim is wrong.
    token = mint.with_header(alg=alg)
    assert await reason_of(verifier, token) is Reason.ALG_NOT_ALLOWED
    assert source.calls == 1


HMAC_SECRETS = [
    "spki-pem",
    "pkcs1-pem",
    "spki-der",
    "pkcs1-der",
    "openssh",
    "jwk-json",
    "jwk-n-bytes",
    "jwk-n-b64",
    "kid",
    "empty",
]


@pytest.mark.parametrize("secret", HMAC_SECRETS)
@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_hmac_keyed_with_the_public_key_is_refused(verifier, mint, source, alg, secret):
    token = mint.hmac(alg, mint.public_encodings()[secret])
    assert await reason_of(verifier, token) is Reason.ALG_NOT_ALLOWED
    assert source.calls == 1


@pytest.mark.parametrize("alg", ["HS256", "HS384"])
async def test_hmac_refused_even_when_the_issuer_lists_it(store, clock, mint, alg):
    # Configuration refuses HS*, but the verifier must not depend on that alone.
    cfg = issuer_config(algorithms=("RS256", alg))
    v = Verifier(issuers=(cfg,), keys=store, clock=clock, leeway=LEEWAY)
    token = mint.hmac(alg, mint.public_encodings()["spki-pem"])
    assert await reason_of(v, token) is Reason.ALG_NOT_ALLOWED
    # Refused on the header alone: an HMAC token with a fresh kid costs no refetch.
    fresh_kid = mint.hmac(alg, b"secret", header=mint.header(alg=alg, kid="attacker"))
    assert await reason_of(v, fresh_kid) is Reason.ALG_NOT_ALLOWED
    assert store.get("team").source.calls == 1  # type: ignore[union-attr]


OTHER_ALGORITHMS = ["ES256", "PS256", "RS512", "EdDSA"]


@pytest.mark.parametrize("alg", OTHER_ALGORITHMS)
async def test_real_signatures_in_other_algorithms_are_refused(verifier, mint, alg):
    assert await reason_of(verifier, mint.signed_by(alg)) is Reason.ALG_NOT_ALLOWED


async def test_alg_none_with_empty_signature_is_refused(verifier, mint):
    token = mint.token(header=mint.header(alg="none"), signature="")
    assert await reason_of(verifier, token) is Reason.BAD_SIGNATURE


@pytest.mark.parametrize(
    ("alg", "reason"),
    [
        ("ES256", Reason.ALG_NOT_ALLOWED),  # an RSA key cannot verify ECDSA
        ("EdDSA", Reason.ALG_NOT_ALLOWED),
        ("PS256", Reason.ALG_NOT_ALLOWED),  # the JWK says alg RS256: the key is for RS256 only
        ("RS256", None),
    ],
)
async def test_issuer_allowing_several_algs_still_binds_alg_to_key(store, clock, mint, alg, reason):
    cfg = issuer_config(algorithms=("RS256", "PS256", "ES256", "EdDSA"))
    v = Verifier(issuers=(cfg,), keys=store, clock=clock, leeway=LEEWAY)
    token = mint.signed_by(alg)
    if reason is None:
        assert (await v.verify(token, (AUD,))).alg == alg
    else:
        assert await reason_of(v, token) is reason


@pytest.fixture
async def certs_only(issuer_keys, source, mint) -> KeyStore:
    """The real key published only as a certificate: no JWK "alg" restricts it."""
    doc = key_set([mint.key])
    source.body = json.dumps({"public_certs": doc["public_certs"]}).encode()
    assert await issuer_keys.refresh()
    return KeyStore([issuer_keys])


async def test_ps256_verifies_with_a_key_that_has_no_alg_restriction(certs_only, clock, mint, kid):
    v = Verifier(
        issuers=(issuer_config(algorithms=("RS256", "PS256")),),
        keys=certs_only,
        clock=clock,
        leeway=LEEWAY,
    )
    claims = await v.verify(mint.signed_by("PS256"), (AUD,))
    assert (claims.alg, claims.kid) == ("PS256", kid)
    # ...and a PKCS#1 v1.5 signature under a PS256 header does not verify.
    pkcs1 = mint.with_header(alg="PS256")
    assert await reason_of(v, pkcs1) is Reason.BAD_SIGNATURE


@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
async def test_alg_that_does_not_fit_the_key_type_is_refused(certs_only, clock, mint, alg):
    # The issuer allows ECDSA and EdDSA, and the kid names an RSA key with no "alg" member.
    cfg = issuer_config(algorithms=("RS256", "ES256", "EdDSA"))
    v = Verifier(issuers=(cfg,), keys=certs_only, clock=clock, leeway=LEEWAY)
    assert await reason_of(v, mint.signed_by(alg)) is Reason.ALG_NOT_ALLOWED


async def test_alg_of_another_issuer_is_refused_even_for_an_unrestricted_key(
    certs_only, clock, mint
):
    # PS256 would verify with this key (see above), but only the other issuer allows it.
    other = issuer_config(name="other", issuer=OTHER_ISSUER, algorithms=("PS256",))
    v = Verifier(
        issuers=(issuer_config(), other),
        keys=certs_only,
        clock=clock,
        leeway=LEEWAY,
    )
    assert await reason_of(v, mint.signed_by("PS256")) is Reason.ALG_NOT_ALLOWED


async def test_alg_allowed_for_another_issuer_is_refused_for_this_one(store, clock, mint):
    other = issuer_config(name="other", issuer=OTHER_ISSUER, algorithms=("ES256",))
    v = Verifier(
        issuers=(issuer_config(), other),
        keys=store,
        clock=clock,
        leeway=LEEWAY,
    )
    assert await reason_of(v, mint.signed_by("ES256")) is Reason.ALG_NOT_ALLOWED


# ---------------------------------------------------------------------------------------------
# 6. Header games: nothing in the header may point at a key, or change how the payload is read


def _attacker_jwk(m: Mint) -> dict[str, object]:
    return RSAAlgorithm.to_jwk(m.foreign.public_key(), as_dict=True)


def _cert_der_b64(m: Mint) -> str:
    cert = key_set([m.key])["public_certs"][0]["cert"]  # type: ignore[index]
    return "".join(line for line in cert.splitlines() if "-----" not in line)


HEADER_GAMES: list = [
    pytest.param(lambda m: m.with_header(jku="https://evil.example/jwks.json"), id="jku"),
    pytest.param(lambda m: m.with_header(jku=ISSUER + "/cdn-cgi/access/certs"), id="jku-real"),
    pytest.param(lambda m: m.with_header(x5u="https://evil.example/cert.pem"), id="x5u"),
    pytest.param(
        lambda m: m.token(header=m.header(jwk=_attacker_jwk(m)), key=m.foreign),
        id="jwk-attacker-signed",
    ),
    pytest.param(
        lambda m: m.token(
            header=m.header(jwk=_attacker_jwk(m), kid=thumbprint(m.foreign.public_key())),
            key=m.foreign,
        ),
        id="jwk-attacker-own-kid",
    ),
    pytest.param(
        lambda m: m.with_header(jwk=RSAAlgorithm.to_jwk(m.key.public_key(), as_dict=True)),
        id="jwk-real-key",
    ),
    pytest.param(lambda m: m.with_header(x5c=[_cert_der_b64(m)]), id="x5c"),
    pytest.param(lambda m: m.with_header(x5t="dGh1bWJwcmludA"), id="x5t"),
    pytest.param(lambda m: m.with_header(**{"x5t#S256": "dGh1bWJwcmludA"}), id="x5t-S256"),
    pytest.param(lambda m: m.with_header(crit=["exp"]), id="crit"),
    pytest.param(lambda m: m.with_header(crit=[]), id="crit-empty"),
    pytest.param(lambda m: m.with_header(crit=["b64"], b64=False), id="crit-b64-false"),
    pytest.param(lambda m: m.with_header(crit=["b64"], b64=True), id="crit-b64-true"),
    pytest.param(lambda m: m.with_header(b64=False), id="b64-false"),
    pytest.param(lambda m: m.with_header(zip="DEF"), id="zip"),
    pytest.param(lambda m: m.with_header(enc="A256GCM"), id="enc"),
    pytest.param(lambda m: m.with_header(cty="JWT"), id="cty-jwt"),
    pytest.param(lambda m: m.with_header(cty="application/json"), id="cty-json"),
    pytest.param(lambda m: m.with_header(epk={"kty": "EC"}), id="epk"),
    pytest.param(lambda m: m.with_header(p2s="c2FsdA", p2c=1000), id="p2s"),
    pytest.param(lambda m: m.with_header(url="https://evil.example", nonce="n"), id="url-nonce"),
    pytest.param(lambda m: m.with_header(foo="bar"), id="unknown-member"),
    pytest.param(lambda m: m.with_header(KID="x"), id="KID-upper"),
    pytest.param(lambda m: m.with_header(iss=ISSUER), id="iss-in-header"),
    pytest.param(lambda m: m.with_header(**{"": ""}), id="empty-member-name"),
    pytest.param(lambda m: m.with_header(jku=None), id="jku-null"),
    # typ
    pytest.param(lambda m: m.with_header(typ="at+jwt"), id="typ-at+jwt"),
    pytest.param(lambda m: m.with_header(typ="JWE"), id="typ-JWE"),
    pytest.param(lambda m: m.with_header(typ="JOSE"), id="typ-JOSE"),
    pytest.param(lambda m: m.with_header(typ="JOSE+JSON"), id="typ-JOSE+JSON"),
    pytest.param(lambda m: m.with_header(typ="dpop+jwt"), id="typ-dpop"),
    pytest.param(lambda m: m.with_header(typ=1), id="typ-number"),
    pytest.param(lambda m: m.with_header(typ=None), id="typ-null"),
    pytest.param(lambda m: m.with_header(typ=""), id="typ-empty"),
    pytest.param(lambda m: m.with_header(typ=True), id="typ-bool"),
    pytest.param(lambda m: m.with_header(typ=["JWT"]), id="typ-list"),
    pytest.param(lambda m: m.with_header(typ=" JWT"), id="typ-leading-space"),
    pytest.param(lambda m: m.with_header(typ="JWT\x00"), id="typ-nul"),
    pytest.param(lambda m: m.with_header(typ="\uff2a\uff37\uff34"), id="typ-fullwidth"),
]


@pytest.mark.parametrize("build", HEADER_GAMES)
async def test_header_games(verifier, mint, source, build):
    assert await reason_of(verifier, build(mint)) is Reason.BAD_HEADER
    assert source.calls == 1  # no member of the header makes authd fetch anything


@pytest.mark.parametrize("typ", ["JWT", "jwt", "Jwt", DROP])
async def test_typ_jwt_in_any_case_or_absent_is_accepted(verifier, mint, typ):
    claims = await verifier.verify(mint.with_header(typ=typ), (AUD,))
    assert claims.email == "alice@example.com"


async def test_header_games_are_refused_even_when_keys_are_unavailable(clock, mint):
    # A 503 for a token that is refused on its header alone would be wrong: it is a 401.
    down = FakeSource(error="connection refused")
    keys = IssuerKeys(issuer_config(), down, clock)
    await keys.refresh()
    v = Verifier((issuer_config(),), KeyStore([keys]), clock, LEEWAY)
    assert await reason_of(v, mint.with_header(jku="https://evil.example")) is Reason.BAD_HEADER
    assert await reason_of(v, mint.with_header(alg="none")) is Reason.ALG_NOT_ALLOWED
    assert await reason_of(v, "garbage") is Reason.MALFORMED
    assert down.calls == 1


# ---------------------------------------------------------------------------------------------
# 7. kid games

KID_BAD_HEADER: list = [
    pytest.param(DROP, id="missing"),
    pytest.param(None, id="null"),
    pytest.param(1, id="number"),
    pytest.param(True, id="bool"),
    pytest.param(["kid"], id="list"),
    pytest.param({"kid": "x"}, id="object"),
    pytest.param("", id="empty"),
    pytest.param("k" * 257, id="257-chars"),
    pytest.param("k" * 300, id="300-chars"),
    pytest.param("a\nb", id="newline"),
    pytest.param("a\r\nX-Injected: 1", id="crlf-injection"),
    pytest.param("\t", id="tab"),
    pytest.param("\u0000", id="nul"),
    pytest.param("kid\x00", id="trailing-nul"),
    pytest.param("\x7f", id="del"),
    pytest.param("\x1b[31m", id="ansi-escape"),
    pytest.param("\uff4b\uff49\uff44", id="fullwidth"),
    pytest.param("кид", id="cyrillic"),
    pytest.param("é", id="latin1"),
    pytest.param("\u200b", id="zero-width-space"),
]


@pytest.mark.parametrize("bad_kid", KID_BAD_HEADER)
async def test_kid_of_the_wrong_shape_is_a_bad_header(verifier, mint, source, bad_kid):
    assert await reason_of(verifier, mint.with_header(kid=bad_kid)) is Reason.BAD_HEADER
    assert source.calls == 1


def _real_kid_variants(kid: str) -> dict[str, str]:
    return {
        "upper-case": kid.upper(),
        "trailing-space": kid + " ",
        "leading-space": " " + kid,
        "prefix": kid[:-1],
        "suffix": kid + "0",
        "doubled": kid + kid,
    }


def _fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


UNKNOWN_KIDS = [
    "../../etc/passwd",
    "..\\..\\windows\\win.ini",
    "/dev/zero",
    "file:///etc/passwd",
    "http://127.0.0.1:9/keys",
    "' OR 1=1 --",
    '" OR ""="',
    "$(id)",
    "`id`",
    "${jndi:ldap://evil.example/a}",
    "{{7*7}}",
    "<script>alert(1)</script>",
    "%00",
    "%2e%2e%2f",
    "*",
    "null",
    "0",
    " ",
    "k" * 256,
    "upper-case",
    "trailing-space",
    "leading-space",
    "prefix",
    "suffix",
    "doubled",
]


def _printable_kid(name: str, kid: str) -> str:
    return _real_kid_variants(kid).get(name, name)


@pytest.mark.parametrize("name", UNKNOWN_KIDS)
async def test_printable_unknown_kid_costs_one_refetch(verifier, mint, source, kid, name):
    token = mint.with_header(kid=_printable_kid(name, kid))
    assert await reason_of(verifier, token) is Reason.UNKNOWN_KID
    assert source.calls == 2  # the initial fetch and one refetch


async def test_fullwidth_variant_of_the_real_kid_is_refused(verifier, mint, source, kid):
    assert await reason_of(verifier, mint.with_header(kid=_fullwidth(kid))) is Reason.BAD_HEADER
    assert source.calls == 1


async def test_all_unknown_kids_together_cost_one_refetch_per_cooldown(
    verifier, mint, source, kid, clock
):
    tokens = [mint.with_header(kid=_printable_kid(n, kid)) for n in UNKNOWN_KIDS]
    for token in tokens:
        assert await reason_of(verifier, token) is Reason.UNKNOWN_KID
    assert source.calls == 2
    # The real kid keeps working throughout.
    assert (await verifier.verify(mint.valid(), (AUD,))).kid == kid
    clock.advance(issuer_config().refetch_cooldown_seconds - 1)
    for token in tokens:
        assert await reason_of(verifier, token) is Reason.UNKNOWN_KID
    assert source.calls == 2
    clock.advance(1)
    for token in tokens:
        assert await reason_of(verifier, token) is Reason.UNKNOWN_KID
    assert source.calls == 3


async def test_concurrent_flood_of_unknown_kids_costs_one_refetch(verifier, mint, source, kid):
    tokens = [mint.with_header(kid=f"random-{i:04d}") for i in range(200)]
    results = await asyncio.gather(
        *(verifier.verify(t, (AUD,)) for t in tokens),
        verifier.verify(mint.valid(), (AUD,)),
        return_exceptions=True,
    )
    *denied, ok = results
    assert all(isinstance(r, Denied) and r.reason is Reason.UNKNOWN_KID for r in denied)
    assert isinstance(ok, Claims)
    assert ok.kid == kid
    assert source.calls == 2


# ---------------------------------------------------------------------------------------------
# 8. Signature games


def _sig_bytes(token: str) -> bytes:
    return base64.urlsafe_b64decode(padded(segments(token)[2]))


def _flip(token: str, byte: int, bit: int) -> str:
    sig = bytearray(_sig_bytes(token))
    sig[byte] ^= 1 << bit
    return replace_segment(token, 2, b64(bytes(sig)))


def _tamper(m: Mint, **claims: object) -> str:
    """The payload changed after signing; the original signature kept."""
    original = m.valid()
    return replace_segment(original, 1, segments(m.with_claims(**claims))[1])


SIGNATURE_GAMES: list = [
    pytest.param(lambda m: replace_segment(m.valid(), 2, b64(b"\0" * 256)), id="zeros-256"),
    pytest.param(lambda m: replace_segment(m.valid(), 2, b64(b"\0")), id="zero-1-byte"),
    pytest.param(lambda m: replace_segment(m.valid(), 2, "AA"), id="AA"),
    pytest.param(lambda m: replace_segment(m.valid(), 2, b64(b"\xff" * 256)), id="ones-256"),
    pytest.param(
        lambda m: replace_segment(
            m.valid(),
            2,
            b64(m.key.public_key().public_numbers().n.to_bytes(256, "big")),
        ),
        id="signature-equals-modulus",
    ),
    pytest.param(lambda m: replace_segment(m.valid(), 2, b64(b"\0" * 255 + b"\1")), id="one"),
    pytest.param(
        lambda m: replace_segment(m.valid(), 2, b64(_sig_bytes(m.valid())[:-1])),
        id="truncated-1-byte",
    ),
    pytest.param(
        lambda m: replace_segment(m.valid(), 2, b64(_sig_bytes(m.valid())[:128])),
        id="truncated-half",
    ),
    pytest.param(
        lambda m: replace_segment(m.valid(), 2, segments(m.valid())[2][:340]),
        id="truncated-text",
    ),
    pytest.param(
        lambda m: replace_segment(m.valid(), 2, b64(_sig_bytes(m.valid()) + b"\0")),
        id="appended-byte",
    ),
    pytest.param(
        lambda m: replace_segment(m.valid(), 2, b64(b"\0" + _sig_bytes(m.valid()))),
        id="prepended-zero",
    ),
    pytest.param(
        lambda m: replace_segment(m.valid(), 2, b64(_sig_bytes(m.valid()) * 2)),
        id="doubled",
    ),
    pytest.param(lambda m: replace_segment(m.valid(), 2, b64(b"\0" * 512)), id="wrong-length-512"),
    *(
        pytest.param(
            lambda m, byte=byte, bit=bit: _flip(m.valid(), byte, bit), id=f"flip-{byte}-{bit}"
        )
        for byte, bit in [(0, 0), (0, 7), (1, 3), (64, 5), (127, 1), (128, 6), (200, 2), (255, 0)]
    ),
    pytest.param(lambda m: _tamper(m, email="admin@example.com"), id="tampered-email"),
    pytest.param(lambda m: _tamper(m, exp=int(NOW) + 86400 * 30), id="tampered-exp"),
    pytest.param(lambda m: _tamper(m, aud=[AUD, OTHER_AUD]), id="tampered-aud"),
    pytest.param(
        lambda m: replace_segment(
            m.with_header(typ="jwt"),
            2,
            segments(m.valid())[2],
        ),
        id="tampered-header",
    ),
    pytest.param(
        lambda m: replace_segment(
            m.with_claims(email="mallory@example.com"),
            2,
            segments(m.valid())[2],
        ),
        id="signature-of-another-token",
    ),
    pytest.param(lambda m: m.token(key=m.foreign), id="foreign-key-under-real-kid"),
    pytest.param(
        lambda m: (
            m.with_claims(email="admin@example.com").rsplit(".", 1)[0]
            + "."
            + m.rs256(".".join(segments(m.valid())[:2]))
        ),
        id="signature-over-other-input",
    ),
    pytest.param(
        lambda m: resigned(m, scheme=padding.PSS(padding.MGF1(hashes.SHA256()), salt_length=32)),
        id="pss-signature-under-RS256",
    ),
    pytest.param(lambda m: resigned(m, digest=hashes.SHA512()), id="sha512-signature-under-RS256"),
    pytest.param(
        lambda m: resigned(m, over=f"{to_json(m.header())}.{to_json(m.claims())}"),
        id="signed-over-json-not-base64",
    ),
    pytest.param(
        lambda m: resigned(m, over=signing_input(m.valid()) + "."),
        id="signed-over-trailing-dot",
    ),
]


@pytest.mark.parametrize("build", SIGNATURE_GAMES)
async def test_signature_games(verifier, mint, build):
    assert await reason_of(verifier, build(mint)) is Reason.BAD_SIGNATURE


NON_BASE64URL_SIGNATURES: list = [
    pytest.param(lambda m: replace_segment(m.valid(), 2, padded(segments(m.valid())[2])), id="="),
    pytest.param(
        lambda m: replace_segment(
            m.valid(),
            2,
            base64.b64encode(_sig_bytes(m.valid())).decode().rstrip("=").replace("+", "-") + "+",
        ),
        id="standard-alphabet-char",
    ),
]


@pytest.mark.parametrize("build", NON_BASE64URL_SIGNATURES)
async def test_non_base64url_signature_is_malformed(verifier, mint, build):
    assert await reason_of(verifier, build(mint)) is Reason.MALFORMED


def _drop_from_set(m: Mint, weak: rsa.RSAPrivateKey, variant: str) -> tuple[bytes, str]:
    """A key set that also lists a key it should not; returns (body, a token signed by it)."""
    good = key_set([m.key])
    jwks: list = list(good["keys"])  # type: ignore[arg-type]
    bad_key = weak if variant == "weak-1024" else m.foreign
    bad_kid = thumbprint(bad_key.public_key())
    jwk = {"kid": bad_kid, "use": "sig", **RSAAlgorithm.to_jwk(bad_key.public_key(), as_dict=True)}
    if variant == "use-enc":
        jwk["use"] = "enc"
    elif variant == "private":
        jwk = {"kid": bad_kid, **RSAAlgorithm.to_jwk(bad_key, as_dict=True)}
    elif variant == "key-ops-sign":
        jwk["key_ops"] = ["sign"]
    elif variant == "duplicate":
        jwks.append(dict(jwk))
    elif variant == "kid-clash-with-cert":
        cert = key_set([m.key])["public_certs"][0]  # type: ignore[index]
        doc = {"keys": [*jwks, jwk], "public_certs": [{"kid": bad_kid, "cert": cert["cert"]}]}
        return json.dumps(doc).encode(), m.token(header=m.header(kid=bad_kid), key=bad_key)
    jwks.append(jwk)
    doc = {"keys": jwks, "public_certs": good["public_certs"]}
    return json.dumps(doc).encode(), m.token(header=m.header(kid=bad_kid), key=bad_key)


@pytest.fixture(scope="module")
def weak_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


@pytest.mark.parametrize(
    "variant",
    ["weak-1024", "use-enc", "private", "key-ops-sign", "duplicate", "kid-clash-with-cert"],
)
async def test_token_signed_by_a_key_the_set_must_not_hold(
    verifier, issuer_keys, source, mint, weak_key, *, variant
):
    source.body, token = _drop_from_set(mint, weak_key, variant)
    assert await issuer_keys.refresh()
    assert await reason_of(verifier, token) is Reason.UNKNOWN_KID
    assert (await verifier.verify(mint.valid(), (AUD,))).email == "alice@example.com"


# ---------------------------------------------------------------------------------------------
# 9. Time claims (clock at NOW, leeway 30 s)

EXP_LIMIT = int(NOW) + MAX_LIFETIME_SECONDS
EARLY = {"iat": int(NOW) - 7200, "nbf": int(NOW) - 7200}  # issued well before an expired exp

TIME_DENIED: list = [
    # exp of the wrong type or value
    pytest.param({"exp": DROP}, Reason.BAD_CLAIMS, id="exp-missing"),
    pytest.param({"exp": str(int(NOW) + 3600)}, Reason.BAD_CLAIMS, id="exp-numeric-string"),
    pytest.param({"exp": "1800003600.5"}, Reason.BAD_CLAIMS, id="exp-float-string"),
    pytest.param({"exp": True}, Reason.BAD_CLAIMS, id="exp-true"),
    pytest.param({"exp": False}, Reason.BAD_CLAIMS, id="exp-false"),
    pytest.param({"exp": None}, Reason.BAD_CLAIMS, id="exp-null"),
    pytest.param({"exp": [int(NOW) + 3600]}, Reason.BAD_CLAIMS, id="exp-list"),
    pytest.param({"exp": {"value": int(NOW) + 3600}}, Reason.BAD_CLAIMS, id="exp-object"),
    pytest.param({"exp": ""}, Reason.BAD_CLAIMS, id="exp-empty-string"),
    pytest.param({"exp": -1}, Reason.BAD_CLAIMS, id="exp-negative"),
    pytest.param({"exp": -1.5}, Reason.BAD_CLAIMS, id="exp-negative-float"),
    pytest.param({"exp": 10**30}, Reason.BAD_CLAIMS, id="exp-10e30"),
    pytest.param({"exp": 2**63}, Reason.BAD_CLAIMS, id="exp-2e63"),
    pytest.param({"exp": 2**64 + 1}, Reason.BAD_CLAIMS, id="exp-2e64"),
    pytest.param({"exp": 1e300}, Reason.BAD_CLAIMS, id="exp-1e300"),
    pytest.param({"exp": EXP_LIMIT + 1}, Reason.BAD_CLAIMS, id="exp-limit-plus-1s"),
    pytest.param({"exp": int(NOW) + 401 * 86400}, Reason.BAD_CLAIMS, id="exp-401-days"),
    pytest.param({"exp": int(NOW) + 3650 * 86400}, Reason.BAD_CLAIMS, id="exp-10-years"),
    pytest.param({"exp": Raw("1e400")}, Reason.BAD_CLAIMS, id="exp-1e400-is-inf"),
    pytest.param({"exp": Raw("-1e400")}, Reason.BAD_CLAIMS, id="exp-minus-1e400"),
    pytest.param({"exp": Raw("1" + "0" * 400)}, Reason.BAD_CLAIMS, id="exp-int-401-digits"),
    pytest.param({"exp": Raw("9" * 3500)}, Reason.BAD_CLAIMS, id="exp-int-3500-digits"),
    # exp before iat or nbf
    pytest.param(
        {"exp": int(NOW) + 100, "iat": int(NOW) + 200},
        Reason.BAD_CLAIMS,
        id="exp-before-iat",
    ),
    pytest.param(
        {"exp": int(NOW) + 5, "iat": int(NOW) + 6}, Reason.BAD_CLAIMS, id="exp-1s-before-iat"
    ),
    pytest.param(
        {"exp": int(NOW) + 100, "nbf": int(NOW) + 200},
        Reason.BAD_CLAIMS,
        id="exp-before-nbf",
    ),
    # nbf and iat of the wrong type
    pytest.param({"nbf": True}, Reason.BAD_CLAIMS, id="nbf-true"),
    pytest.param({"nbf": str(int(NOW))}, Reason.BAD_CLAIMS, id="nbf-string"),
    pytest.param({"nbf": None}, Reason.BAD_CLAIMS, id="nbf-null"),
    pytest.param({"nbf": [int(NOW)]}, Reason.BAD_CLAIMS, id="nbf-list"),
    pytest.param({"nbf": -1}, Reason.BAD_CLAIMS, id="nbf-negative"),
    pytest.param({"nbf": Raw("-1e400")}, Reason.BAD_CLAIMS, id="nbf-minus-inf"),
    pytest.param({"nbf": Raw("1" + "0" * 400)}, Reason.BAD_CLAIMS, id="nbf-int-401-digits"),
    pytest.param({"iat": False}, Reason.BAD_CLAIMS, id="iat-false"),
    pytest.param({"iat": str(int(NOW))}, Reason.BAD_CLAIMS, id="iat-string"),
    pytest.param({"iat": None}, Reason.BAD_CLAIMS, id="iat-null"),
    pytest.param({"iat": {}}, Reason.BAD_CLAIMS, id="iat-object"),
    pytest.param({"iat": -1}, Reason.BAD_CLAIMS, id="iat-negative"),
    pytest.param({"iat": Raw("1e400")}, Reason.BAD_CLAIMS, id="iat-inf"),
    pytest.param({"iat": Raw("1" + "0" * 400)}, Reason.BAD_CLAIMS, id="iat-int-401-digits"),
    # expired
    pytest.param(
        {"exp": int(NOW) - LEEWAY - 1, **EARLY}, Reason.EXPIRED, id="expired-1s-beyond-leeway"
    ),
    pytest.param({"exp": int(NOW) - LEEWAY, **EARLY}, Reason.EXPIRED, id="expired-exactly-leeway"),
    pytest.param({"exp": NOW - LEEWAY - 0.5, **EARLY}, Reason.EXPIRED, id="expired-float"),
    pytest.param({"exp": int(NOW) - 3600, **EARLY}, Reason.EXPIRED, id="expired-1h"),
    pytest.param({"exp": 0, "iat": 0, "nbf": 0}, Reason.EXPIRED, id="exp-zero"),
    pytest.param({"exp": 1, "iat": DROP, "nbf": DROP}, Reason.EXPIRED, id="exp-one"),
    # not yet valid / issued in the future
    pytest.param({"nbf": int(NOW) + LEEWAY + 1}, Reason.NOT_YET_VALID, id="nbf-1s-beyond-leeway"),
    pytest.param({"nbf": int(NOW) + 1800}, Reason.NOT_YET_VALID, id="nbf-30min"),
    pytest.param({"nbf": NOW + LEEWAY + 0.001}, Reason.NOT_YET_VALID, id="nbf-float-just-beyond"),
    pytest.param(
        {"iat": int(NOW) + LEEWAY + 1, "nbf": DROP},
        Reason.ISSUED_IN_FUTURE,
        id="iat-1s-beyond-leeway",
    ),
    pytest.param({"iat": int(NOW) + 1000, "nbf": DROP}, Reason.ISSUED_IN_FUTURE, id="iat-1000s"),
]


@pytest.mark.parametrize(("claims", "reason"), TIME_DENIED)
async def test_time_claims_denied(verifier, mint, claims, reason):
    assert await reason_of(verifier, mint.with_claims(**claims)) is reason


TIME_ACCEPTED: list = [
    pytest.param({"exp": int(NOW) - LEEWAY + 1, **EARLY}, id="expired-within-leeway"),
    pytest.param({"exp": int(NOW) - 1, **EARLY}, id="expired-1s-ago"),
    pytest.param({"exp": int(NOW), "iat": int(NOW) - 60}, id="exp-now"),
    pytest.param({"exp": NOW + 3600.5}, id="exp-float"),
    pytest.param({"exp": float(EXP_LIMIT)}, id="exp-at-lifetime-limit"),
    pytest.param({"nbf": int(NOW) + LEEWAY}, id="nbf-at-leeway"),
    pytest.param({"nbf": int(NOW) + 10}, id="nbf-within-leeway"),
    pytest.param({"iat": int(NOW) + LEEWAY, "nbf": DROP}, id="iat-at-leeway"),
    pytest.param({"nbf": DROP}, id="nbf-missing"),
    pytest.param({"iat": DROP}, id="iat-missing"),
    pytest.param({"iat": DROP, "nbf": DROP}, id="only-exp"),
    pytest.param({"iat": 0, "nbf": 0}, id="issued-at-epoch"),
    pytest.param({"iat": NOW - 0.25, "nbf": NOW - 0.25}, id="float-iat-nbf"),
    pytest.param({"exp": Raw("1800003600.0")}, id="exp-float-literal"),
    pytest.param({"exp": Raw("18000036e2")}, id="exp-exponent-literal"),
]


@pytest.mark.parametrize("claims", TIME_ACCEPTED)
async def test_time_claims_accepted(verifier, mint, claims):
    token = mint.token(payload=to_json(mint.claims(**claims)))
    result = await verifier.verify(token, (AUD,))
    assert result.email == "alice@example.com"
    assert result.exp == float(json.loads(to_json(mint.claims(**claims)))["exp"])


async def test_moving_clock_turns_an_accepted_token_into_expired(verifier, mint, clock):
    token = mint.valid()  # exp = NOW + 3600
    assert (await verifier.verify(token, (AUD,))).exp == NOW + 3600
    clock.advance(3600 + LEEWAY - 1)
    assert (await verifier.verify(token, (AUD,))).email == "alice@example.com"
    clock.advance(1)
    assert await reason_of(verifier, token) is Reason.EXPIRED


async def test_clock_stepping_back_makes_a_token_not_yet_valid(verifier, mint, clock):
    token = mint.valid()  # nbf = NOW - 10
    clock.now -= 10 + LEEWAY + 1  # a wall-clock step back; the monotonic clock is untouched
    assert await reason_of(verifier, token) is Reason.NOT_YET_VALID


# ---------------------------------------------------------------------------------------------
# 10. Issuer games

ISSUER_GAMES: list = [
    pytest.param(DROP, id="missing"),
    pytest.param(None, id="null"),
    pytest.param([ISSUER], id="list"),
    pytest.param({"iss": ISSUER}, id="object"),
    pytest.param(1, id="number"),
    pytest.param(True, id="bool"),
    pytest.param("", id="empty"),
    pytest.param(ISSUER + "/", id="trailing-slash"),
    pytest.param(ISSUER + "//", id="two-trailing-slashes"),
    pytest.param(ISSUER.replace("https", "http"), id="http-scheme"),
    pytest.param(ISSUER.replace("https", "HTTPS"), id="upper-scheme"),
    pytest.param(ISSUER.replace("team", "TEAM"), id="upper-host"),
    pytest.param(ISSUER.replace("team", "Team"), id="capitalised-host"),
    pytest.param(ISSUER[:-1], id="prefix"),
    pytest.param(ISSUER[:-4], id="prefix-no-tld"),
    pytest.param(ISSUER + ".evil.example", id="suffix-domain"),
    pytest.param(ISSUER + "x", id="suffix-char"),
    pytest.param(ISSUER + ":443", id="explicit-port"),
    pytest.param(ISSUER + "/cdn-cgi/access/certs", id="with-path"),
    pytest.param(ISSUER + "?", id="empty-query"),
    pytest.param(ISSUER + "#", id="empty-fragment"),
    pytest.param(ISSUER.replace("https://", "https://evil@"), id="userinfo"),
    pytest.param("https://eam.cloudflareaccess.com", id="substring"),
    pytest.param("team.cloudflareaccess.com", id="no-scheme"),
    pytest.param("https://evilteam.cloudflareaccess.com", id="other-team"),
    pytest.param("https://team.fed.cloudflareaccess.com", id="fedramp-twin"),
    pytest.param("https://team.cloudflareaccess.com.", id="trailing-dot-fqdn"),
    pytest.param(ISSUER.replace("a", "\u0430", 1), id="cyrillic-a"),
    pytest.param(ISSUER.replace("e", "\u0435", 1), id="cyrillic-e"),
    pytest.param(ISSUER.replace("team", "xn--tem-8cd"), id="punycode"),
    pytest.param(ISSUER.replace("team", "\uff54\uff45\uff41\uff4d"), id="fullwidth"),
    pytest.param(" " + ISSUER, id="leading-space"),
    pytest.param(ISSUER + " ", id="trailing-space"),
    pytest.param(ISSUER + "\n", id="trailing-newline"),
    pytest.param("\t" + ISSUER, id="leading-tab"),
    pytest.param(ISSUER + "\x00", id="trailing-nul"),
    pytest.param(ISSUER + "\u200b", id="zero-width-space"),
]


@pytest.mark.parametrize("iss", ISSUER_GAMES)
async def test_issuer_games(verifier, mint, source, iss):
    assert await reason_of(verifier, mint.with_claims(iss=iss)) is Reason.BAD_ISSUER
    assert source.calls == 1


async def test_token_of_another_configured_issuer_is_not_verified_with_this_issuers_key(
    store, clock, mint
):
    # The second issuer's keys were never fetched: a token naming it gets "cannot decide",
    # never a check against the first issuer's keys.
    other_keys = IssuerKeys(issuer_config(name="other", issuer=OTHER_ISSUER), FakeSource(), clock)
    keys = KeyStore([store.get("team"), other_keys])  # type: ignore[list-item]
    v = Verifier(
        issuers=(issuer_config(), issuer_config(name="other", issuer=OTHER_ISSUER)),
        keys=keys,
        clock=clock,
        leeway=LEEWAY,
    )
    with pytest.raises(KeysUnavailable):
        await v.verify(mint.with_claims(iss=OTHER_ISSUER), (AUD,))
    assert (await v.verify(mint.valid(), (AUD,))).iss == ISSUER


# ---------------------------------------------------------------------------------------------
# 11. Audience games

AUDIENCE_DENIED: list = [
    pytest.param(DROP, id="missing"),
    pytest.param(None, id="null"),
    pytest.param("", id="empty-string"),
    pytest.param([], id="empty-list"),
    pytest.param([""], id="list-of-empty"),
    pytest.param(OTHER_AUD, id="other-app-string"),
    pytest.param([OTHER_AUD], id="other-app-list"),
    pytest.param(AUD[:-1], id="prefix"),
    pytest.param(AUD[1:], id="suffix"),
    pytest.param(AUD[8:40], id="substring"),
    pytest.param(AUD + "a", id="longer"),
    pytest.param(AUD.upper(), id="upper-case"),
    pytest.param([AUD.upper()], id="upper-case-in-list"),
    pytest.param(" " + AUD, id="leading-space"),
    pytest.param(AUD + " ", id="trailing-space"),
    pytest.param([AUD + "\n"], id="trailing-newline"),
    pytest.param([AUD + "\x00"], id="trailing-nul"),
    pytest.param(AUD + "," + OTHER_AUD, id="comma-joined"),
    pytest.param(f"{OTHER_AUD} {AUD}", id="space-joined"),
    pytest.param("*", id="wildcard"),
    pytest.param([1], id="number-member"),
    pytest.param([None], id="null-member"),
    pytest.param([AUD, 1], id="valid-and-number-member"),
    pytest.param([AUD, None], id="valid-and-null-member"),
    pytest.param([[AUD]], id="nested-list"),
    pytest.param({"aud": AUD}, id="object"),
    pytest.param({AUD: True}, id="object-keyed-by-aud"),
    pytest.param(True, id="bool"),
    pytest.param(0, id="zero"),
    pytest.param([OTHER_AUD, AUD.upper()], id="other-and-case-variant"),
]


@pytest.mark.parametrize("aud", AUDIENCE_DENIED)
async def test_audience_games(verifier, mint, aud):
    assert await reason_of(verifier, mint.with_claims(aud=aud)) is Reason.BAD_AUDIENCE


@pytest.mark.parametrize(
    "aud",
    [
        pytest.param(AUD, id="string"),
        pytest.param([AUD], id="list"),
        pytest.param([OTHER_AUD, AUD], id="second-of-two"),
        pytest.param([AUD, OTHER_AUD], id="first-of-two"),
        pytest.param([AUD, AUD], id="repeated"),
    ],
)
async def test_audience_accepted(verifier, mint, aud):
    assert (await verifier.verify(mint.with_claims(aud=aud), (AUD,))).email == "alice@example.com"


async def test_token_for_this_app_is_refused_by_another_apps_policy(verifier, mint):
    assert await reason_of(verifier, mint.valid(), (OTHER_AUD,)) is Reason.BAD_AUDIENCE


# ---------------------------------------------------------------------------------------------
# 12. Token type


TOKEN_TYPES = [
    "org",
    DROP,
    "APP",
    "App",
    "",
    None,
    "app ",
    " app",
    ["app"],
    1,
    "application",
    "app\x00",
]


@pytest.mark.parametrize("token_type", TOKEN_TYPES)
async def test_only_app_tokens_are_accepted(verifier, mint, token_type):
    assert await reason_of(verifier, mint.with_claims(type=token_type)) is Reason.BAD_TYPE


# ---------------------------------------------------------------------------------------------
# 13. Identity: a user (email) or a service token (common_name), never both, never neither

SERVICE_TOKEN = {
    "email": DROP,
    "sub": "",
    "common_name": SERVICE_TOKEN_ID,
    "nbf": DROP,
    "identity_nonce": DROP,
    "country": DROP,
    "custom": DROP,
}


async def test_service_token_yields_its_client_id(verifier, mint):
    claims = await verifier.verify(mint.with_claims(**SERVICE_TOKEN), (AUD,))
    assert claims.service_token == SERVICE_TOKEN_ID
    assert claims.email == ""
    assert claims.sub == ""
    assert claims.user == SERVICE_TOKEN_ID


async def test_service_token_without_sub_is_accepted(verifier, mint):
    claims = await verifier.verify(mint.with_claims(**SERVICE_TOKEN | {"sub": DROP}), (AUD,))
    assert claims.service_token == SERVICE_TOKEN_ID


async def test_user_with_empty_common_name_is_a_user(verifier, mint):
    claims = await verifier.verify(mint.with_claims(common_name=""), (AUD,))
    assert (claims.email, claims.service_token) == ("alice@example.com", "")


async def test_user_without_sub_is_accepted_with_empty_sub(verifier, mint):
    claims = await verifier.verify(mint.with_claims(sub=DROP), (AUD,))
    assert (claims.email, claims.sub) == ("alice@example.com", "")


IDENTITY_DENIED: list = [
    pytest.param({"email": DROP}, id="neither-email-nor-common-name"),
    pytest.param({"email": ""}, id="empty-email"),
    pytest.param({"email": None}, id="email-null"),
    pytest.param({"email": 5}, id="email-number"),
    pytest.param({"email": True}, id="email-bool"),
    pytest.param({"email": ["alice@example.com"]}, id="email-list"),
    pytest.param({"email": {"value": "alice@example.com"}}, id="email-object"),
    pytest.param({"sub": 7}, id="sub-number"),
    pytest.param({"sub": None}, id="sub-null"),
    pytest.param({"common_name": 5}, id="common-name-number"),
    pytest.param({"common_name": [SERVICE_TOKEN_ID]}, id="common-name-list"),
    pytest.param({"common_name": SERVICE_TOKEN_ID}, id="common-name-with-email"),
    pytest.param(SERVICE_TOKEN | {"sub": "7335d417"}, id="common-name-with-sub"),
    pytest.param(
        SERVICE_TOKEN | {"email": "alice@example.com", "sub": ""}, id="service-with-email"
    ),
    pytest.param(SERVICE_TOKEN | {"common_name": ""}, id="service-with-empty-common-name"),
]


@pytest.mark.parametrize("claims", IDENTITY_DENIED)
async def test_identity_denied(verifier, mint, claims):
    assert await reason_of(verifier, mint.with_claims(**claims)) is Reason.BAD_CLAIMS


# ---------------------------------------------------------------------------------------------
# Keys unavailable: authd cannot decide, which is not a denial


async def test_store_whose_first_fetch_failed_cannot_decide(clock, mint):
    down = FakeSource(error="HTTP 503")
    keys = IssuerKeys(issuer_config(), down, clock)
    await keys.refresh()
    v = Verifier((issuer_config(),), KeyStore([keys]), clock, LEEWAY)
    with pytest.raises(KeysUnavailable) as ex:
        await v.verify(mint.valid(), (AUD,))
    assert ex.value.reason is Reason.KEYS_UNAVAILABLE
    assert not isinstance(ex.value, Denied)
    assert "HTTP 503" in ex.value.detail
    # Once the key endpoint answers, the same token is accepted.
    down.serve(mint.key)
    assert await keys.refresh()
    assert (await v.verify(mint.valid(), (AUD,))).email == "alice@example.com"


# ---------------------------------------------------------------------------------------------
# Properties: whatever arrives, the answer is Claims or Denied, and Claims only when deserved


class _SyncVerifier:
    """A verifier on a private event loop: hypothesis examples cannot use async fixtures."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self.loop = asyncio.new_event_loop()
        self.source = FakeSource()
        self.source.serve(key)
        keys = IssuerKeys(issuer_config(), self.source, FakeClock())
        assert self.loop.run_until_complete(keys.refresh())
        self.verifier = Verifier(
            issuers=(issuer_config(),),
            keys=KeyStore([keys]),
            clock=FakeClock(),
            leeway=LEEWAY,
        )

    def outcome(self, token: str) -> Claims | Denied:
        try:
            return self.loop.run_until_complete(self.verifier.verify(token, (AUD,)))
        except Denied as ex:
            return ex

    def close(self) -> None:
        self.loop.close()


@pytest.fixture
def sync_verifier(rsa_key):
    v = _SyncVerifier(rsa_key)
    yield v
    v.close()


PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=6)
token_like = st.from_regex(r"\A[A-Za-z0-9_\-]{0,60}\.[A-Za-z0-9_\-]{0,60}\.[A-Za-z0-9_\-]{0,60}\Z")


def test_property_arbitrary_text_is_denied(sync_verifier):
    @PROPERTY_SETTINGS
    @given(st.text(max_size=300) | token_like | st.binary(max_size=200).map(b64))
    def check(token):
        assert isinstance(sync_verifier.outcome(token), Denied)

    check()


def test_property_arbitrary_json_segments_signed_with_the_real_key(sync_verifier, mint):
    header_members = st.sampled_from(["alg", "kid", "typ", "jku", "crit", "x"])
    claim_names = st.sampled_from(
        ["exp", "nbf", "iat", "iss", "aud", "type", "email", "sub", "common_name", "custom"],
    )

    @PROPERTY_SETTINGS
    @example(header_extra={}, claim_extra={}, header_all={}, payload_all={}, whole=False)
    @given(
        header_extra=st.dictionaries(header_members, json_values, max_size=3),
        claim_extra=st.dictionaries(claim_names | st.text(max_size=8), json_values, max_size=4),
        header_all=json_objects,
        payload_all=json_objects,
        whole=st.booleans(),
    )
    def check(header_extra, claim_extra, header_all, payload_all, whole):
        if whole:  # entirely arbitrary objects
            header, payload = header_all, payload_all
        else:  # the valid token with some members replaced by arbitrary values
            header, payload = mint.header() | header_extra, mint.claims() | claim_extra
        result = sync_verifier.outcome(mint.token(header=header, payload=payload))
        if isinstance(result, Denied):
            return
        # Claims came back: every promise of the contract must hold for this token.
        assert header.keys() <= {"alg", "kid", "typ"}
        assert header["alg"] == "RS256"
        assert header["kid"] == mint.kid
        assert payload["iss"] == ISSUER
        assert payload["type"] == "app"
        aud = payload["aud"]
        assert aud == AUD or (isinstance(aud, list) and AUD in aud)
        assert NOW - LEEWAY < payload["exp"] <= NOW + MAX_LIFETIME_SECONDS
        assert result.user in {payload.get("email"), payload.get("common_name")}

    check()


def test_property_any_mutation_of_a_valid_token_is_denied(sync_verifier, mint):
    valid = mint.valid()
    assert isinstance(sync_verifier.outcome(valid), Claims)
    alphabet = _ALPHABET + ".=+/ \t\n\x00é"

    @PROPERTY_SETTINGS
    @given(
        edits=st.lists(
            st.tuples(
                st.sampled_from(["replace", "insert", "delete", "flip"]),
                st.integers(min_value=0, max_value=len(valid) - 1),
                st.sampled_from(alphabet),
                st.integers(min_value=0, max_value=7),
            ),
            min_size=1,
            max_size=4,
        ),
    )
    def check(edits):
        chars = list(valid)
        for op, pos, char, bit in edits:
            i = min(pos, len(chars) - 1)
            if op == "replace":
                chars[i] = char
            elif op == "insert":
                chars.insert(i, char)
            elif op == "delete" and len(chars) > 1:
                del chars[i]
            elif op == "flip":
                chars[i] = chr(ord(chars[i]) ^ (1 << bit))
        token = "".join(chars)
        result = sync_verifier.outcome(token)
        if token == valid:
            assert isinstance(result, Claims)
        else:
            assert isinstance(result, Denied), f"mutated token accepted: {edits}"

    check()


# ---------------------------------------------------------------------------------------------
# Wycheproof: the signature primitives behind RS256, PS256, ES256 and EdDSA


WYCHEPROOF_FILES = {
    "rsa_signature_2048_sha256_test.json": "RS256",
    "rsa_pss_2048_sha256_mgf1_32_test.json": "PS256",
    "ecdsa_secp256r1_sha256_p1363_test.json": "ES256",
    "ed25519_test.json": "EdDSA",
}
# The JWS algorithm's fixed parameters; a file with other parameters is not a JWS test.
WYCHEPROOF_PARAMETERS = {
    "RS256": {"sha": "SHA-256", "keySize": 2048},
    "PS256": {"sha": "SHA-256", "mgf": "MGF1", "mgfSha": "SHA-256", "sLen": 32},
    "ES256": {"sha": "SHA-256"},
    "EdDSA": {},
}


def _wycheproof_cases() -> list:
    cases = []
    for name, alg in WYCHEPROOF_FILES.items():
        path = WYCHEPROOF / name
        if not path.is_file():
            # Fail (not skip) when the shared vectors are missing.
            cases.append(pytest.param(alg, path, None, None, id=f"{alg}-missing-file"))
            continue
        doc = json.loads(path.read_text())
        for g, group in enumerate(doc["testGroups"]):
            cases.extend(
                pytest.param(alg, path, g, test["tcId"], id=f"{alg}-{test['tcId']}")
                for test in group["tests"]
            )
    return cases


@pytest.fixture(scope="module")
def wycheproof_docs() -> dict[Path, dict]:
    return {
        WYCHEPROOF / name: json.loads((WYCHEPROOF / name).read_text())
        for name in WYCHEPROOF_FILES
        if (WYCHEPROOF / name).is_file()
    }


def test_wycheproof_files_are_present_and_complete():
    for name, alg in WYCHEPROOF_FILES.items():
        doc = json.loads((WYCHEPROOF / name).read_text())  # FileNotFoundError fails the test
        tests = [t for g in doc["testGroups"] for t in g["tests"]]
        assert len(tests) == doc["numberOfTests"]
        assert {t["result"] for t in tests} >= {"valid", "invalid"}
        for group in doc["testGroups"]:
            for field, value in WYCHEPROOF_PARAMETERS[alg].items():
                assert group[field] == value, (name, field)


@pytest.mark.parametrize(("alg", "path", "group_index", "tc_id"), _wycheproof_cases())
def test_wycheproof(wycheproof_docs, alg, path, group_index, tc_id):
    assert path in wycheproof_docs, f"Wycheproof vectors not found at {path}"
    group = wycheproof_docs[path]["testGroups"][group_index]
    (test,) = [t for t in group["tests"] if t["tcId"] == tc_id]
    public = serialization.load_der_public_key(bytes.fromhex(group["publicKeyDer"]))
    key = VerifyKey(kid="w", key=public, alg=None)  # type: ignore[arg-type]
    msg, sig = bytes.fromhex(test["msg"]), b64(bytes.fromhex(test["sig"]))
    try:
        check_signature(alg, key, msg, sig)
    except Denied as ex:
        outcome: Reason | None = ex.reason
    else:
        outcome = None
    if test["result"] == "valid":
        assert outcome is None, test["comment"]
    elif test["result"] == "invalid":
        # We feed canonical base64url, so a malformed verdict would hide the real answer.
        assert outcome is Reason.BAD_SIGNATURE, test["comment"]
    else:
        # "acceptable": legacy encodings (e.g. a PKCS#1 DigestInfo without the NULL) that a
        # library may accept or refuse; the README marks no case in these files as doubtful.
        assert outcome in {None, Reason.BAD_SIGNATURE}, test["comment"]


# json_web_signature_test.json: whole compact JWS values. Its README marks some labels doubtful:
# 346/347/350/351 are labelled valid but sign with an algorithm other than the key's "alg"
# (PS384 with a PS256 key, ES512 with an ES521 key): a strict verifier refuses them. 367/370 and
# 372/373 look swapped (the "invalid padding" cases carry the clean token and vice versa), so
# their labels are not trusted in either direction. authd also refuses by design: every HMAC
# algorithm, and an empty payload (a JWT payload is a JSON object).
JWS_DOUBTFUL = {"346", "347", "350", "351"}
JWS_SWAPPED = {"367", "370", "372", "373"}


def _jws_cases() -> list:
    path = WYCHEPROOF / "json_web_signature_test.json"
    if not path.is_file():
        return [pytest.param(None, None, None, id="jws-missing-file")]
    doc = json.loads(path.read_text())
    return [
        pytest.param(group.get("public"), test, group["comment"], id=f"jws-{test['tcId']}")
        for group in doc["testGroups"]
        for test in group["tests"]
    ]


def _jws_outcome(jws: str, public_jwk: dict | None) -> Reason | None:
    """What authd's verification steps say about a compact JWS: None means the signature holds."""
    try:
        header_b64, payload_b64, sig_b64 = split(jws)
        alg, kid = check_header(
            decode_json_segment(header_b64),
            issuer_config(algorithms=tuple(ASYMMETRIC_ALGORITHMS)),
        )
        if public_jwk is None:
            return Reason.UNKNOWN_KID
        try:
            keys, _ = parse_key_set(json.dumps({"keys": [{"kid": kid} | public_jwk]}).encode())
        except FetchError:
            return Reason.UNKNOWN_KID  # the key set holds no usable key (use enc, key_ops)
        key = keys.get(kid)
        if key is None:
            return Reason.UNKNOWN_KID
        check_signature(alg, key, f"{header_b64}.{payload_b64}".encode(), sig_b64)
    except Denied as ex:
        return ex.reason
    return None


@pytest.mark.parametrize(("public_jwk", "test", "group"), _jws_cases())
def test_wycheproof_jws(public_jwk, test, group):
    assert test is not None, f"Wycheproof vectors not found in {WYCHEPROOF}"
    tc_id = str(test["tcId"])
    alg = _vector_alg(test["jws"])
    deserved = (
        test["result"] == "valid"
        and tc_id not in JWS_DOUBTFUL | JWS_SWAPPED
        and alg in ASYMMETRIC_ALGORITHMS
        and test["jws"].split(".")[1] != ""
    )
    outcome = _jws_outcome(test["jws"], public_jwk)
    if deserved:
        assert outcome is None, (group, test["comment"])
    else:
        assert outcome is not None, (group, test["comment"], test["result"])


def _vector_alg(jws: str) -> object:
    """The ``alg`` a vector's header names, read tolerantly (the vector may itself be broken)."""
    segment = jws.split(".", maxsplit=1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except ValueError:  # binascii.Error, UnicodeDecodeError and JSONDecodeError
        return None
    return header.get("alg") if isinstance(header, dict) else None
