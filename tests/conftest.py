"""Factories shared by the unit tests: keys, forged tokens, a clock, a key source, the app."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import structlog
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from authd import config as config_mod
from authd.claims import Claims
from authd.decision import Authorizer
from authd.dev import key_set, thumbprint
from authd.errors import FetchError
from authd.fetch import Fetched
from authd.keys import IssuerKeys, KeyStore
from authd.service import Generation, Service
from devtools.standins import GetIdentityServer

ISSUER = "https://team.cloudflareaccess.com"
AUD = "a" * 64
OTHER_AUD = "b" * 64
NOW = 1_800_000_000.0


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.fixture(autouse=True)
def _reset_logging():
    """Undo any test's ``audit.configure``: the next test starts from the defaults."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def foreign_key() -> rsa.RSAPrivateKey:
    """A key the issuer never published."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def kid(rsa_key) -> str:
    return thumbprint(rsa_key.public_key())


class Raw(str):
    """A JSON value written into a document exactly as given (NaN, 1e400, huge integers)."""

    __slots__ = ()


def to_json(obj: dict[str, object]) -> str:
    """Compact JSON; top-level ``Raw`` values are spliced in verbatim."""
    members = (
        f"{json.dumps(k)}:{v if isinstance(v, Raw) else json.dumps(v, separators=(',', ':'))}"
        for k, v in obj.items()
    )
    return "{" + ",".join(members) + "}"


class Forge:
    """Builds tokens byte for byte: any header, any payload, any signature.

    ``header``/``payload`` may be dicts (serialized compactly, ``Raw`` values verbatim) or
    raw strings (sent as they are, so duplicate members and odd numbers are possible).
    An override of ``DROP`` leaves that member out.
    """

    def __init__(self, key: rsa.RSAPrivateKey, kid: str) -> None:
        self.key = key
        self.kid = kid

    def header(self, **overrides: object) -> dict[str, object]:
        return _without_dropped({"alg": "RS256", "kid": self.kid, "typ": "JWT"} | overrides)

    def claims(self, **overrides: object) -> dict[str, object]:
        base: dict[str, object] = {
            "aud": [AUD],
            "email": "alice@example.com",
            "exp": int(NOW) + 3600,
            "iat": int(NOW) - 10,
            "nbf": int(NOW) - 10,
            "iss": ISSUER,
            "type": "app",
            "identity_nonce": "nonce-1",
            "sub": "7335d417-61da-459d-899c-0a01c76a8e1f",
            "country": "DE",
            "custom": {"groups": ["sre", "ops"], "department": "infra"},
        }
        return _without_dropped(base | overrides)

    def rs256(self, signing_input: str, key: rsa.RSAPrivateKey | None = None) -> str:
        sig = (key or self.key).sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return b64(sig)

    def raw(
        self,
        header: str | bytes,
        payload: str | bytes,
        *,
        key: rsa.RSAPrivateKey | None = None,
        signature: str | None = None,
    ) -> str:
        """Segments from raw bytes, signed RS256 (so only the bytes under test are wrong)."""
        signing_input = f"{b64(header)}.{b64(payload)}"
        sig = signature if signature is not None else self.rs256(signing_input, key)
        return f"{signing_input}.{sig}"

    def token(
        self,
        header: dict[str, object] | str | None = None,
        payload: dict[str, object] | str | None = None,
        *,
        key: rsa.RSAPrivateKey | None = None,
        signature: str | None = None,
    ) -> str:
        h = self.header() if header is None else header
        p = self.claims() if payload is None else payload
        return self.raw(
            h if isinstance(h, str) else to_json(h),
            p if isinstance(p, str) else to_json(p),
            key=key,
            signature=signature,
        )

    def valid(self, **claims: object) -> str:
        return self.token(payload=self.claims(**claims))


DROP = object()


def _without_dropped(members: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in members.items() if v is not DROP}


@pytest.fixture(scope="session")
def drop() -> object:
    """Pass as a claim override to leave that claim out."""
    return DROP


@pytest.fixture(scope="session")
def forge(rsa_key, kid) -> Forge:
    return Forge(rsa_key, kid)


@dataclass
class FakeClock:
    now: float = NOW
    mono: float = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@dataclass
class FakeSource:
    """A key source a test can steer: a body to serve, or an error to raise."""

    body: bytes = b""
    error: str | None = None
    max_age: float | None = None
    calls: int = 0
    gate: asyncio.Event | None = None  # when set, fetches wait for it

    async def fetch(self) -> Fetched:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise FetchError(self.error)
        return Fetched(self.body, self.max_age)

    def serve(self, *keys: rsa.RSAPrivateKey) -> None:
        self.body = json.dumps(key_set(list(keys))).encode()
        self.error = None


@pytest.fixture
def source(rsa_key) -> FakeSource:
    s = FakeSource()
    s.serve(rsa_key)
    return s


def issuer_config(**overrides: object) -> config_mod.IssuerConfig:
    """The issuer that ``[[issuers]] name = "team"`` with the team's URLs parses to."""
    raw = {"name": "team", "issuer": ISSUER, "jwks_url": f"{ISSUER}/cdn-cgi/access/certs"}
    (parsed,) = config_mod.parse({"issuers": [raw]}).issuers
    return dataclasses.replace(parsed, **overrides)  # type: ignore[arg-type]


@pytest.fixture
def issuer_keys(source, clock) -> IssuerKeys:
    return IssuerKeys(issuer_config(), source, clock)


@pytest.fixture
async def store(issuer_keys) -> KeyStore:
    s = KeyStore([issuer_keys])
    await issuer_keys.refresh()
    return s


@pytest.fixture(scope="module")
def _running_identity_server() -> Iterator[GetIdentityServer]:
    with GetIdentityServer() as server:
        yield server


@pytest.fixture
def identity_server(_running_identity_server, monkeypatch) -> Iterator[GetIdentityServer]:
    """A get-identity stand-in on 127.0.0.1 (one per test module), with no answers and no
    requests recorded."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)  # loopback only, never through a proxy
    _running_identity_server.reset()
    yield _running_identity_server
    _running_identity_server.release()  # let any held answer go (to a client that left)


def make_config(**policies: dict[str, object]) -> config_mod.Config:
    """A parsed configuration with one issuer and the given policies (default: wiki)."""
    raw: dict[str, object] = {
        "issuers": [{"name": "team", "issuer": ISSUER, "jwks_url": f"{ISSUER}/certs"}],
        "policies": policies or {"wiki": {"audience": [AUD]}},
    }
    return config_mod.parse(raw)


def verified_claims(
    payload: dict[str, object] | None = None,
    *,
    email: str = "alice@example.com",
    service_token: str = "",
) -> Claims:
    """Claims as the verifier hands them on: a user's by default, a service token's on request."""
    return Claims(
        payload={} if payload is None else payload,
        issuer_name="cf",
        iss="https://t.cloudflareaccess.com",
        kid="k",
        alg="RS256",
        exp=0,
        valid_from=0,
        valid_until=0,
        email="" if service_token else email,
        sub="" if service_token else "sub-1",
        service_token=service_token,
    )


def make_service(cfg: config_mod.Config, store: KeyStore, clock: FakeClock) -> Service:
    """A service serving ``cfg`` with an injected key store (not reloadable: no file)."""
    return Service(
        Generation(cfg, store, Authorizer.from_config(cfg, store, clock)),
        path=None,
        client=httpx.AsyncClient(),
        clock=clock,
    )
