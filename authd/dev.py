"""Development keys and tokens: local stand-ins for the identity-aware proxies authd serves.

``authd dev keygen`` writes a key pair and lays its public half out the way the provider
publishes it (Cloudflare's certs, Google IAP's JWKS, an ALB's PEM per kid, an OIDC provider's
discovery document and JWKS); ``authd dev mint`` signs tokens shaped like that provider's with
it. For the demo, the tests, and operators checking their nginx setup without a real login.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm

from authd.config import GOOGLE_IAP_ISSUER, Provider, url_problem

PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

DEV_EMAIL = "alice@example.com"
# Cloudflare: a team's issuer and an application's AUD tag (64 hex characters).
DEV_ISSUER = "https://dev.cloudflareaccess.com"
DEV_AUDIENCE = hashlib.sha256(b"authd dev audience").hexdigest()
# Google IAP behind a load balancer: /projects/PROJECT_NUMBER/global/backendServices/SERVICE_ID.
DEV_IAP_AUDIENCE = "/projects/123456789012/global/backendServices/4567890123456789012"
# AWS ALB: the token's iss and client are the OIDC provider's and the ALB's client id there;
# signer is the ALB's ARN, which binds the token to the application (it carries no aud).
DEV_ALB_ISSUER = "https://idp.example.com"
DEV_ALB_CLIENT = "authd-dev-client"
DEV_ALB_SIGNER = (
    "arn:aws:elasticloadbalancing:eu-west-1:123456789012:"
    "loadbalancer/app/authd-dev/50dc6c495c0c9188"
)
# Generic OIDC: the audience of an ID token is the relying party's client id.
DEV_OIDC_CLIENT_ID = "authd-dev"

# Seconds until exp when --ttl is not given. IAP's tokens live 10 minutes.
DEFAULT_TTL: Mapping[Provider, int] = {
    "cloudflare": 3600,
    "google-iap": 600,
    "aws-alb": 3600,
    "oidc": 3600,
}

PRIVATE_PEM = "private.pem"
JWKS_JSON = "jwks.json"
ALB_KEYS_DIR = "alb-keys"
OIDC_DISCOVERY_JSON = "openid-configuration.json"

_EC_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


# --- key ids and public key documents -------------------------------------------------------


def thumbprint(key: PublicKey) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, hex): 64 hex characters, like Cloudflare's kids.

    Over the required members only, in lexical order: e, kty, n (RSA); crv, kty, x, y (EC,
    with each coordinate the full length of the curve's field, RFC 7518 6.2.1.2).
    """
    members: dict[str, str]
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        members = {"e": _b64uint(numbers.e), "kty": "RSA", "n": _b64uint(numbers.n)}
    else:
        point = key.public_numbers()
        crv = _EC_CURVES.get(key.curve.name)
        if crv is None:
            raise ValueError(f"no JWK name for the curve {key.curve.name}")
        size = (key.curve.key_size + 7) // 8
        members = {
            "crv": crv,
            "kty": "EC",
            "x": _b64(point.x.to_bytes(size, "big")),
            "y": _b64(point.y.to_bytes(size, "big")),
        }
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def alb_kid(key: ec.EllipticCurvePublicKey) -> str:
    """The kid of an ALB-shaped key: a UUID, as an ALB's are, made from the key's thumbprint so
    that a minting process finds it from the private key alone."""
    return str(uuid.UUID(bytes=bytes.fromhex(thumbprint(key))[:16], version=4))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64uint(n: int) -> str:
    return _b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


def jwk(key: PublicKey) -> dict[str, object]:
    """The public JWK of ``key`` as providers publish it: kid (the thumbprint), alg (RS256, or
    ES256 for a P-256 key), use sig, and the key's members (no key_ops, unlike PyJWT's)."""
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        members = {"kty": "RSA", "n": _b64uint(numbers.n), "e": _b64uint(numbers.e)}
        return {"kid": thumbprint(key), "alg": "RS256", "use": "sig", **members}
    if not isinstance(key.curve, ec.SECP256R1):
        raise TypeError(f"an ES256 key is on P-256, not {key.curve.name}")
    members = ECAlgorithm.to_jwk(key, as_dict=True)
    return {"kid": thumbprint(key), "alg": "ES256", "use": "sig", **members}


