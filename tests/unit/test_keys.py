# ruff: noqa: ARG005 -- table rows share one builder signature; not every row needs its argument
"""authd.keys: what a key set may hold, and how the store fetches, caches, refetches and ages it.

The store is driven with the shared FakeSource (steerable, gated) and FakeClock; HttpSource is
driven against a real HTTP server on 127.0.0.1 started per test.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import socket
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from structlog.testing import capture_logs

import authd.keys
from authd.dev import key_set, thumbprint
from authd.errors import Denied, FetchError, KeysUnavailable, Reason
from authd.fetch import MAX_BODY_BYTES, Fetched, make_http_client
from authd.keys import (
    MIN_REFRESH_SECONDS,
    RETRY_BACKOFF_SECONDS,
    UNKNOWN_KID_WAIT_SECONDS,
    FileSource,
    HttpSource,
    IssuerKeys,
    KeyStore,
    parse_key_set,
)
from tests.conftest import ISSUER, FakeSource, issuer_config

CONFIG = issuer_config()
REFRESH = CONFIG.refresh_seconds  # 3600
COOLDOWN = CONFIG.refetch_cooldown_seconds  # 60
MAX_STALE = CONFIG.max_stale_seconds  # 86400


def kid_of(key: rsa.RSAPrivateKey) -> str:
    return thumbprint(key.public_key())


def jwk_of(key: rsa.RSAPrivateKey, **members: object) -> dict[str, object]:
    """A public RSA JWK in Cloudflare's shape (kid = thumbprint, alg RS256, use sig)."""
    public = key.public_key()
    jwk = {"kid": kid_of(key), "alg": "RS256", "use": "sig"}
    jwk |= RSAAlgorithm.to_jwk(public, as_dict=True)
    return jwk | members


def cert_of(key: rsa.RSAPrivateKey, kid: str | None = None) -> dict[str, object]:
    """A ``public_certs`` entry: a self-signed certificate of the key."""
    entry = dict(key_set([key])["public_certs"][0])  # type: ignore[index]
    return entry if kid is None else entry | {"kid": kid}


def body(**doc: object) -> bytes:
    return json.dumps(doc).encode()


