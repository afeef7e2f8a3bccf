"""Development keys and tokens: a local stand-in for Cloudflare Access.

``authd dev keygen`` writes a key pair in Cloudflare's certs shape and ``authd dev
mint`` signs Cloudflare-shaped tokens with it, for the demo, the tests, and for
operators checking their nginx setup without an Access login.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import RSAAlgorithm

DEV_ISSUER = "https://dev.cloudflareaccess.com"
DEV_AUDIENCE = hashlib.sha256(b"authd dev audience").hexdigest()


def thumbprint(key: rsa.RSAPublicKey) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, hex): 64 hex characters, like Cloudflare's kids."""
    numbers = key.public_numbers()
    members = {"e": _b64uint(numbers.e), "kty": "RSA", "n": _b64uint(numbers.n)}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _b64uint(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def keygen(directory: Path, bits: int = 2048) -> tuple[Path, Path]:
    """Write ``private.pem`` (mode 0600) and ``jwks.json`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem_path, jwks_path = directory / "private.pem", directory / "jwks.json"
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pem_path.touch(mode=0o600)
    pem_path.write_bytes(pem)
    jwks_path.write_text(json.dumps(key_set([private]), indent=2) + "\n")
    return pem_path, jwks_path


def key_set(keys: Sequence[rsa.RSAPrivateKey]) -> dict[str, object]:
    """The public half of ``keys`` in Cloudflare's certs shape: keys, public_cert, public_certs."""
    jwks, certs = [], []
    for private in keys:
        public = private.public_key()
        kid = thumbprint(public)
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        jwks.append({"kid": kid, "alg": "RS256", "use": "sig", **jwk})
        certs.append({"kid": kid, "cert": _self_signed(private).decode("ascii")})
    return {"keys": jwks, "public_cert": certs[0], "public_certs": certs}


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


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TypeError(f"{path}: not an RSA private key")
    return key


def claims(  # noqa: PLR0913 -- one keyword per command-line option
    *,
    now: float,
    iss: str = DEV_ISSUER,
    aud: Sequence[str] = (DEV_AUDIENCE,),
    email: str = "alice@example.com",
    ttl: int = 3600,
    token_type: str = "app",
    service_token: str | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """The claims of a Cloudflare application token (a user's, or a service token's)."""
    # An already-expired token (negative ttl) was issued an hour before it expired.
    expires = int(now) + ttl
    issued = int(now) if ttl > 0 else expires - 3600
    payload: dict[str, object] = {"aud": list(aud), "iss": iss, "iat": issued, "exp": expires}
    payload["type"] = token_type
    if service_token is not None:
        payload |= {"common_name": service_token, "sub": ""}
    else:
        payload |= {
            "email": email,
            "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, f"mailto:{email}")),
            "nbf": issued,
            "identity_nonce": secrets.token_urlsafe(12),
            "country": "DE",
        }
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


def mint(private: rsa.RSAPrivateKey, payload: Mapping[str, object]) -> str:
    """Sign ``payload`` with RS256 and the key's thumbprint as ``kid``."""
    kid = thumbprint(private.public_key())
    return jwt.encode(dict(payload), private, algorithm="RS256", headers={"kid": kid})