def jwks(keys: Sequence[PublicKey]) -> dict[str, object]:
    """A plain JWKS, ``{"keys": [...]}``: Google IAP's public_key-jwk (EC keys) and an OIDC
    provider's jwks_uri (RSA keys) have this shape."""
    return {"keys": [jwk(key) for key in keys]}


def key_set(keys: Sequence[rsa.RSAPrivateKey]) -> dict[str, object]:
    """The public half of ``keys`` in Cloudflare's certs shape: keys, public_cert, public_certs."""
    entries, certs = [], []
    for private in keys:
        entry = jwk(private.public_key())
        entries.append(entry)
        certs.append({"kid": entry["kid"], "cert": _self_signed(private).decode("ascii")})
    return {"keys": entries, "public_cert": certs[0], "public_certs": certs}


def _self_signed(private: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "authd dev key")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(private, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def alb_public_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    """The public key as an ALB's key endpoint serves it at ``<base>/<kid>``: a PEM
    SubjectPublicKeyInfo (``-----BEGIN PUBLIC KEY-----``)."""
    return key.public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def oidc_discovery(issuer: str) -> dict[str, object]:
    """An OpenID Provider's discovery document for ``issuer`` (its members required by OpenID
    Connect Discovery 1.0 section 3), with the key set at ``<issuer>/jwks.json``."""
    base = issuer.rstrip("/")
    return {
        "issuer": issuer,
        "authorization_endpoint": f"{base}/authorize",
        "token_endpoint": f"{base}/token",
        "jwks_uri": f"{base}/{JWKS_JSON}",
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }


# --- key files ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyFiles:
    """What ``write_keys`` wrote: the private key, the files to publish, the kid tokens carry."""

    provider: Provider
    kid: str
    private: Path
    public: tuple[Path, ...]


def write_keys(
    directory: Path,
    provider: Provider = "cloudflare",
    *,
    issuer: str | None = None,
    bits: int = 2048,
) -> KeyFiles:
    """Write a new key pair for ``provider`` into ``directory``, the private key as
    ``private.pem`` (PKCS#8, mode 0600, replacing one that is there) and the public half as
    the provider publishes it:

    - cloudflare: ``jwks.json`` in Cloudflare's certs shape (RSA);
    - google-iap: ``jwks.json``, a JWKS of one EC P-256 key (IAP's public_key-jwk shape);
    - aws-alb: ``alb-keys/<kid>``, the PEM public key (serve ``alb-keys`` as alb_keys_url);
    - oidc: ``jwks.json`` (RSA) and ``openid-configuration.json`` for ``issuer`` (required).

    Raises ValueError for an issuer given to another provider, or one authd would not fetch
    the key set of.
    """
    discovery: dict[str, object] | None = None
    if provider == "oidc":
        if issuer is None:
            raise ValueError("an OIDC provider's discovery document needs its issuer URL (--iss)")
        discovery = oidc_discovery(issuer)
        if (problem := url_problem(str(discovery["jwks_uri"]))) is not None:
            raise ValueError(f"authd would not fetch {discovery['jwks_uri']}: {problem}")
    elif issuer is not None:
        raise ValueError(
            f"only an OIDC provider's key files name the issuer (--iss), not {provider}'s",
        )
    directory.mkdir(parents=True, exist_ok=True)
    pem = directory / PRIVATE_PEM
    if provider == "aws-alb":
        alb = ec.generate_private_key(ec.SECP256R1())
        _write_private(pem, alb)
        kid = alb_kid(alb.public_key())
        (directory / ALB_KEYS_DIR).mkdir(exist_ok=True)
        published = directory / ALB_KEYS_DIR / kid
        published.write_bytes(alb_public_pem(alb.public_key()))
        return KeyFiles(provider, kid, pem, (published,))
    if provider == "cloudflare":
        team = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        _write_private(pem, team)
        certs = _write_json(directory / JWKS_JSON, key_set([team]))
        return KeyFiles(provider, thumbprint(team.public_key()), pem, (certs,))
    private: PrivateKey
    if provider == "google-iap":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    _write_private(pem, private)
    public = [_write_json(directory / JWKS_JSON, jwks([private.public_key()]))]
    if discovery is not None:
        public.append(_write_json(directory / OIDC_DISCOVERY_JSON, discovery))
    return KeyFiles(provider, thumbprint(private.public_key()), pem, tuple(public))


def keygen(directory: Path, bits: int = 2048) -> tuple[Path, Path]:
    """Cloudflare's key files: write ``private.pem`` (mode 0600) and ``jwks.json`` into
    ``directory`` and return their paths."""
    files = write_keys(directory, "cloudflare", bits=bits)
    return files.private, files.public[0]


def _write_private(path: Path, key: PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)  # a file that was there keeps its mode otherwise
        out.write(pem)


def _write_json(path: Path, document: Mapping[str, object]) -> Path:
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    """An RSA private key from a PEM file (Cloudflare's and OIDC tokens are RS256)."""
    key = _load_pem(path)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TypeError(f"{path}: not an RSA private key")
    return key


def load_ec_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An EC P-256 private key from a PEM file (IAP's and ALB's tokens are ES256)."""
    key = _load_pem(path)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
        key.curve,
        ec.SECP256R1,
    ):
        raise TypeError(f"{path}: not an EC P-256 private key")
    return key


def _load_pem(path: Path) -> object:
    data = path.read_bytes()
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as ex:  # TypeError: the key is encrypted
        raise ValueError(f"{path}: not an unencrypted PEM private key") from ex


# --- claims -----------------------------------------------------------------------------------


def _times(now: float, ttl: int) -> tuple[int, int]:
    """(iat, exp). An already-expired token (ttl <= 0) was issued an hour before it expired."""
    expires = int(now) + ttl
    return (int(now) if ttl > 0 else expires - 3600), expires


def _subject(email: str) -> str:
    """A stable user id per email, UUID-shaped (Cloudflare's sub; an IdP's opaque subject)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"mailto:{email}"))