def fingerprint(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


@pytest.fixture(scope="module")
def weak_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


@pytest.fixture
async def loaded(issuer_keys: IssuerKeys) -> IssuerKeys:
    """The shared issuer_keys after its first, successful fetch."""
    assert await issuer_keys.refresh()
    return issuer_keys


@dataclass
class SignallingSource(FakeSource):
    """A FakeSource that also says when a fetch has started (so a test can wait for it)."""

    entered: asyncio.Event = field(default_factory=asyncio.Event)

    async def fetch(self) -> Fetched:
        self.entered.set()
        return await super().fetch()


class BuggySource:
    """A source with a bug: it raises something that is not a FetchError."""

    calls = 0

    async def fetch(self) -> Fetched:
        self.calls += 1
        raise RuntimeError("boom")


@pytest.fixture
async def gated(rsa_key, clock) -> tuple[IssuerKeys, SignallingSource]:
    """A loaded store whose next fetch waits until the test sets ``source.gate``."""
    src = SignallingSource()
    src.serve(rsa_key)
    keys = IssuerKeys(issuer_config(), src, clock)
    assert await keys.refresh()
    src.entered.clear()
    src.gate = asyncio.Event()
    return keys, src


# ---------------------------------------------------------------------------------------------
# parse_key_set: what a fetched document may contribute


def test_cloudflare_shaped_key_set_yields_every_key(rsa_key, foreign_key):
    keys, dropped = parse_key_set(json.dumps(key_set([rsa_key, foreign_key])).encode())
    assert set(keys) == {kid_of(rsa_key), kid_of(foreign_key)}
    assert dropped == []
    key = keys[kid_of(rsa_key)]
    assert key.alg == "RS256"  # the JWK's alg, not the certificate's absence of one
    assert key.fingerprint == fingerprint(rsa_key)


def _ec_jwk(**members: object) -> dict[str, object]:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    return {"kid": "ec-key", **ECAlgorithm.to_jwk(public, as_dict=True)} | members


def _ed_jwk(**members: object) -> dict[str, object]:
    raw = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    return {"kid": "ed-key", "kty": "OKP", "crv": "Ed25519", "x": x} | members


def _private_jwk(key: rsa.RSAPrivateKey) -> dict[str, object]:
    """A full private RSA JWK as an issuer might leak it (without the key_ops PyJWT adds)."""
    jwk = {"kid": "private", **RSAAlgorithm.to_jwk(key, as_dict=True)}
    return {m: v for m, v in jwk.items() if m != "key_ops"}


# Each builder gets (foreign, weak) and returns one entry of "keys" that must be dropped.
DROPPED_JWKS: list = [
    pytest.param(
        lambda f, w: {"kid": "private", **RSAAlgorithm.to_jwk(f, as_dict=True)},
        id="rsa-private-key",
    ),
    pytest.param(lambda f, w: _private_jwk(f), id="rsa-private-key-without-key-ops"),
    pytest.param(lambda f, w: jwk_of(f, d="AQAB"), id="rsa-with-d-only"),
    pytest.param(lambda f, w: jwk_of(f, p="AQAB"), id="rsa-with-p-only"),
    pytest.param(lambda f, w: {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}, id="oct"),
    pytest.param(lambda f, w: {"kty": "oct", "kid": "hmac", "alg": "HS256"}, id="oct-without-k"),
    pytest.param(lambda f, w: jwk_of(f, use="enc"), id="use-enc"),
    pytest.param(lambda f, w: jwk_of(f, use=None), id="use-null"),
    pytest.param(lambda f, w: jwk_of(f, use="SIG"), id="use-upper-case"),
    pytest.param(lambda f, w: jwk_of(f, key_ops=["encrypt"]), id="key-ops-encrypt"),
    pytest.param(lambda f, w: jwk_of(f, key_ops=["sign"]), id="key-ops-sign-only"),
    pytest.param(lambda f, w: jwk_of(f, key_ops=[]), id="key-ops-empty"),
    pytest.param(lambda f, w: jwk_of(f, key_ops="verify"), id="key-ops-string"),
    pytest.param(lambda f, w: jwk_of(w), id="rsa-1024-bits"),
    pytest.param(lambda f, w: jwk_of(f, kty="XYZ"), id="unknown-kty"),
    pytest.param(lambda f, w: {k: v for k, v in jwk_of(f).items() if k != "kty"}, id="kty-missing"),
    pytest.param(lambda f, w: jwk_of(f, kty="rsa"), id="kty-lower-case"),
    pytest.param(lambda f, w: {k: v for k, v in jwk_of(f).items() if k != "kid"}, id="kid-missing"),
    pytest.param(lambda f, w: jwk_of(f, kid=""), id="kid-empty"),
    pytest.param(lambda f, w: jwk_of(f, kid=12), id="kid-number"),
    pytest.param(lambda f, w: jwk_of(f, kid="k" * 300), id="kid-300-chars"),
    pytest.param(lambda f, w: jwk_of(f, kid="a\nb"), id="kid-newline"),
    pytest.param(lambda f, w: jwk_of(f, alg=5), id="alg-not-a-string"),
    pytest.param(lambda f, w: jwk_of(f, n="!!!"), id="rsa-n-not-base64url"),
    pytest.param(lambda f, w: jwk_of(f, n=12345), id="rsa-n-number"),
    pytest.param(lambda f, w: jwk_of(f, e="AQ"), id="rsa-exponent-1"),
    pytest.param(lambda f, w: {k: v for k, v in jwk_of(f).items() if k != "n"}, id="rsa-n-missing"),
    pytest.param(lambda f, w: _ec_jwk(d="AQAB"), id="ec-private"),
    pytest.param(lambda f, w: _ec_jwk(x="AAAA", y="AAAA"), id="ec-point-not-on-curve"),
    pytest.param(lambda f, w: _ec_jwk(crv="P-192"), id="ec-unknown-curve"),
    pytest.param(lambda f, w: _ed_jwk(crv="X25519"), id="okp-x25519-is-not-a-signature-key"),
    pytest.param(lambda f, w: _ed_jwk(x=""), id="okp-empty-x"),
    pytest.param(lambda f, w: "just a string", id="not-an-object-string"),
    pytest.param(lambda f, w: 5, id="not-an-object-number"),
    pytest.param(lambda f, w: None, id="not-an-object-null"),
    pytest.param(lambda f, w: [jwk_of(f)], id="not-an-object-list"),
    pytest.param(lambda f, w: jwk_of(f, kty=["RSA"]), id="kty-list"),
    pytest.param(lambda f, w: jwk_of(f, kty={"RSA": 1}), id="kty-object"),
]


@pytest.mark.parametrize("build", DROPPED_JWKS)
def test_unusable_jwk_is_dropped_and_the_rest_kept(rsa_key, foreign_key, weak_key, build):
    bad = build(foreign_key, weak_key)
    keys, dropped = parse_key_set(body(keys=[jwk_of(rsa_key), bad]))
    assert list(keys) == [kid_of(rsa_key)]
    assert len(dropped) == 1
    assert dropped[0].startswith("keys[1]: ")


@pytest.mark.parametrize(
    ("build", "note"),
    [
        pytest.param(lambda f, w: _private_jwk(f), "private key material", id="private"),
        pytest.param(
            lambda f, w: {"kty": "oct", "kid": "h", "k": "c2VjcmV0"}, "symmetric", id="oct"
        ),
        pytest.param(lambda f, w: jwk_of(f, use="enc"), "use is 'enc', not 'sig'", id="use-enc"),
        pytest.param(lambda f, w: jwk_of(f, key_ops=["sign"]), "key_ops", id="key-ops"),
        pytest.param(lambda f, w: jwk_of(w), "RSA key of 1024 bits", id="weak"),
        pytest.param(lambda f, w: jwk_of(f, kty="XYZ"), "unsupported kty 'XYZ'", id="kty"),
        pytest.param(lambda f, w: jwk_of(f, kid=""), "missing or invalid kid", id="kid"),
    ],
)
def test_drop_note_tells_the_operator_why(rsa_key, foreign_key, weak_key, build, note):
    # The notes end up in the keys_fetched log line: the operator's only clue.
    _, dropped = parse_key_set(body(keys=[jwk_of(rsa_key), build(foreign_key, weak_key)]))
    assert len(dropped) == 1
    assert note in dropped[0]


DROPPED_CERTS: list = [
    pytest.param(lambda f, w: cert_of(w), id="weak-key-cert"),
    pytest.param(
        lambda f, w: {"kid": "c", "cert": "-----BEGIN CERTIFICATE-----\nAAAA\n"}, id="garbage"
    ),
    pytest.param(lambda f, w: {"kid": "c"}, id="cert-missing"),
    pytest.param(lambda f, w: {"kid": "c", "cert": 5}, id="cert-number"),
    pytest.param(
        lambda f, w: {k: v for k, v in cert_of(f).items() if k != "kid"}, id="kid-missing"
    ),
    pytest.param(lambda f, w: cert_of(f, kid=""), id="kid-empty"),
    pytest.param(lambda f, w: {"kid": "c", "cert": "é"}, id="cert-non-ascii"),
    pytest.param(lambda f, w: "cert", id="not-an-object"),
]


@pytest.mark.parametrize("build", DROPPED_CERTS)
def test_unusable_public_cert_is_dropped_and_the_rest_kept(rsa_key, foreign_key, weak_key, build):
    keys, dropped = parse_key_set(
        body(keys=[jwk_of(rsa_key)], public_certs=[build(foreign_key, weak_key)]),
    )
    assert list(keys) == [kid_of(rsa_key)]
    assert len(dropped) == 1
    assert dropped[0].startswith("public_certs[0]: ")


@pytest.mark.parametrize(
    ("build", "alg"),
    [
        pytest.param(lambda k: jwk_of(k, key_ops=["verify"]), "RS256", id="key-ops-verify"),
        pytest.param(lambda k: jwk_of(k, key_ops=["sign", "verify"]), "RS256", id="key-ops-both"),
        pytest.param(
            lambda k: {m: v for m, v in jwk_of(k).items() if m != "use"},
            "RS256",
            id="no-use",
        ),
        pytest.param(
            lambda k: {m: v for m, v in jwk_of(k).items() if m != "alg"},
            None,
            id="no-alg",
        ),
        pytest.param(lambda k: jwk_of(k, alg="PS256"), "PS256", id="alg-restricts"),
        pytest.param(lambda k: jwk_of(k, x5t="ignored", extra=1), "RS256", id="extra-members"),
    ],
)
def test_acceptable_jwk_variants(rsa_key, build, alg):
    keys, dropped = parse_key_set(body(keys=[build(rsa_key)]))
    assert dropped == []
    assert keys[kid_of(rsa_key)].alg == alg
    assert keys[kid_of(rsa_key)].fingerprint == fingerprint(rsa_key)


@pytest.mark.parametrize(
    ("jwk", "key_type"),
    [
        pytest.param(_ec_jwk(), ec.EllipticCurvePublicKey, id="ec-p256"),
        pytest.param(_ed_jwk(), ed25519.Ed25519PublicKey, id="ed25519"),
    ],
)
def test_non_rsa_signature_keys_are_kept(jwk, key_type):
    keys, dropped = parse_key_set(body(keys=[jwk]))
    assert dropped == []
    assert isinstance(keys[str(jwk["kid"])].key, key_type)


def test_public_certs_alone_are_enough(rsa_key):
    keys, _ = parse_key_set(body(public_certs=[cert_of(rsa_key)]))
    assert keys[kid_of(rsa_key)].fingerprint == fingerprint(rsa_key)
    assert keys[kid_of(rsa_key)].alg is None


@pytest.mark.parametrize("same_material", [True, False], ids=["same-key", "different-key"])
def test_kid_listed_twice_in_keys_is_dropped_entirely(rsa_key, foreign_key, same_material):
    twin = jwk_of(rsa_key) if same_material else jwk_of(foreign_key, kid=kid_of(rsa_key))
    keys, dropped = parse_key_set(body(keys=[jwk_of(rsa_key), twin, jwk_of(foreign_key)]))
    assert list(keys) == [kid_of(foreign_key)]
    assert any("listed more than once" in d for d in dropped)


def test_kid_listed_twice_in_public_certs_is_dropped_entirely(rsa_key, foreign_key):
    certs = [cert_of(rsa_key), cert_of(foreign_key, kid=kid_of(rsa_key)), cert_of(foreign_key)]
    keys, _ = parse_key_set(body(public_certs=certs))
    assert list(keys) == [kid_of(foreign_key)]


def test_same_kid_in_keys_and_public_certs_with_same_material_is_kept(rsa_key):
    keys, dropped = parse_key_set(body(keys=[jwk_of(rsa_key)], public_certs=[cert_of(rsa_key)]))
    assert list(keys) == [kid_of(rsa_key)]
    assert keys[kid_of(rsa_key)].alg == "RS256"
    assert dropped == []


def test_same_kid_in_keys_and_public_certs_with_different_material_is_dropped(rsa_key, foreign_key):
    doc = body(
        keys=[jwk_of(rsa_key), jwk_of(foreign_key)],
        public_certs=[cert_of(foreign_key, kid=kid_of(rsa_key))],
    )
    keys, dropped = parse_key_set(doc)
    assert list(keys) == [kid_of(foreign_key)]
    assert any("listed more than once" in d for d in dropped)


def test_public_cert_singular_is_not_used(rsa_key):
    with pytest.raises(FetchError):
        parse_key_set(body(public_cert=cert_of(rsa_key)))
    # ...and it adds nothing to a set that has other keys.
    keys, _ = parse_key_set(body(keys=[jwk_of(rsa_key)], public_cert=cert_of(rsa_key, kid="x")))
    assert list(keys) == [kid_of(rsa_key)]


def _truncated(rsa_key: rsa.RSAPrivateKey) -> bytes:
    full = json.dumps(key_set([rsa_key])).encode()
    return full[: len(full) // 2]


NOT_A_KEY_SET: list = [
    pytest.param(lambda k: b"", id="empty-body"),
    pytest.param(lambda k: b"[]", id="array"),
    pytest.param(lambda k: b'"keys"', id="string"),
    pytest.param(lambda k: b"42", id="number"),
    pytest.param(lambda k: b"null", id="null"),
    pytest.param(lambda k: b"{}", id="empty-object"),
    pytest.param(lambda k: b'{"keys": []}', id="empty-keys"),
    pytest.param(lambda k: b'{"keys": [], "public_certs": []}', id="empty-keys-and-certs"),
    pytest.param(lambda k: b'{"keys": {}}', id="keys-object"),
    pytest.param(lambda k: b'{"keys": "x"}', id="keys-string"),
    pytest.param(lambda k: body(keys=[jwk_of(k, use="enc")]), id="only-unusable-keys"),
    pytest.param(lambda k: body(keys=[jwk_of(k), jwk_of(k)]), id="only-a-duplicate"),
    pytest.param(
        lambda k: b"<!DOCTYPE html><html><body>Cloudflare Access login</body></html>",
        id="html",
    ),
    pytest.param(lambda k: b"<?xml version='1.0'?><keys/>", id="xml"),
    pytest.param(_truncated, id="truncated-json"),
    pytest.param(lambda k: b"\xff\xfe\x00garbage", id="binary"),
    pytest.param(lambda k: b"[" * 100_000 + b"]" * 100_000, id="nested-100000"),
    pytest.param(lambda k: b'{"keys": [], "x": ' + b"9" * 5000 + b"}", id="huge-integer"),
    pytest.param(lambda k: b'{"keys": [NaN]}', id="nan"),
]


@pytest.mark.parametrize("build", NOT_A_KEY_SET)
def test_document_that_is_not_a_usable_key_set_is_a_fetch_error(rsa_key, build):
    with pytest.raises(FetchError):
        parse_key_set(build(rsa_key))


# ---------------------------------------------------------------------------------------------
# IssuerKeys: lookups, refetch on unknown kid, rotation


async def test_known_kid_is_served_from_memory_without_fetching(loaded, source, rsa_key, kid):
    for _ in range(100):
        key = await loaded.key_for(kid)
    assert key.kid == kid
    assert key.fingerprint == fingerprint(rsa_key)
    assert source.calls == 1
    assert loaded.kids() == [kid]


async def test_unknown_kid_triggers_exactly_one_refetch(loaded, source):
    with capture_logs() as logs, pytest.raises(Denied) as ex:
        await loaded.key_for("not-a-real-kid")
    assert ex.value.reason is Reason.UNKNOWN_KID
    assert source.calls == 2
    refetches = [e for e in logs if e["event"] == "keys_refetch"]
    assert refetches == [
        {"event": "keys_refetch", "issuer": "team", "trigger": "unknown_kid", "log_level": "info"},
    ]


async def test_new_key_is_accepted_after_one_refetch(loaded, source, rsa_key, foreign_key):
    source.serve(rsa_key, foreign_key)
    key = await loaded.key_for(kid_of(foreign_key))
    assert key.fingerprint == fingerprint(foreign_key)
    assert source.calls == 2


async def test_concurrent_requests_for_a_new_kid_share_one_fetch(gated, rsa_key, foreign_key, kid):
    keys, src = gated
    src.serve(rsa_key, foreign_key)  # the new key is published; the fetch is held open
    new_kid = kid_of(foreign_key)
    waiting = [asyncio.create_task(keys.key_for(new_kid)) for _ in range(100)]
    await src.entered.wait()
    assert src.calls == 2
    # Requests with a known kid never wait for the fetch in flight.
    async with asyncio.timeout(1):
        assert (await keys.key_for(kid)).kid == kid
    assert not any(t.done() for t in waiting)
    src.gate.set()
    found = await asyncio.gather(*waiting)
    assert {k.kid for k in found} == {new_kid}
    assert src.calls == 2


async def test_concurrent_flood_of_random_kids_costs_one_fetch(gated, kid):
    keys, src = gated
    flood = [asyncio.create_task(keys.key_for(f"random-{i}")) for i in range(100)]
    await src.entered.wait()
    src.gate.set()
    results = await asyncio.gather(*flood, return_exceptions=True)
    assert all(isinstance(r, Denied) and r.reason is Reason.UNKNOWN_KID for r in results)
    assert src.calls == 2
    assert (await keys.key_for(kid)).kid == kid


async def test_unknown_kid_wait_is_bounded_when_the_fetch_hangs(gated, monkeypatch):
    # nginx answers 500 when authd is slower than its proxy_read_timeout: the wait is capped.
    assert UNKNOWN_KID_WAIT_SECONDS < 5
    monkeypatch.setattr(authd.keys, "UNKNOWN_KID_WAIT_SECONDS", 0.05)
    keys, src = gated
    with pytest.raises(Denied) as ex:
        await keys.key_for("new-kid")
    assert ex.value.reason is Reason.UNKNOWN_KID
    assert src.calls == 2
    src.gate.set()  # let the held fetch finish; it still updates the set
    assert await keys.refresh()


async def test_within_cooldown_unknown_kids_are_denied_at_once(loaded, source, clock):
    with pytest.raises(Denied):
        await loaded.key_for("first-unknown")
    assert source.calls == 2
    source.gate = asyncio.Event()  # a fetch now would hang: the answer must not need one
    clock.advance(COOLDOWN - 1)
    for i in range(50):
        with pytest.raises(Denied) as ex:
            async with asyncio.timeout(1):
                await loaded.key_for(f"unknown-{i}")
        assert ex.value.reason is Reason.UNKNOWN_KID
    assert source.calls == 2


async def test_after_the_cooldown_one_more_refetch(loaded, source, clock):
    with pytest.raises(Denied):
        await loaded.key_for("a")
    clock.advance(COOLDOWN)
    for name in ("b", "c", "d"):
        with pytest.raises(Denied):
            await loaded.key_for(name)
    assert source.calls == 3


async def test_cooldown_is_configurable(source, clock):
    keys = IssuerKeys(issuer_config(refetch_cooldown_seconds=5), source, clock)
    await keys.refresh()
    with pytest.raises(Denied):
        await keys.key_for("a")
    clock.advance(4.9)
    with pytest.raises(Denied):
        await keys.key_for("b")
    assert source.calls == 2
    clock.advance(0.1)
    with pytest.raises(Denied):
        await keys.key_for("c")
    assert source.calls == 3


async def test_wall_clock_jump_does_not_restart_the_cooldown(loaded, source, clock):
    with pytest.raises(Denied):
        await loaded.key_for("a")
    clock.now += 10 * COOLDOWN  # NTP step: the cooldown runs on the monotonic clock
    with pytest.raises(Denied):
        await loaded.key_for("b")
    assert source.calls == 2


async def test_rotation_new_kid_in_then_old_kid_out(loaded, source, rsa_key, foreign_key, kid):
    assert loaded.generation == 1
    source.serve(rsa_key, foreign_key)  # rotation starts: the new key is published
    assert (await loaded.key_for(kid_of(foreign_key))).kid == kid_of(foreign_key)
    assert loaded.generation == 2
    assert (await loaded.key_for(kid)).kid == kid  # the old key still works for 7 days
    source.serve(foreign_key)  # the old key is retired
    assert await loaded.refresh()
    assert loaded.generation == 3
    assert loaded.kids() == [kid_of(foreign_key)]
    with pytest.raises(Denied) as ex:
        await loaded.key_for(kid)
    assert ex.value.reason is Reason.UNKNOWN_KID


async def test_identical_refetch_does_not_bump_generation(loaded, source):
    with capture_logs() as logs:
        assert await loaded.refresh()
        assert await loaded.refresh()
    assert loaded.generation == 1
    assert [e["changed"] for e in logs if e["event"] == "keys_fetched"] == [False, False]
    assert source.calls == 3


async def test_reordered_key_set_is_not_a_change(loaded, source, rsa_key, foreign_key):
    source.serve(rsa_key, foreign_key)
    await loaded.refresh()
    generation = loaded.generation
    source.serve(foreign_key, rsa_key)
    await loaded.refresh()
    assert loaded.generation == generation


# ---------------------------------------------------------------------------------------------
# Failures: the last good set is kept, for a bounded time, on the monotonic clock


async def test_failed_fetch_keeps_the_last_good_set(loaded, source, kid):
    source.error = "HTTP 503"
    assert not await loaded.refresh()
    assert loaded.usable()
    assert (await loaded.key_for(kid)).kid == kid
    assert loaded.fetches == {"ok": 1, "error": 1}
    assert loaded.last_error == "HTTP 503"


async def test_last_good_set_expires_after_refresh_plus_max_stale(
    loaded, source, clock, rsa_key, kid
):
    source.error = "connection refused"
    clock.advance(REFRESH + MAX_STALE)
    assert not await loaded.refresh()
    assert loaded.usable()
    assert (await loaded.key_for(kid)).kid == kid
    clock.advance(1)
    assert not loaded.usable()
    with pytest.raises(KeysUnavailable) as ex:
        await loaded.key_for(kid)
    assert ex.value.reason is Reason.KEYS_UNAVAILABLE
    assert "connection refused" in ex.value.detail
    # The endpoint comes back: the store recovers by itself.
    source.serve(rsa_key)
    assert await loaded.refresh()
    assert (await loaded.key_for(kid)).kid == kid


async def test_staleness_is_measured_on_the_monotonic_clock(loaded, source, clock, kid):
    source.error = "down"
    clock.now += 10 * MAX_STALE  # the wall clock jumps; the monotonic clock does not
    assert loaded.usable()
    assert (await loaded.key_for(kid)).kid == kid
    clock.mono += REFRESH + MAX_STALE + 1
    assert not loaded.usable()


async def test_stale_window_follows_the_configuration(source, clock):
    keys = IssuerKeys(issuer_config(refresh_seconds=100, max_stale_seconds=50), source, clock)
    assert await keys.refresh()
    clock.advance(150)
    assert keys.usable()
    clock.advance(1)
    assert not keys.usable()


async def test_cold_start_failure_is_not_usable_then_recovers(issuer_keys, source, rsa_key, kid):
    store = KeyStore([issuer_keys])
    source.error = "timed out after 10s"
    assert not await issuer_keys.refresh()
    assert not issuer_keys.usable()
    assert not store.ready()
    assert issuer_keys.age() is None
    with pytest.raises(KeysUnavailable) as ex:
        await issuer_keys.key_for(kid)
    assert "no key set fetched yet" in ex.value.detail
    assert "timed out" in ex.value.detail
    assert source.calls == 1  # an unusable store does not refetch per request
    source.serve(rsa_key)
    assert await issuer_keys.refresh()
    assert issuer_keys.usable()
    assert store.ready()
    assert (await issuer_keys.key_for(kid)).kid == kid
    assert issuer_keys.last_error is None


async def test_bug_in_the_source_is_logged_and_counted_never_raised(clock, kid, rsa_key):
    good = FakeSource()
    good.serve(rsa_key)
    keys = IssuerKeys(issuer_config(), good, clock)
    assert await keys.refresh()
    keys.source = BuggySource()
    with capture_logs() as logs:
        assert not await keys.refresh()
    assert keys.fetches == {"ok": 1, "error": 1}
    assert keys.last_error == "bug: RuntimeError('boom')"
    assert keys.usable()
    assert (await keys.key_for(kid)).kid == kid
    (event,) = [e for e in logs if e["event"] == "keys_fetch_failed"]
    assert event["exc_info"] is True
    assert event["issuer"] == "team"
    assert event["error"].startswith("bug: RuntimeError")


async def test_bug_in_the_source_at_cold_start_means_not_ready(clock, kid):
    keys = IssuerKeys(issuer_config(), BuggySource(), clock)
    assert not await keys.refresh()
    with pytest.raises(KeysUnavailable):
        await keys.key_for(kid)


async def test_fetch_failure_log_names_issuer_and_error_but_never_the_body(loaded, source):
    source.body = b"<html><body>SECRET-SESSION-abc123 please log in</body></html>"
    with capture_logs() as logs:
        assert not await loaded.refresh()
    (event,) = [e for e in logs if e["event"] == "keys_fetch_failed"]
    assert event["log_level"] == "warning"
    assert event["issuer"] == "team"
    assert event["source"] == f"{ISSUER}/cdn-cgi/access/certs"
    assert event["error"].startswith("not JSON")
    assert event["failures"] == 1
    assert event["keys_usable"] is True
    assert event["exc_info"] is False
    assert "SECRET-SESSION" not in repr(logs)


async def test_fetch_success_log_lists_kids_and_dropped_keys(issuer_keys, source, rsa_key):
    source.body = body(keys=[jwk_of(rsa_key), jwk_of(rsa_key, kid="enc-key", use="enc")])
    with capture_logs() as logs:
        assert await issuer_keys.refresh()
    (event,) = [e for e in logs if e["event"] == "keys_fetched"]
    assert event["kids"] == [kid_of(rsa_key)[:16] + "..."]
    assert event["dropped"] == ["keys[1]: use is 'enc', not 'sig'"]
    assert event["changed"] is True


async def test_unhashable_kty_drops_one_key_not_the_whole_set(issuer_keys, source, rsa_key, kid):
    # One odd entry must not turn a good key set into a failed fetch (and a cold start into 503).
    source.body = body(keys=[jwk_of(rsa_key), {"kid": "odd", "kty": ["RSA"]}])
    assert await issuer_keys.refresh()
    assert (await issuer_keys.key_for(kid)).kid == kid


# ---------------------------------------------------------------------------------------------
# Refresh schedule: Cache-Control max-age within bounds, backoff on failure


@pytest.mark.parametrize(
    ("max_age", "interval"),
    [
        pytest.param(None, REFRESH, id="no-max-age"),
        pytest.param(120, 120, id="shorter"),
        pytest.param(MIN_REFRESH_SECONDS, MIN_REFRESH_SECONDS, id="at-floor"),
        pytest.param(10, MIN_REFRESH_SECONDS, id="below-floor"),
        pytest.param(0, MIN_REFRESH_SECONDS, id="zero"),
        pytest.param(REFRESH - 1, REFRESH - 1, id="just-below-refresh"),
        pytest.param(REFRESH * 2, REFRESH, id="longer-than-refresh"),
        pytest.param(10**9, REFRESH, id="huge"),
    ],
)
async def test_max_age_sets_the_next_refresh_and_the_usable_window(
    issuer_keys, source, clock, max_age, interval
):
    source.max_age = max_age
    with capture_logs() as logs:
        assert await issuer_keys.refresh()
    assert [e["next_refresh_s"] for e in logs if e["event"] == "keys_fetched"] == [interval]
    source.error = "down"
    clock.advance(interval + MAX_STALE)
    assert issuer_keys.usable()
    clock.advance(1)
    assert not issuer_keys.usable()


class _StopLoop(Exception):  # noqa: N818 -- a control-flow signal for the fake sleep
    pass


def _fake_asyncio(delays: list[float], stop_after: int, between: Callable[[int], None]):
    """``asyncio`` as authd.keys sees it, with a sleep that records and returns at once."""

    async def sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) >= stop_after:
            raise _StopLoop
        between(len(delays))

    return types.SimpleNamespace(**{**vars(asyncio), "sleep": sleep})


async def test_run_schedules_refreshes_from_max_age(loaded, source, monkeypatch):
    delays: list[float] = []

    def between(n: int) -> None:
        source.max_age = {1: 120, 2: 5}.get(n)

    monkeypatch.setattr(authd.keys, "asyncio", _fake_asyncio(delays, 4, between))
    with pytest.raises(_StopLoop):
        await loaded.run()
    assert delays == [REFRESH, 120, MIN_REFRESH_SECONDS, REFRESH]
    assert source.calls == 4


async def test_run_backs_off_on_failure_and_resets_after_success(loaded, source, monkeypatch):
    delays: list[float] = []

    def between(n: int) -> None:
        source.error = "down" if n < 8 else None

    monkeypatch.setattr(authd.keys, "asyncio", _fake_asyncio(delays, 9, between))
    with pytest.raises(_StopLoop):
        await loaded.run()
    assert delays == [REFRESH, *RETRY_BACKOFF_SECONDS, RETRY_BACKOFF_SECONDS[-1], REFRESH]


async def test_backoff_never_exceeds_the_refresh_interval(source, clock, monkeypatch):
    keys = IssuerKeys(issuer_config(refresh_seconds=4), source, clock)
    source.error = "down"
    await keys.refresh()
    delays: list[float] = []
    monkeypatch.setattr(authd.keys, "asyncio", _fake_asyncio(delays, 5, lambda n: None))
    with pytest.raises(_StopLoop):
        await keys.run()
    assert delays == [1.0, 2.0, 4, 4, 4]


async def test_key_store_start_does_not_fail_on_a_cold_start_failure(clock, rsa_key):
    up, down = FakeSource(), FakeSource(error="HTTP 500")
    up.serve(rsa_key)
    other = "https://other.cloudflareaccess.com"
    store = KeyStore(
        [
            IssuerKeys(issuer_config(), up, clock),
            IssuerKeys(issuer_config(name="other", issuer=other), down, clock),
        ],
    )
    await store.start()
    try:
        assert store.get("team").usable()  # type: ignore[union-attr]
        assert not store.get("other").usable()  # type: ignore[union-attr]
        assert not store.ready()
        assert store.get("unknown") is None
        assert store.get(ISSUER) is None  # by issuer name, not by iss
    finally:
        await store.stop()
    assert (up.calls, down.calls) == (1, 1)


# ---------------------------------------------------------------------------------------------
# HttpSource against a real server on 127.0.0.1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # a response without Content-Length ends when the server closes
    server: _KeyServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requested.append(self.path)
        route = self.server.routes.get(self.path)
        try:
            if route is None:
                self.send_error(404)
            else:
                route(self)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up, as it should on an oversized body


class _KeyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Callable[[_Handler], None]] = {}
        self.requested: list[str] = []
        self.release = threading.Event()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


