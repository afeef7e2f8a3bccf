# ruff: noqa: ARG005 -- table rows share one builder signature; not every row needs its argument
"""authd.keys per provider: OpenID discovery (DiscoverySource), AWS ALB's per-kid PEM keys
(AlbKeys), and KeyStore.from_config choosing between them, keyed by issuer name.

Every fetch goes to a real HTTP server on 127.0.0.1 started for this module; the clock that
ages cooldowns and rate limits is the shared FakeClock.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from structlog.testing import capture_logs

import authd.keys
from authd.config import TokenSource
from authd.dev import key_set, thumbprint
from authd.errors import Denied, FetchError, KeysUnavailable, Reason
from authd.fetch import make_http_client
from authd.keys import (
    ALB_KID,
    ALB_MAX_CLIENTS,
    ALB_MAX_KEYS,
    ALB_MAX_NEW_KIDS,
    ALB_MAX_NEW_KIDS_IN_ALL,
    MAX_DISCOVERY_BYTES,
    MAX_PEM_BYTES,
    UNKNOWN_KID_WAIT_SECONDS,
    AlbKeys,
    AlbSource,
    DiscoverySource,
    HttpSource,
    IssuerKeys,
    KeyStore,
    discovered_jwks_uri,
    parse_alb_key,
)
from tests.conftest import ISSUER, issuer_config

OIDC_ISSUER = "https://idp.example.com/realms/staff"
ALB_KID_1 = "5a1b7c3e-0d2f-4e8a-9b6c-1f2e3d4c5b6a"  # AWS's kids are UUIDs
COOLDOWN = 60.0


# ---------------------------------------------------------------------------------------------
# A loopback HTTP server: routes by exact path, a default for the rest, a request log, and a
# gate a handler can hold a request at.


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requested.append(self.path)
        route = self.server.routes.get(self.path, self.server.default)
        # The client may hang up, as it should on an oversized body.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            route(self)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.routes: dict[str, Callable[[_Handler], None]] = {}
        self.default: Callable[[_Handler], None] = respond(404)
        self.requested: list[str] = []
        self.entered = threading.Event()  # a held request has arrived
        self.release = threading.Event()  # let held requests go

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def reset(self) -> None:
        self.routes.clear()
        self.default = respond(404)
        self.requested.clear()
        self.entered.clear()
        self.release.clear()


def respond(
    status: int,
    content: bytes = b"",
    headers: dict[str, str] | None = None,
) -> Callable[[_Handler], None]:
    def handle(h: _Handler) -> None:
        h.send_response(status)
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.send_header("Content-Length", str(len(content)))
        h.end_headers()
        h.wfile.write(content)

    return handle


def held(then: Callable[[_Handler], None], seconds: float = 10) -> Callable[[_Handler], None]:
    """A handler that waits for ``server.release`` (at most ``seconds``), then answers."""

    def handle(h: _Handler) -> None:
        h.server.entered.set()
        h.server.release.wait(timeout=seconds)
        then(h)

    return handle


@pytest.fixture(scope="module")
def _running_server() -> Iterator[_Server]:
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def server(_running_server, monkeypatch) -> Iterator[_Server]:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)  # loopback only, never through a proxy
    _running_server.reset()
    yield _running_server
    _running_server.release.set()  # no handler stays held past its test


@pytest.fixture
async def client(server):  # noqa: ARG001 -- after `server`, which clears the proxy variables
    c = make_http_client()
    yield c
    await c.aclose()


async def entered(server: _Server) -> None:
    assert await asyncio.to_thread(server.entered.wait, 5)


# ---------------------------------------------------------------------------------------------
# OpenID discovery


@pytest.fixture(scope="module")
def jwks_body(rsa_key) -> bytes:
    return json.dumps({"keys": key_set([rsa_key])["keys"]}).encode()


def discovery_doc(server: _Server, **overrides: object) -> bytes:
    """A discovery document in the shape real providers serve (Keycloak's members, trimmed)."""
    doc: dict[str, object] = {
        "issuer": OIDC_ISSUER,
        "authorization_endpoint": f"{OIDC_ISSUER}/protocol/openid-connect/auth",
        "token_endpoint": f"{OIDC_ISSUER}/protocol/openid-connect/token",
        "jwks_uri": server.url("/jwks"),
        "response_types_supported": ["code", "id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
    }
    return json.dumps({k: v for k, v in (doc | overrides).items() if v is not _ABSENT}).encode()


_ABSENT = object()
DISCOVERY_PATH = "/realms/staff/.well-known/openid-configuration"


def oidc_config(server: _Server, **overrides: object):
    values: dict[str, object] = {
        "name": "idp",
        "provider": "oidc",
        "issuer": OIDC_ISSUER,
        "jwks_url": None,
        "discovery_url": server.url(DISCOVERY_PATH),
        "token_sources": (),
        "algorithms": ("RS256",),
    }
    return issuer_config(**(values | overrides))


def discovery(server: _Server, client, timeout: float = 5) -> DiscoverySource:
    return DiscoverySource(client, server.url(DISCOVERY_PATH), OIDC_ISSUER, timeout)


def serve_discovery(server: _Server, jwks_body: bytes, **overrides: object) -> None:
    server.routes[DISCOVERY_PATH] = respond(200, discovery_doc(server, **overrides))
    server.routes["/jwks"] = respond(200, jwks_body)


async def test_discovery_finds_the_key_set_through_jwks_uri(server, client, jwks_body, kid, clock):
    serve_discovery(server, jwks_body)
    keys = IssuerKeys(oidc_config(server), discovery(server, client), clock)
    assert await keys.refresh()
    assert (await keys.key_for(kid)).kid == kid
    assert server.requested == [DISCOVERY_PATH, "/jwks"]


async def test_discovery_max_age_is_the_key_sets_not_the_documents(server, client, jwks_body):
    server.routes[DISCOVERY_PATH] = respond(
        200,
        discovery_doc(server),
        {"Cache-Control": "max-age=86400"},
    )
    server.routes["/jwks"] = respond(200, jwks_body, {"Cache-Control": "public, max-age=300"})
    fetched = await discovery(server, client).fetch()
    assert fetched.body == jwks_body
    assert fetched.max_age == 300


async def test_every_refresh_runs_discovery_again(server, client, jwks_body, foreign_key, clock):
    serve_discovery(server, jwks_body)
    keys = IssuerKeys(oidc_config(server), discovery(server, client), clock)
    assert await keys.refresh()
    # The provider moves its key set; the next refresh follows the document there.
    server.routes[DISCOVERY_PATH] = respond(200, discovery_doc(server, jwks_uri=server.url("/v2")))
    server.routes["/v2"] = respond(200, json.dumps(key_set([foreign_key])).encode())
    assert await keys.refresh()
    assert server.requested == [DISCOVERY_PATH, "/jwks", DISCOVERY_PATH, "/v2"]
    assert keys.kids() == [thumbprint(foreign_key.public_key())]
    assert keys.generation == 2


@pytest.mark.parametrize(
    "issuer",
    [
        pytest.param(_ABSENT, id="missing"),
        pytest.param(None, id="null"),
        pytest.param(OIDC_ISSUER + "/", id="trailing-slash"),
        pytest.param(OIDC_ISSUER.upper(), id="upper-case"),
        pytest.param(OIDC_ISSUER.replace("https", "http"), id="http-scheme"),
        pytest.param(OIDC_ISSUER[:-1], id="prefix"),
        pytest.param(OIDC_ISSUER + "x", id="suffix"),
        pytest.param("https://idp.example.com/realms/other", id="other-realm"),
        pytest.param("https://evil.example", id="other-host"),
        pytest.param(f" {OIDC_ISSUER}", id="leading-space"),
        pytest.param(OIDC_ISSUER.replace("e", "\u0435"), id="cyrillic-homoglyph"),
        pytest.param([OIDC_ISSUER], id="list"),
        pytest.param({"value": OIDC_ISSUER}, id="object"),
        pytest.param(1, id="number"),
    ],
)
async def test_discovery_for_another_issuer_is_refused(server, client, jwks_body, issuer):
    # OpenID Connect Discovery 4.3: the document must name exactly the issuer it was asked
    # about, or one provider's document could hand authd another one's keys.
    serve_discovery(server, jwks_body, issuer=issuer)
    with pytest.raises(FetchError, match="discovery document is for issuer"):
        await discovery(server, client).fetch()
    assert server.requested == [DISCOVERY_PATH]  # the key set is never fetched


@pytest.mark.parametrize(
    ("jwks_uri", "match"),
    [
        pytest.param(_ABSENT, "no jwks_uri", id="missing"),
        pytest.param(None, "no jwks_uri", id="null"),
        pytest.param("", "no jwks_uri", id="empty"),
        pytest.param(["https://idp.example.com/jwks"], "no jwks_uri", id="list"),
        pytest.param(5, "no jwks_uri", id="number"),
        pytest.param("http://idp.example.com/jwks", "plain http", id="http-not-loopback"),
        pytest.param("http://10.0.0.1/jwks", "plain http", id="http-private-address"),
        pytest.param("http://169.254.169.254/latest/meta-data", "plain http", id="http-metadata"),
        pytest.param("file:///etc/passwd", "https", id="file"),
        pytest.param("ftp://idp.example.com/jwks", "https", id="ftp"),
        pytest.param("/jwks", "https", id="relative"),
        pytest.param("//idp.example.com/jwks", "https", id="scheme-relative"),
        pytest.param("https:///jwks", "https", id="no-host"),
        pytest.param("https://idp.example.com:99999/jwks", "not a URL", id="bad-port"),
        pytest.param("https://idp.example.com/jw\nks", "not a URL", id="newline"),
        pytest.param("https://idp.example.com/jw\tks", "not a URL", id="tab"),
        pytest.param("https://idp.example.com/j ks", "not a URL", id="space"),
        pytest.param("https://idp.example.com/jwks\x00", "not a URL", id="nul"),
        pytest.param("https://idp.ex\u00e4mple.com/jwks", "not a URL", id="non-ascii"),
    ],
)
async def test_discovery_jwks_uri_authd_must_not_fetch_is_refused(
    server, client, jwks_body, jwks_uri, match
):
    serve_discovery(server, jwks_body, jwks_uri=jwks_uri)
    with pytest.raises(FetchError, match=match):
        await discovery(server, client).fetch()
    assert server.requested == [DISCOVERY_PATH]


@pytest.mark.parametrize(
    ("discovery_url", "jwks_uri", "allowed"),
    [
        ("https://idp.example/.well-known/openid-configuration", "https://keys.example/j", True),
        ("https://idp.example/.well-known/openid-configuration", "http://127.0.0.1:8080/j", False),
        ("https://idp.example/.well-known/openid-configuration", "http://localhost/j", False),
        ("https://idp.example/.well-known/openid-configuration", "http://[::1]/j", False),
        ("http://127.0.0.1:9/.well-known/openid-configuration", "http://127.0.0.1:8080/j", True),
        ("http://127.0.0.1:9/.well-known/openid-configuration", "https://keys.example/j", True),
    ],
)
def test_an_https_document_cannot_point_at_plain_http_on_this_host(
    discovery_url, jwks_uri, allowed
):
    # A discovery document fetched over https, if it could say http://127.0.0.1:..., would
    # make authd GET local plain-http services (SSRF); loopback http is for stand-ins only.
    body = json.dumps({"issuer": OIDC_ISSUER, "jwks_uri": jwks_uri}).encode()
    if allowed:
        assert discovered_jwks_uri(body, OIDC_ISSUER, discovery_url) == jwks_uri
    else:
        with pytest.raises(FetchError, match="plain http"):
            discovered_jwks_uri(body, OIDC_ISSUER, discovery_url)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"<!DOCTYPE html><html><body>Sign in</body></html>", id="html"),
        pytest.param(b"[]", id="array"),
        pytest.param(b'"issuer"', id="string"),
        pytest.param(b"null", id="null"),
        pytest.param(b'{"issuer": "' + OIDC_ISSUER.encode(), id="truncated"),
        pytest.param(b"\xff\xfe\x00garbage", id="binary"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested-100000"),
        pytest.param(b'{"issuer": NaN', id="nan"),
    ],
)
async def test_discovery_garbage_is_a_fetch_error(server, client, jwks_body, content):
    server.routes[DISCOVERY_PATH] = respond(200, content)
    server.routes["/jwks"] = respond(200, jwks_body)
    with pytest.raises(FetchError, match="discovery document"):
        await discovery(server, client).fetch()
    assert server.requested == [DISCOVERY_PATH]