def _google_id(email: str) -> str:
    """A stable 21-digit Google account id per email, as IAP's sub carries after its prefix."""
    digest = hashlib.sha256(b"authd dev google id:" + email.encode()).digest()
    return "1" + f"{int.from_bytes(digest[:12], 'big') % 10**20:020d}"


def claims(  # noqa: PLR0913 -- one keyword per command-line option
    *,
    now: float,
    iss: str = DEV_ISSUER,
    aud: Sequence[str] = (DEV_AUDIENCE,),
    email: str = DEV_EMAIL,
    ttl: int = DEFAULT_TTL["cloudflare"],
    token_type: str = "app",
    service_token: str | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """The claims of a Cloudflare application token (a user's, or a service token's)."""
    issued, expires = _times(now, ttl)
    payload: dict[str, object] = {"aud": list(aud), "iss": iss, "iat": issued, "exp": expires}
    payload["type"] = token_type
    if service_token is not None:
        payload |= {"common_name": service_token, "sub": ""}
    else:
        payload |= {
            "email": email,
            "sub": _subject(email),
            "nbf": issued,
            "identity_nonce": secrets.token_urlsafe(12),
            "country": "DE",
        }
    return _with_extra(payload, extra)


def iap_claims(  # noqa: PLR0913 -- one keyword per command-line option
    *,
    now: float,
    iss: str = GOOGLE_IAP_ISSUER,
    aud: str = DEV_IAP_AUDIENCE,
    email: str = DEV_EMAIL,
    ttl: int = DEFAULT_TTL["google-iap"],
    extra: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """The claims of a Google IAP token: aud (one string), iss, iat, exp, sub
    ("accounts.google.com:" and the account id), email, hd (the email's domain) and google
    (access_levels, none here)."""
    issued, expires = _times(now, ttl)
    payload: dict[str, object] = {
        "aud": aud,
        "email": email,
        "exp": expires,
        "iat": issued,
        "iss": iss,
        "sub": f"accounts.google.com:{_google_id(email)}",
        "google": {"access_levels": []},
    }
    if domain := email.rpartition("@")[2]:
        payload["hd"] = domain
    return _with_extra(payload, extra)


def alb_claims(
    *,
    now: float,
    iss: str = DEV_ALB_ISSUER,
    email: str = DEV_EMAIL,
    ttl: int = DEFAULT_TTL["aws-alb"],
    extra: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """The claims of an ALB's x-amzn-oidc-data: the OIDC provider's user info (sub, email,
    email_verified) with the exp and iss the ALB adds. No aud and no iat."""
    _, expires = _times(now, ttl)
    payload: dict[str, object] = {
        "sub": _subject(email),
        "email": email,
        "email_verified": True,
        "exp": expires,
    }
    payload["iss"] = iss
    return _with_extra(payload, extra)


def oidc_claims(  # noqa: PLR0913 -- one keyword per command-line option
    *,
    now: float,
    iss: str,
    aud: Sequence[str] = (DEV_OIDC_CLIENT_ID,),
    email: str = DEV_EMAIL,
    ttl: int = DEFAULT_TTL["oidc"],
    extra: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """The claims of an OpenID Connect ID token: iss, aud (the client id; a list when there are
    several), sub, email, email_verified, iat, exp."""
    issued, expires = _times(now, ttl)
    payload: dict[str, object] = {
        "iss": iss,
        "aud": aud[0] if len(aud) == 1 else list(aud),
        "sub": _subject(email),
        "email": email,
        "email_verified": True,
        "iat": issued,
        "exp": expires,
    }
    return _with_extra(payload, extra)


def _with_extra(
    payload: dict[str, object], extra: Mapping[str, object] | None
) -> dict[str, object]:
    for key, value in (extra or {}).items():
        _set_dotted(payload, key, value)
    return payload


def _set_dotted(payload: dict[str, object], key: str, value: object) -> None:
    *parents, last = key.split(".")
    node = payload
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value


def parse_claim_argument(text: str) -> tuple[str, object]:
    """``k=v``: the value is JSON when it parses as JSON, else the string itself."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    try:
        value: object = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


# --- signing ----------------------------------------------------------------------------------


def mint(private: PrivateKey, payload: Mapping[str, object]) -> str:
    """Sign ``payload`` with the key's thumbprint as ``kid``: RS256 with an RSA key
    (Cloudflare, OIDC), ES256 with an EC P-256 key (Google IAP)."""
    kid = thumbprint(private.public_key())
    if isinstance(private, rsa.RSAPrivateKey):
        return jwt.encode(dict(payload), private, algorithm="RS256", headers={"kid": kid})
    if not isinstance(private.curve, ec.SECP256R1):
        raise TypeError(f"an ES256 key is on P-256, not {private.curve.name}")
    return jwt.encode(dict(payload), private, algorithm="ES256", headers={"kid": kid})


def mint_alb(
    private: ec.EllipticCurvePrivateKey,
    payload: Mapping[str, object],
    *,
    signer: str = DEV_ALB_SIGNER,
    client: str = DEV_ALB_CLIENT,
) -> str:
    """Sign ``payload`` the way an ALB signs x-amzn-oidc-data.

    The header carries alg (ES256), kid (``alb_kid``), signer, iss, client, exp (iss and exp
    copied from the payload) and typ. Every segment is base64url *with* ``=`` padding, which
    RFC 7515's base64url never has, and the signature (raw r||s) is over the padded
    segments: stripping the padding breaks it.
    """
    header: dict[str, object] = {"alg": "ES256", "kid": alb_kid(private.public_key())}
    header |= {"signer": signer, "iss": payload.get("iss"), "client": client}
    header |= {"exp": payload.get("exp"), "typ": "JWT"}
    signing_input = f"{_padded_json(header)}.{_padded_json(payload)}"
    signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input.encode("ascii"), private)
    return f"{signing_input}.{_padded(signature)}"


def _padded_json(document: Mapping[str, object]) -> str:
    return _padded(json.dumps(document, separators=(",", ":")).encode())


def _padded(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii")


def mint_token(  # noqa: PLR0913 -- one keyword per command-line option
    provider: Provider,
    key: Path,
    *,
    now: float,
    iss: str | None = None,
    aud: Sequence[str] = (),
    email: str = DEV_EMAIL,
    ttl: int | None = None,
    token_type: str | None = None,
    service_token: str | None = None,
    signer: str | None = None,
    client: str | None = None,
    extra: Mapping[str, object] | None = None,
) -> str:
    """A token of ``provider``'s shape, signed with the private key in the file ``key``.

    Takes ``authd dev mint``'s options, None (or empty) where not given, and fills in the
    provider's defaults. Raises ValueError for an option the provider's tokens have no place
    for, TypeError for a key of the wrong kind, OSError for an unreadable file.
    """
    _check_options(
        provider,
        aud,
        {"--type": token_type, "--service-token": service_token},
        {"--signer": signer, "--client": client},
    )
    ttl = DEFAULT_TTL[provider] if ttl is None else ttl
    if provider == "google-iap":
        payload = iap_claims(
            now=now,
            iss=iss or GOOGLE_IAP_ISSUER,
            aud=aud[0] if aud else DEV_IAP_AUDIENCE,
            email=email,
            ttl=ttl,
            extra=extra,
        )
        return mint(_ec_key(key, provider), payload)
    if provider == "aws-alb":
        payload = alb_claims(now=now, iss=iss or DEV_ALB_ISSUER, email=email, ttl=ttl, extra=extra)
        return mint_alb(
            _ec_key(key, provider),
            payload,
            signer=signer or DEV_ALB_SIGNER,
            client=client or DEV_ALB_CLIENT,
        )
    if provider == "oidc":
        if iss is None:
            raise ValueError("--provider oidc needs --iss, the issuer in the discovery document")
        aud = aud or (DEV_OIDC_CLIENT_ID,)
        payload = oidc_claims(now=now, iss=iss, aud=aud, email=email, ttl=ttl, extra=extra)
        return mint(_rsa_key(key, provider), payload)
    payload = claims(
        now=now,
        iss=iss or DEV_ISSUER,
        aud=aud or (DEV_AUDIENCE,),
        email=email,
        ttl=ttl,
        token_type=token_type or "app",
        service_token=service_token,
        extra=extra,
    )
    return mint(_rsa_key(key, provider), payload)


def _check_options(
    provider: Provider,
    aud: Sequence[str],
    cloudflare: Mapping[str, str | None],
    alb: Mapping[str, str | None],
) -> None:
    for only, options in (("cloudflare", cloudflare), ("aws-alb", alb)):
        for option, value in options.items():
            if value is not None and provider != only:
                raise ValueError(f"{option} is only for --provider {only}")
    if provider == "aws-alb" and aud:
        raise ValueError(
            "an ALB's token has no aud: a policy's audience is the ALB's ARN, which the token "
            "carries as signer (--signer)",
        )
    if provider == "google-iap" and len(aud) > 1:
        raise ValueError("an IAP token's aud is one string: give --aud once")


def _rsa_key(path: Path, provider: Provider) -> rsa.RSAPrivateKey:
    try:
        return load_private_key(path)
    except TypeError as ex:
        raise TypeError(f"{ex}: {provider} tokens are RS256; {_keygen_hint(provider)}") from ex


def _ec_key(path: Path, provider: Provider) -> ec.EllipticCurvePrivateKey:
    try:
        return load_ec_private_key(path)
    except TypeError as ex:
        raise TypeError(f"{ex}: {provider} tokens are ES256; {_keygen_hint(provider)}") from ex


def _keygen_hint(provider: Provider) -> str:
    option = "" if provider == "cloudflare" else f" --provider {provider}"
    return f"make one with `authd dev keygen{option} DIR`"