def respond(
    status: int,
    content: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    length: bool = True,
) -> Callable[[_Handler], None]:
    def handle(h: _Handler) -> None:
        h.send_response(status)
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        if length:
            h.send_header("Content-Length", str(len(content)))
        h.end_headers()
        h.wfile.write(content)

    return handle


@pytest.fixture(scope="module")
def _running_key_server() -> Iterator[_KeyServer]:
    server = _KeyServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def key_server(_running_key_server, monkeypatch) -> _KeyServer:
    """The module's loopback server with no routes and an empty request log."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)  # loopback only, never through a proxy
    _running_key_server.routes.clear()
    _running_key_server.requested.clear()
    _running_key_server.release.clear()
    return _running_key_server


@pytest.fixture
async def client():
    c = make_http_client()
    yield c
    await c.aclose()


async def fetch(server: _KeyServer, client, path: str, limit: float = 5) -> Fetched:
    return await HttpSource(client, server.url(path), limit).fetch()


@pytest.fixture(scope="module")
def certs_body(rsa_key) -> bytes:
    return json.dumps(key_set([rsa_key])).encode()


async def test_http_200_is_parsed(key_server, client, certs_body, rsa_key):
    key_server.routes["/certs"] = respond(200, certs_body, {"Content-Type": "application/json"})
    fetched = await fetch(key_server, client, "/certs")
    assert fetched.body == certs_body
    assert fetched.max_age is None
    keys, _ = parse_key_set(fetched.body)
    assert list(keys) == [kid_of(rsa_key)]


async def test_http_client_identifies_itself_and_asks_for_json(key_server, client, certs_body):
    seen: dict[str, str] = {}

    def handle(h: _Handler) -> None:
        seen.update({k.lower(): v for k, v in h.headers.items()})
        respond(200, certs_body)(h)

    key_server.routes["/certs"] = handle
    await fetch(key_server, client, "/certs")
    assert seen["user-agent"].startswith("authd/")
    assert seen["accept"] == "application/json"


@pytest.mark.parametrize(
    ("cache_control", "max_age"),
    [
        ("public, max-age=120", 120.0),
        ("max-age=3600", 3600.0),
        ("MAX-AGE=60, must-revalidate", 60.0),
        ('max-age="300"', 300.0),
        ("no-cache", None),
        ("s-maxage=10", None),
        ("max-age=abc", None),
        ("", None),
    ],
)
async def test_http_cache_control_max_age_is_parsed(
    key_server, client, certs_body, cache_control, max_age
):
    key_server.routes["/certs"] = respond(200, certs_body, {"Cache-Control": cache_control})
    assert (await fetch(key_server, client, "/certs")).max_age == max_age


@pytest.mark.parametrize("status", [500, 502, 503, 404, 401, 204, 304])
async def test_http_non_200_is_a_fetch_error(key_server, client, certs_body, status):
    content = b"" if status in {204, 304} else certs_body
    key_server.routes["/certs"] = respond(status, content)
    with pytest.raises(FetchError, match=f"HTTP {status}"):
        await fetch(key_server, client, "/certs")


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_http_redirect_is_refused_and_not_followed(key_server, client, certs_body, status):
    key_server.routes["/certs"] = respond(status, b"", {"Location": "/elsewhere"})
    key_server.routes["/elsewhere"] = respond(200, certs_body)
    with pytest.raises(FetchError, match="redirect") as ex:
        await fetch(key_server, client, "/certs")
    assert "/elsewhere" in str(ex.value)
    assert key_server.requested == ["/certs"]


async def test_http_body_over_the_cap_with_content_length(key_server, client):
    declared = {"Content-Length": str(MAX_BODY_BYTES + 1)}
    key_server.routes["/big"] = respond(200, b"{" * 1024, declared, length=False)
    with pytest.raises(FetchError, match="cap"):
        await fetch(key_server, client, "/big")


async def test_http_body_over_the_cap_without_content_length(key_server, client):
    key_server.routes["/big"] = respond(200, b" " * (MAX_BODY_BYTES + 1), length=False)
    with pytest.raises(FetchError, match="cap"):
        await fetch(key_server, client, "/big")


async def test_http_10_mb_body_is_refused(key_server, client):
    key_server.routes["/big"] = respond(200, b"[" * (10 * MAX_BODY_BYTES), length=False)
    with pytest.raises(FetchError, match="cap"):
        await fetch(key_server, client, "/big")


async def test_http_body_of_exactly_the_cap_is_accepted(key_server, client, certs_body, rsa_key):
    exact = certs_body + b" " * (MAX_BODY_BYTES - len(certs_body))
    key_server.routes["/exact"] = respond(200, exact, length=False)
    fetched = await fetch(key_server, client, "/exact")
    assert len(fetched.body) == MAX_BODY_BYTES
    assert list(parse_key_set(fetched.body)[0]) == [kid_of(rsa_key)]


async def test_http_slow_server_times_out(key_server, client, certs_body):
    def stall(h: _Handler) -> None:
        key_server.release.wait(timeout=10)  # released by the fixture's teardown
        respond(200, certs_body)(h)

    key_server.routes["/slow"] = stall
    try:
        with pytest.raises(FetchError, match=r"timed out after 0\.3s"):
            await fetch(key_server, client, "/slow", limit=0.3)
    finally:
        key_server.release.set()


async def test_http_connection_refused(client):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: the kernel refuses connections
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/certs"
        with pytest.raises(FetchError):
            await HttpSource(client, url, 5).fetch()


async def test_http_gzip_encoded_response_is_decoded(key_server, client, certs_body, rsa_key):
    # httpx offers "Accept-Encoding: gzip"; a server that takes it up (Cloudflare compresses
    # JSON) must still yield the key set, not the compressed bytes.
    def handle(h: _Handler) -> None:
        if "gzip" in h.headers.get("Accept-Encoding", ""):
            respond(200, gzip.compress(certs_body), {"Content-Encoding": "gzip"})(h)
        else:
            respond(200, certs_body)(h)

    key_server.routes["/certs"] = handle
    fetched = await fetch(key_server, client, "/certs")
    assert list(parse_key_set(fetched.body)[0]) == [kid_of(rsa_key)]


async def test_http_failures_keep_the_last_good_set(key_server, client, certs_body, clock, kid):
    key_server.routes["/certs"] = respond(200, certs_body)
    src = HttpSource(client, key_server.url("/certs"), 5)
    keys = IssuerKeys(issuer_config(), src, clock)
    assert await keys.refresh()
    for broken in (
        respond(500, b"oops"),
        respond(302, b"", {"Location": "/login"}),
        respond(200, b"<html>login</html>"),
        respond(200, b"{}"),
        respond(200, certs_body[:100]),
    ):
        key_server.routes["/certs"] = broken
        assert not await keys.refresh()
        assert (await keys.key_for(kid)).kid == kid
    assert keys.fetches == {"ok": 1, "error": 5}


# ---------------------------------------------------------------------------------------------
# FileSource


async def test_file_source_reads_the_file(tmp_path: Path, certs_body):
    path = tmp_path / "jwks.json"
    path.write_bytes(certs_body)
    assert (await FileSource(path).fetch()).body == certs_body


async def test_file_source_missing_file_is_a_fetch_error(tmp_path: Path):
    with pytest.raises(FetchError, match="cannot read"):
        await FileSource(tmp_path / "absent.json").fetch()


async def test_file_source_directory_is_a_fetch_error(tmp_path: Path):
    with pytest.raises(FetchError):
        await FileSource(tmp_path).fetch()


async def test_file_source_over_the_cap_is_a_fetch_error(tmp_path: Path):
    path = tmp_path / "big.json"
    path.write_bytes(b" " * (MAX_BODY_BYTES + 1))
    with pytest.raises(FetchError, match="cap"):
        await FileSource(path).fetch()


async def test_file_source_rotation_is_picked_up_on_refresh(tmp_path, clock, rsa_key, foreign_key):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(key_set([rsa_key])))
    keys = IssuerKeys(issuer_config(jwks_url=None, jwks_file=path), FileSource(path), clock)
    assert await keys.refresh()
    path.write_text(json.dumps(key_set([foreign_key])))
    assert await keys.refresh()
    assert keys.kids() == [kid_of(foreign_key)]
    path.unlink()
    assert not await keys.refresh()
    assert keys.kids() == [kid_of(foreign_key)]


# ---------------------------------------------------------------------------------------------
# KeyStore.from_config: the configured source, file or URL, is what gets read


async def test_key_store_from_config_reads_urls_and_files(
    tmp_path, key_server, client, certs_body, *, clock, kid
):
    key_server.routes["/certs"] = respond(200, certs_body)
    path = tmp_path / "jwks.json"
    path.write_bytes(certs_body)
    by_url = issuer_config(jwks_url=key_server.url("/certs"))
    by_file = issuer_config(name="f", issuer="https://f.example", jwks_url=None, jwks_file=path)
    store = KeyStore.from_config((by_url, by_file), client, clock)
    await store.start()
    try:
        assert store.ready()
        for name in ("team", "f"):
            assert (await store.get(name).key_for(kid)).kid == kid  # type: ignore[union-attr]
    finally:
        await store.stop()
    assert key_server.requested == ["/certs"]