async def test_discovery_document_over_its_cap_is_refused(server, client, jwks_body):
    padding = " " * MAX_DISCOVERY_BYTES
    server.routes[DISCOVERY_PATH] = respond(200, discovery_doc(server, padding=padding))
    server.routes["/jwks"] = respond(200, jwks_body)
    with pytest.raises(FetchError, match="cap"):
        await discovery(server, client).fetch()
    assert server.requested == [DISCOVERY_PATH]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_discovery_redirect_is_refused_and_not_followed(server, client, jwks_body, status):
    server.routes[DISCOVERY_PATH] = respond(status, b"", {"Location": "/elsewhere"})
    server.routes["/elsewhere"] = respond(200, discovery_doc(server))
    server.routes["/jwks"] = respond(200, jwks_body)
    with pytest.raises(FetchError, match=r"discovery document: HTTP .*redirect") as ex:
        await discovery(server, client).fetch()
    assert "/elsewhere" in str(ex.value)
    assert server.requested == [DISCOVERY_PATH]


@pytest.mark.parametrize("status", [404, 500, 503])
async def test_discovery_http_error_names_the_discovery_document(server, client, status):
    server.routes[DISCOVERY_PATH] = respond(status, b"oops")
    with pytest.raises(FetchError, match=f"discovery document: HTTP {status}"):
        await discovery(server, client).fetch()


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        pytest.param(respond(500, b"oops"), "HTTP 500", id="5xx"),
        pytest.param(respond(404), "HTTP 404", id="404"),
        pytest.param(
            respond(302, b"", {"Location": "/login"}), r"HTTP 302 \(redirect", id="redirect"
        ),
    ],
)
async def test_jwks_uri_failure_names_the_jwks_uri(server, client, answer, match):
    server.routes[DISCOVERY_PATH] = respond(200, discovery_doc(server))
    server.routes["/jwks"] = answer
    with pytest.raises(FetchError, match=rf"jwks_uri http://127\.0\.0\.1:\d+/jwks: {match}"):
        await discovery(server, client).fetch()


async def test_jwks_uri_key_set_garbage_fails_the_refresh(server, client, clock):
    server.routes[DISCOVERY_PATH] = respond(200, discovery_doc(server))
    server.routes["/jwks"] = respond(200, b"<html>login</html>")
    keys = IssuerKeys(oidc_config(server), discovery(server, client), clock)
    assert not await keys.refresh()
    assert keys.last_error is not None
    assert keys.last_error.startswith("not JSON")


async def test_one_timeout_bounds_discovery_and_key_set_together(server, client, jwks_body):
    # Each answer takes 0.4 s; the whole fetch may take 0.6 s, not 0.6 s per request.
    server.routes[DISCOVERY_PATH] = held(respond(200, discovery_doc(server)), seconds=0.4)
    server.routes["/jwks"] = held(respond(200, jwks_body), seconds=0.4)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(FetchError, match="timed out"):
        await discovery(server, client, timeout=0.6).fetch()
    assert loop.time() - started < 0.9
    assert server.requested == [DISCOVERY_PATH, "/jwks"]


async def test_discovery_failures_keep_the_last_good_set(server, client, jwks_body, kid, clock):
    serve_discovery(server, jwks_body)
    keys = IssuerKeys(oidc_config(server), discovery(server, client), clock)
    assert await keys.refresh()
    for broken in (
        discovery_doc(server, issuer="https://evil.example"),
        discovery_doc(server, jwks_uri="http://evil.example/jwks"),
        b"<html>maintenance</html>",
    ):
        server.routes[DISCOVERY_PATH] = respond(200, broken)
        assert not await keys.refresh()
        assert (await keys.key_for(kid)).kid == kid
    assert keys.fetches == {"ok": 1, "error": 3}


# ---------------------------------------------------------------------------------------------
# AWS ALB: one PEM public key per kid


def pem_of(key: object) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


@pytest.fixture(scope="module")
def alb_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def alb_pem(alb_key) -> bytes:
    return pem_of(alb_key)


def alb_config(server: _Server, **overrides: object):
    values: dict[str, object] = {
        "name": "alb",
        "provider": "aws-alb",
        "issuer": OIDC_ISSUER,
        "jwks_url": None,
        "alb_keys_url": server.url("/alb"),
        "algorithms": ("ES256",),
        "refetch_cooldown_seconds": COOLDOWN,
    }
    return issuer_config(**(values | overrides))


@pytest.fixture
def alb(server, client, clock) -> AlbKeys:
    config = alb_config(server)
    return AlbKeys(config, AlbSource(client, server.url("/alb"), 5), clock)


def serve_kid(server: _Server, kid: str, answer: Callable[[_Handler], None]) -> None:
    server.routes[f"/alb/{kid}"] = answer


async def test_alb_key_is_fetched_per_kid_and_then_served_from_memory(
    server, alb, alb_key, alb_pem
):
    serve_kid(server, ALB_KID_1, respond(200, alb_pem))
    key = await alb.key_for(ALB_KID_1)
    assert key.kid == ALB_KID_1
    assert key.alg == "ES256"
    # It is the ALB's key: it verifies what the ALB's private key signed.
    signature = alb_key.sign(b"header.payload", ec.ECDSA(hashes.SHA256()))
    key.key.verify(signature, b"header.payload", ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg, arg-type]
    for _ in range(50):
        assert (await alb.key_for(ALB_KID_1)) is key
    assert server.requested == [f"/alb/{ALB_KID_1}"]
    assert alb.kids() == [ALB_KID_1]
    assert alb.fetches == {"ok": 1, "unknown": 0, "error": 0}
    assert alb.last_error is None


async def test_alb_key_url_is_one_segment_under_the_base_url(server, client, clock, alb_pem):
    server.default = respond(200, alb_pem)
    for base in ("/prefix", "/prefix/"):
        server.requested.clear()
        keys = AlbKeys(alb_config(server), AlbSource(client, server.url(base), 5), clock)
        await keys.key_for(ALB_KID_1)
        assert server.requested == [f"/prefix/{ALB_KID_1}"]


def test_alb_source_builds_the_region_url():
    source = AlbSource(None, "https://public-keys.auth.elb.eu-west-1.amazonaws.com", 5)  # type: ignore[arg-type]
    assert source.url_for(ALB_KID_1) == (
        f"https://public-keys.auth.elb.eu-west-1.amazonaws.com/{ALB_KID_1}"
    )


HOSTILE_KIDS = [
    pytest.param("../admin", id="dot-dot-slash"),
    pytest.param("..", id="dot-dot"),
    pytest.param(".", id="dot"),
    pytest.param("a/b", id="slash"),
    pytest.param("/etc/passwd", id="absolute"),
    pytest.param("a\\b", id="backslash"),
    pytest.param("%2e%2e%2fadmin", id="percent-encoded-traversal"),
    pytest.param("%2F", id="percent-encoded-slash"),
    pytest.param("a?x=1", id="query"),
    pytest.param("a#frag", id="fragment"),
    pytest.param("a;b", id="semicolon"),
    pytest.param("a.pem", id="dot-in-name"),
    pytest.param("a b", id="space"),
    pytest.param("a\tb", id="tab"),
    pytest.param("a\r\nHost: evil", id="crlf-injection"),
    pytest.param("a\n", id="trailing-newline"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\x7f", id="del"),
    pytest.param("", id="empty"),
    pytest.param("k" * 129, id="129-chars"),
    pytest.param("k" * 100_000, id="100000-chars"),
    pytest.param("\u00e9", id="non-ascii"),
    pytest.param("\uff11\uff12", id="fullwidth-digits"),
    pytest.param("\u212a", id="kelvin-sign"),
    pytest.param("http://evil.example/key", id="absolute-url"),
    pytest.param("@evil.example", id="userinfo"),
    pytest.param("a:b", id="colon"),
    pytest.param("~user", id="tilde"),
    pytest.param("$(id)", id="shell"),
    pytest.param("' OR 1=1 --", id="sql"),
]


@pytest.mark.parametrize("kid", HOSTILE_KIDS)
async def test_alb_kid_that_is_not_a_plain_name_is_never_fetched(server, alb, alb_pem, kid):
    server.default = respond(200, alb_pem)  # whatever the path, a key would be there
    with pytest.raises(Denied) as ex:
        await alb.key_for(kid)
    assert ex.value.reason is Reason.UNKNOWN_KID
    assert server.requested == []
    assert alb.fetches == {"ok": 0, "unknown": 0, "error": 0}


@pytest.mark.parametrize("kid", HOSTILE_KIDS)
def test_alb_source_refuses_to_build_a_url_for_a_hostile_kid(kid):
    # The last line behind AlbKeys's check: the URL builder itself refuses.
    with pytest.raises(ValueError, match="never put into a URL"):
        AlbSource(None, "https://keys.example", 5).url_for(kid)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kid",
    ["a", "A-z-0-9", ALB_KID_1, ALB_KID_1.upper(), "k" * 128, "-", "0"],
)
def test_alb_kid_shapes_that_are_fetched(kid):
    assert ALB_KID.fullmatch(kid)


async def test_hostile_kids_do_not_use_up_the_rate_limit(server, alb, alb_pem):
    for i in range(100):
        with pytest.raises(Denied):
            await alb.key_for(f"../{i}")
    serve_kid(server, ALB_KID_1, respond(200, alb_pem))
    assert (await alb.key_for(ALB_KID_1)).kid == ALB_KID_1


@pytest.mark.parametrize("status", [403, 404])
async def test_alb_unknown_kid_is_denied_and_remembered(server, alb, clock, alb_pem, status):
    serve_kid(server, ALB_KID_1, respond(status, b"<Error><Code>AccessDenied</Code></Error>"))
    with pytest.raises(Denied) as ex:
        await alb.key_for(ALB_KID_1)
    assert ex.value.reason is Reason.UNKNOWN_KID
    assert alb.fetches == {"ok": 0, "unknown": 1, "error": 0}
    # Within the cooldown the answer is remembered: no fetch, however often it is asked.
    serve_kid(server, ALB_KID_1, respond(200, alb_pem))
    clock.advance(COOLDOWN - 1)
    for _ in range(20):
        with pytest.raises(Denied) as ex:
            await alb.key_for(ALB_KID_1)
        assert ex.value.reason is Reason.UNKNOWN_KID
    assert server.requested == [f"/alb/{ALB_KID_1}"]
    # After it, one more fetch: the key has been published meanwhile.
    clock.advance(1)
    assert (await alb.key_for(ALB_KID_1)).kid == ALB_KID_1
    assert len(server.requested) == 2


async def test_alb_unknown_kid_is_not_a_failure_of_the_endpoint(alb):
    with capture_logs() as logs, pytest.raises(Denied):
        await alb.key_for(ALB_KID_1)
    assert alb.last_error is None
    assert alb.age() == 0
    assert [e["event"] for e in logs] == ["keys_refetch", "keys_unknown_kid"]


async def test_alb_rate_limit_bounds_fetches_of_new_kids(server, alb, clock, alb_pem):
    serve_kid(server, ALB_KID_1, respond(200, alb_pem))
    await alb.key_for(ALB_KID_1)
    for i in range(ALB_MAX_NEW_KIDS - 1):
        with pytest.raises(Denied):
            await alb.key_for(f"random-{i}")
    assert len(server.requested) == ALB_MAX_NEW_KIDS
    # The window is spent: a new kid is refused without a fetch...
    with pytest.raises(Denied, match="rate limit") as ex:
        await alb.key_for("random-next")
    assert ex.value.reason is Reason.UNKNOWN_KID
    assert "rate limit" in ex.value.detail
    assert len(server.requested) == ALB_MAX_NEW_KIDS
    # ...while a known kid is still served from memory.
    assert (await alb.key_for(ALB_KID_1)).kid == ALB_KID_1
    # The window slides on the monotonic clock.
    clock.now += 10 * COOLDOWN  # a wall-clock step does not open it
    with pytest.raises(Denied, match="rate limit"):
        await alb.key_for("random-next")
    clock.mono += COOLDOWN
    with pytest.raises(Denied) as ex:
        await alb.key_for("random-next")
    assert "rate limit" not in ex.value.detail
    assert len(server.requested) == ALB_MAX_NEW_KIDS + 1


async def test_alb_failed_fetches_count_against_the_rate_limit(server, alb):
    server.default = respond(503, b"busy")
    for i in range(ALB_MAX_NEW_KIDS):
        with pytest.raises(KeysUnavailable):
            await alb.key_for(f"k{i}")
    with pytest.raises(Denied, match="rate limit"):
        await alb.key_for("k-next")
    assert len(server.requested) == ALB_MAX_NEW_KIDS


async def test_alb_flood_of_random_kids_is_bounded(server, alb, clock, alb_pem):
    serve_kid(server, ALB_KID_1, respond(200, alb_pem))
    flood = [alb.key_for(f"{i:08x}-flood") for i in range(1000)]
    results = await asyncio.gather(*flood, return_exceptions=True)
    assert all(isinstance(r, Denied) and r.reason is Reason.UNKNOWN_KID for r in results)
    assert len(server.requested) == ALB_MAX_NEW_KIDS
    assert len(alb._unknown) <= ALB_MAX_NEW_KIDS
    # Next window: the negative memory of the last one is pruned, not grown.
    clock.advance(COOLDOWN)
    results = await asyncio.gather(
        *(alb.key_for(f"{i:08x}-again") for i in range(1000)),
        return_exceptions=True,
    )
    assert len(server.requested) == 2 * ALB_MAX_NEW_KIDS
    assert len(alb._unknown) <= ALB_MAX_NEW_KIDS


async def test_alb_concurrent_requests_for_one_kid_share_one_fetch(server, alb, alb_pem):
    serve_kid(server, ALB_KID_1, held(respond(200, alb_pem)))
    waiting = [asyncio.create_task(alb.key_for(ALB_KID_1)) for _ in range(100)]
    await entered(server)
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in waiting)
    server.release.set()
    found = await asyncio.gather(*waiting)
    assert {id(k) for k in found} == {id(found[0])}
    assert server.requested == [f"/alb/{ALB_KID_1}"]


async def test_alb_concurrent_unknown_kid_is_one_fetch_too(server, alb):
    serve_kid(server, ALB_KID_1, held(respond(404)))
    waiting = [asyncio.create_task(alb.key_for(ALB_KID_1)) for _ in range(100)]
    await entered(server)
    server.release.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, Denied) for r in results)
    assert server.requested == [f"/alb/{ALB_KID_1}"]
    assert alb.fetches["unknown"] == 1


async def test_alb_a_known_kid_never_waits_for_a_fetch_in_flight(server, alb, alb_pem):
    serve_kid(server, "known", respond(200, alb_pem))
    await alb.key_for("known")
    serve_kid(server, ALB_KID_1, held(respond(200, alb_pem)))
    pending = asyncio.create_task(alb.key_for(ALB_KID_1))
    await entered(server)
    async with asyncio.timeout(1):
        assert (await alb.key_for("known")).kid == "known"
    server.release.set()
    assert (await pending).kid == ALB_KID_1


async def test_alb_slow_endpoint_means_keys_unavailable_and_the_fetch_goes_on(
    server, alb, alb_pem, monkeypatch
):
    # nginx answers 500 when authd is slower than its proxy_read_timeout: the wait is capped,
    # and "cannot decide" is a 503, never a 200 and never a 401 the user cannot fix.
    assert UNKNOWN_KID_WAIT_SECONDS < 5
    monkeypatch.setattr(authd.keys, "UNKNOWN_KID_WAIT_SECONDS", 0.05)
    serve_kid(server, ALB_KID_1, held(respond(200, alb_pem)))
    with pytest.raises(KeysUnavailable, match="not fetched within"):
        await alb.key_for(ALB_KID_1)
    server.release.set()
    for _ in range(100):  # the fetch was not cancelled with the request that started it
        if alb.kids():
            break
        await asyncio.sleep(0.02)
    assert alb.kids() == [ALB_KID_1]
    assert server.requested == [f"/alb/{ALB_KID_1}"]


async def test_alb_fetch_timeout_means_keys_unavailable(server, client, clock, alb_pem):
    keys = AlbKeys(alb_config(server), AlbSource(client, server.url("/alb"), 0.2), clock)
    serve_kid(server, ALB_KID_1, held(respond(200, alb_pem)))
    with pytest.raises(KeysUnavailable, match="timed out"):
        await keys.key_for(ALB_KID_1)
    assert keys.fetches["error"] == 1


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        pytest.param(respond(500, b"oops"), "HTTP 500", id="500"),
        pytest.param(respond(502), "HTTP 502", id="502"),
        pytest.param(respond(503), "HTTP 503", id="503"),
        pytest.param(respond(401), "HTTP 401", id="401"),
        pytest.param(respond(429), "HTTP 429", id="429"),
        pytest.param(respond(200, b" " * (MAX_PEM_BYTES + 1)), "cap", id="too-large"),
    ],
)
async def test_alb_endpoint_failure_means_keys_unavailable(server, alb, alb_pem, answer, match):
    serve_kid(server, ALB_KID_1, answer)
    with capture_logs() as logs, pytest.raises(KeysUnavailable, match=match) as ex:
        await alb.key_for(ALB_KID_1)
    assert ex.value.reason is Reason.KEYS_UNAVAILABLE
    assert alb.fetches == {"ok": 0, "unknown": 0, "error": 1}
    assert alb.last_error is not None
    assert ALB_KID_1 in alb.last_error
    (event,) = [e for e in logs if e["event"] == "keys_fetch_failed"]
    assert event["issuer"] == "alb"
    # A failure is not remembered as "unknown": once the endpoint is back, the kid works.
    serve_kid(server, ALB_KID_1, respond(200, alb_pem))
    assert (await alb.key_for(ALB_KID_1)).kid == ALB_KID_1
    assert alb.last_error is None


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_alb_redirect_is_refused_and_not_followed(server, alb, alb_pem, status):
    serve_kid(server, ALB_KID_1, respond(status, b"", {"Location": "/alb/other"}))
    serve_kid(server, "other", respond(200, alb_pem))
    with pytest.raises(KeysUnavailable, match="redirect"):
        await alb.key_for(ALB_KID_1)
    assert server.requested == [f"/alb/{ALB_KID_1}"]


async def test_alb_connection_refused_means_keys_unavailable(client, clock):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = issuer_config(provider="aws-alb", jwks_url=None, alb_keys_url=base)
        keys = AlbKeys(config, AlbSource(client, base, 5), clock)
        with pytest.raises(KeysUnavailable):
            await keys.key_for(ALB_KID_1)


def _self_signed_cert_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alb")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2040, 1, 1, tzinfo=dt.UTC))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# Each builder gets the ALB's P-256 key and returns a body that must not become a key.
NOT_AN_ALB_KEY: list = [
    pytest.param(lambda k: pem_of(ec.generate_private_key(ec.SECP384R1())), "secp384r1", id="p384"),
    pytest.param(lambda k: pem_of(ec.generate_private_key(ec.SECP521R1())), "secp521r1", id="p521"),
    pytest.param(
        lambda k: pem_of(ec.generate_private_key(ec.SECP256K1())), "secp256k1", id="secp256k1"
    ),
    pytest.param(
        lambda k: pem_of(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "RSAPublicKey",
        id="rsa",
    ),
    pytest.param(
        lambda k: pem_of(ed25519.Ed25519PrivateKey.generate()), "Ed25519PublicKey", id="ed25519"
    ),
    pytest.param(_self_signed_cert_pem, "not a PEM public key", id="certificate"),
    pytest.param(_private_pem, "not a PEM public key", id="private-key"),
    pytest.param(lambda k: pem_of(k) + pem_of(k), "not one PEM block", id="two-blocks"),
    pytest.param(
        lambda k: pem_of(k) + pem_of(ec.generate_private_key(ec.SECP256R1())),
        "not one PEM block",
        id="two-different-keys",
    ),
    pytest.param(
        lambda k: pem_of(k).replace(b"\n-----END", b"AAAA\n-----END"),
        "not a PEM public key",
        id="corrupted-base64",
    ),
    pytest.param(lambda k: pem_of(k)[:80], "not a PEM public key", id="truncated"),
    pytest.param(
        lambda k: k.public_key().public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        ),
        "not one PEM block",
        id="der",
    ),
    pytest.param(
        lambda k: json.dumps({"keys": []}).encode(),
        "not one PEM block",
        id="jwks-json",
    ),
    pytest.param(lambda k: b"<html>Access denied</html>", "not one PEM block", id="html"),
    pytest.param(lambda k: b"", "not one PEM block", id="empty"),
    pytest.param(
        lambda k: b"-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n",
        "not a PEM public key",
        id="empty-pem",
    ),
    pytest.param(
        lambda k: pem_of(k).replace(b"PUBLIC KEY", b"EC PUBLIC KEY"),
        "not a PEM public key",
        id="wrong-label",
    ),
]


@pytest.mark.parametrize(("build", "note"), NOT_AN_ALB_KEY)
async def test_alb_body_that_is_not_a_p256_public_key_is_refused(server, alb, alb_key, build, note):
    serve_kid(server, ALB_KID_1, respond(200, build(alb_key)))
    with pytest.raises(KeysUnavailable) as ex:
        await alb.key_for(ALB_KID_1)
    assert note in ex.value.detail
    assert alb.kids() == []
    # Not remembered: the next request asks again (within the rate limit).
    with pytest.raises(KeysUnavailable):
        await alb.key_for(ALB_KID_1)
    assert len(server.requested) == 2


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda pem: pem, id="as-served"),
        pytest.param(lambda pem: pem.replace(b"\n", b"\r\n"), id="crlf"),
        pytest.param(lambda pem: b"\n\n" + pem + b"\n\n", id="surrounding-blank-lines"),
        pytest.param(lambda pem: pem.rstrip(b"\n"), id="no-final-newline"),
    ],
)
def test_alb_pem_variants_that_are_read(alb_pem, alb_key, build):
    key = parse_alb_key(ALB_KID_1, build(alb_pem))
    assert key.fingerprint == alb_key.public_key().public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


async def test_alb_is_usable_and_ready_without_asking_aws(server, alb):
    server.default = respond(503)
    assert alb.usable()
    assert await alb.refresh()
    assert alb.age() is None
    assert alb.kids() == []
    store = KeyStore([alb])
    await store.start()
    try:
        assert store.ready()
    finally:
        await store.stop()
    assert server.requested == []


async def test_alb_lru_keeps_the_recently_used_and_eviction_bumps_generation(
    server, alb, clock, alb_pem
):
    server.default = respond(200, alb_pem)
    kids = [f"kid-{i:03d}" for i in range(ALB_MAX_KEYS + 2)]

    async def fetch_new(kid: str) -> None:
        if len(server.requested) % ALB_MAX_NEW_KIDS == 0:
            clock.advance(COOLDOWN)  # stay within the rate limit
        await alb.key_for(kid)

    for kid in kids[:ALB_MAX_KEYS]:
        await fetch_new(kid)
    assert alb.generation == 0  # adding keys changes nothing a cached allow relied on
    assert len(alb.kids()) == ALB_MAX_KEYS
    await alb.key_for(kids[0])  # used again: now the most recent
    await fetch_new(kids[ALB_MAX_KEYS])
    assert alb.generation == 1
    assert kids[0] in alb.kids()
    assert kids[1] not in alb.kids()
    assert len(alb.kids()) == ALB_MAX_KEYS
    await fetch_new(kids[ALB_MAX_KEYS + 1])
    assert alb.generation == 2
    assert kids[2] not in alb.kids()
    # An evicted kid is fetched again when it comes back.
    requests = len(server.requested)
    await fetch_new(kids[1])
    assert len(server.requested) == requests + 1


async def test_alb_observer_is_told_every_fetch(server, client, clock, alb_pem):
    seen: list[tuple[str, bool]] = []
    keys = AlbKeys(
        alb_config(server),
        AlbSource(client, server.url("/alb"), 5),
        clock,
        on_fetch=lambda k, ok: seen.append((k.name, ok)),
    )
    serve_kid(server, "good", respond(200, alb_pem))
    serve_kid(server, "gone", respond(404))
    serve_kid(server, "down", respond(500))
    await keys.key_for("good")
    with pytest.raises(Denied):
        await keys.key_for("gone")
    with pytest.raises(KeysUnavailable):
        await keys.key_for("down")
    assert seen == [("alb", True), ("alb", True), ("alb", False)]


async def test_alb_bug_in_the_source_is_logged_and_answered_503(alb):
    class Buggy:
        async def fetch(self, _kid: str):
            raise RuntimeError("boom")

    alb.source = Buggy()
    with capture_logs() as logs, pytest.raises(KeysUnavailable, match="bug: RuntimeError"):
        await alb.key_for(ALB_KID_1)
    (event,) = [e for e in logs if e["event"] == "keys_fetch_failed"]
    assert event["exc_info"] is True


# ---------------------------------------------------------------------------------------------
# KeyStore: by issuer name, one kind of key source per provider, reuse across a reload


async def test_key_store_builds_each_providers_source(server, client, clock):
    cf = issuer_config(jwks_url=server.url("/certs"))
    iap = issuer_config(
        name="iap",
        provider="google-iap",
        issuer="https://cloud.google.com/iap",
        jwks_url=server.url("/iap"),
        algorithms=("ES256",),
    )
    oidc = oidc_config(server)
    alb = alb_config(server)  # the same iss as the OIDC issuer: an ALB in front of it
    store = KeyStore.from_config((cf, iap, oidc, alb), client, clock)
    assert list(store.issuers) == ["team", "iap", "idp", "alb"]
    assert isinstance(store.get("team").source, HttpSource)  # type: ignore[union-attr]
    assert isinstance(store.get("iap").source, HttpSource)  # type: ignore[union-attr]
    assert isinstance(store.get("idp").source, DiscoverySource)  # type: ignore[union-attr]
    assert isinstance(store.get("alb"), AlbKeys)
    assert store.get(ISSUER) is None
    assert store.get(OIDC_ISSUER) is None


async def test_key_store_oidc_and_alb_sharing_an_iss_keep_their_own_keys(
    server, client, clock, jwks_body, *, kid, alb_pem
):
    serve_discovery(server, jwks_body)
    serve_kid(server, ALB_KID_1, respond(200, alb_pem))
    store = KeyStore.from_config((oidc_config(server), alb_config(server)), client, clock)
    await store.start()
    try:
        assert store.ready()
        idp, alb = store.get("idp"), store.get("alb")
        assert idp is not None
        assert alb is not None
        assert (await idp.key_for(kid)).alg == "RS256"
        assert (await alb.key_for(ALB_KID_1)).alg == "ES256"
        # Neither answers for the other's kid.
        with pytest.raises(Denied):
            await alb.key_for(kid[:128].replace("_", "-"))
        with pytest.raises(Denied):
            await idp.key_for(ALB_KID_1)
    finally:
        await store.stop()


def test_key_store_refuses_two_key_sets_for_one_name(source, clock):
    a = IssuerKeys(issuer_config(), source, clock)
    b = IssuerKeys(issuer_config(issuer="https://other.example"), source, clock)
    with pytest.raises(ValueError, match="'team'"):
        KeyStore([a, b])


@pytest.mark.parametrize(
    ("change", "kept"),
    [
        pytest.param({}, True, id="unchanged"),
        pytest.param({"fetch_timeout_seconds": 3.0}, True, id="other-timeout"),
        pytest.param({"refetch_cooldown_seconds": 5.0}, True, id="other-cooldown"),
        pytest.param(
            {"token_sources": (TokenSource("header", "x-other"),)}, True, id="other-token-sources"
        ),
        pytest.param({"alb_keys_url": "http://127.0.0.1:1/other"}, False, id="other-key-url"),
        pytest.param({"issuer": "https://other.example"}, False, id="other-iss"),
        pytest.param({"name": "renamed"}, False, id="renamed"),
    ],
)
async def test_key_store_reuse_of_alb_keys_across_a_reload(
    server, client, clock, alb_pem, *, change, kept
):
    serve_kid(server, ALB_KID_1, respond(200, alb_pem))
    before = KeyStore.from_config((alb_config(server),), client, clock)
    old = before.get("alb")
    assert old is not None
    await old.key_for(ALB_KID_1)
    config = alb_config(server, **change)
    after = KeyStore.from_config((config,), client, clock, reuse=before)
    new = after.get(config.name)
    assert (new is old) is kept
    assert new is not None
    assert new.config == config
    assert (new.kids() == [ALB_KID_1]) is kept
    if kept and "refetch_cooldown_seconds" in change:
        assert new.config.refetch_cooldown_seconds == 5.0


@pytest.mark.parametrize(
    ("change", "kept"),
    [
        pytest.param({}, True, id="unchanged"),
        pytest.param({"refresh_seconds": 600.0}, True, id="other-refresh"),
        pytest.param({"issuer": "https://other.example"}, False, id="other-iss"),
        pytest.param({"name": "renamed"}, False, id="renamed"),
        pytest.param(
            {"discovery_url": None, "jwks_url": "http://127.0.0.1:1/jwks"},
            False,
            id="jwks-url-instead",
        ),
        pytest.param(
            {"provider": "cloudflare", "discovery_url": None, "jwks_url": "DISCOVERY"},
            False,
            id="other-provider-same-url",
        ),
    ],
)
async def test_key_store_reuse_of_oidc_keys_across_a_reload(
    server, client, clock, jwks_body, *, change, kept
):
    serve_discovery(server, jwks_body)
    if change.get("jwks_url") == "DISCOVERY":
        change = change | {"jwks_url": server.url(DISCOVERY_PATH)}
    before = KeyStore.from_config((oidc_config(server),), client, clock)
    old = before.get("idp")
    assert old is not None
    assert await old.refresh()
    config = oidc_config(server, **change)
    after = KeyStore.from_config((config,), client, clock, reuse=before)
    new = after.get(config.name)
    assert (new is old) is kept
    assert new is not None
    assert new.config == config
    assert (new.kids() != []) is kept


async def test_key_store_provider_change_to_alb_gets_new_keys(server, client, clock, jwks_body):
    # Same name, same iss; the key source's kind changes with the provider.
    serve_discovery(server, jwks_body)
    before = KeyStore.from_config((oidc_config(server),), client, clock)
    assert await before.get("idp").refresh()  # type: ignore[union-attr]
    after = KeyStore.from_config((alb_config(server, name="idp"),), client, clock, reuse=before)
    assert isinstance(after.get("idp"), AlbKeys)


async def test_a_flood_of_forged_kids_from_one_client_does_not_refuse_a_real_new_kid(
    server, alb, alb_pem
):
    # Forged tokens come straight to the origin from the attacker's address; the real ones
    # through the ALB. The real kid of a key rotation must still be fetched.
    serve_kid(server, ALB_KID_1, respond(200, alb_pem))
    for i in range(ALB_MAX_NEW_KIDS):
        with pytest.raises(Denied):
            await alb.key_for(f"{i:08x}-forged", "203.0.113.9")
    with pytest.raises(Denied, match="this client's"):
        await alb.key_for("ffffffff-forged", "203.0.113.9")
    assert (await alb.key_for(ALB_KID_1, "10.0.3.17")).kid == ALB_KID_1
    assert len(server.requested) == ALB_MAX_NEW_KIDS + 1


async def test_fetches_of_new_kids_are_bounded_in_all_whatever_the_addresses(server, alb):
    clients = (f"10.0.{n // 250}.{n % 250 + 1}" for n in range(10_000))
    for i in range(ALB_MAX_NEW_KIDS_IN_ALL):
        with pytest.raises(Denied):
            await alb.key_for(f"{i:08x}-forged", next(clients))
    with pytest.raises(Denied, match="all clients'"):
        await alb.key_for("ffffffff-forged", next(clients))
    assert len(server.requested) == ALB_MAX_NEW_KIDS_IN_ALL


async def test_the_clients_remembered_are_bounded(server, alb):
    for n in range(ALB_MAX_CLIENTS + 10):
        with pytest.raises(Denied):
            await alb.key_for(f"{n:08x}-forged", f"client-{n}")
    assert len(alb._by_client) == ALB_MAX_CLIENTS  # the least recently active forgotten
    assert "client-0" not in alb._by_client
    assert len(server.requested) == ALB_MAX_NEW_KIDS_IN_ALL


async def test_an_ipv6_client_is_budgeted_by_its_slash_64(alb):
    # One host commonly holds a whole /64: its addresses are one client.
    for i in range(ALB_MAX_NEW_KIDS):
        with pytest.raises(Denied):
            await alb.key_for(f"{i:08x}-forged", f"2001:db8::{i + 1:x}")
    with pytest.raises(Denied, match="this client's"):
        await alb.key_for("ffffffff-forged", "2001:db8::ffff")
    with pytest.raises(Denied) as ex:  # another /64 has a budget of its own
        await alb.key_for("eeeeeeee-forged", "2001:db8:0:1::1")
    assert "rate limit" not in ex.value.detail
