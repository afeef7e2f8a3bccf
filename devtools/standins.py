"""Loopback stand-ins for the remote endpoints authd calls, for unit and end-to-end tests.

- `GetIdentityServer`: Cloudflare Access's `/cdn-cgi/access/get-identity` on 127.0.0.1, served
  from a thread. A test says what it answers for each `CF_Authorization` cookie value (the
  documented identity shape, an error status, a slow or held answer, garbage, a huge body, a
  redirect) and reads back every request it received, the Cookie header included.

The get-identity format is documented only by example; `documented_identity` builds a document in
that example's shape (groups, idp, amr, geo, devicePosture with a disk encryption and a firewall
check, and the other members), with the values a test cares about as arguments.
"""

from __future__ import annotations

import copy
import http.cookies
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Self

from devtools.stack import LoopbackServer, QuietHandler

GET_IDENTITY_PATH = "/cdn-cgi/access/get-identity"
MOVED_PATH = "/moved/get-identity"  # where `IdentityReply.redirect` points: a follower would win
COOKIE_NAME = "CF_Authorization"

# The posture rules of `documented_identity`, as Cloudflare's tutorial enables them.
DISK_ENCRYPTION_RULE_ID = "8d4d9e3a-0d3c-4f3e-9b1a-3f2c6a1e7d01"
DISK_ENCRYPTION_RULE_NAME = "Disk Encryption"
FIREWALL_RULE_ID = "5b2f7c1e-6a4d-4e8b-a0c9-1d7e3f9b2c02"
FIREWALL_RULE_NAME = "Firewall"
DEFAULT_EMAIL = "alice@example.com"
DEFAULT_USER_UUID = "7335d417-61da-459d-899c-0a01c76a8e1f"
DEFAULT_GROUPS: tuple[tuple[str, str], ...] = (
    ("fdaedb59-e9be-4ab7-8001-3e069da54185", "sre"),
    ("2c1e7a44-52f3-4b0e-9d8e-7a6b5c4d3e2f", "ops"),
    ("9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d", "everyone"),
)


def documented_identity(  # noqa: PLR0913 -- one keyword per value a test may want to vary
    *,
    email: str = DEFAULT_EMAIL,
    user_uuid: str = DEFAULT_USER_UUID,
    groups: Sequence[tuple[str, str]] = DEFAULT_GROUPS,
    idp_type: str = "azureAD",
    amr: Sequence[str] = ("pwd", "mfa"),
    disk_encrypted: bool = True,
    firewall_on: bool = True,
    country: str = "DE",
) -> dict[str, Any]:
    """A get-identity answer in the shape of Cloudflare's documented example."""
    return {
        "id": "P51Tuu01fWHMBjIBvrCK1lK-eUDWs2aQMv03WDqT5oY",
        "name": "Alice Example",
        "email": email,
        "amr": list(amr),
        "oidc_fields": {"principalName": email},
        "groups": [{"id": i, "name": n, "email": f"{n}@example.com"} for i, n in groups],
        "idp": {"id": "b9f4d68e-dac1-48b0-b728-ae05a5f0d4b2", "type": idp_type},
        "geo": {"country": country},
        "user_uuid": user_uuid,
        "account_id": "1234567890abcdef1234567890abcdef",
        "iat": 1_692_171_410,
        "ip": "203.0.113.7",
        "auth_status": "NONE",
        "common_name": "",
        "service_token_id": "",
        "service_token_status": False,
        "is_warp": True,
        "is_gateway": False,
        "version": 2,
        "device_id": "c8e3f1a2-7b6d-4e5f-9a0b-1c2d3e4f5a6b",
        "device_sessions": {},
        "devicePosture": {
            DISK_ENCRYPTION_RULE_ID: {
                "id": DISK_ENCRYPTION_RULE_ID,
                "schedule": "5m",
                "timestamp": "2024-09-26T10:00:00.000Z",
                "description": "",
                "type": "disk_encryption",
                "check": {"drives": {"C": {"encrypted": disk_encrypted}}},
                "success": disk_encrypted,
                "rule_name": DISK_ENCRYPTION_RULE_NAME,
                "input": {"checkDisks": [], "requireAll": True},
            },
            FIREWALL_RULE_ID: {
                "id": FIREWALL_RULE_ID,
                "schedule": "5m",
                "timestamp": "2024-09-26T10:00:00.000Z",
                "description": "",
                "type": "firewall",
                "check": {"firewall": firewall_on},
                "success": firewall_on,
                "rule_name": FIREWALL_RULE_NAME,
                "input": {"enabled": True},
            },
        },
    }


@dataclass(frozen=True)
class IdentityReply:
    """What the stand-in answers: build one with a class method, then `slow()`/`held()` it."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0  # seconds before the answer
    hold: bool = False  # answer only once the test calls `GetIdentityServer.release()`
    declare_length: bool = True  # False: no Content-Length, the body ends with the connection

    @classmethod
    def document(cls, doc: Mapping[str, Any] | None = None, **extra_headers: str) -> Self:
        """200 with ``doc`` (default: `documented_identity()`) as JSON."""
        body = json.dumps(documented_identity() if doc is None else doc).encode()
        return cls(body=body, headers=tuple(extra_headers.items()))

    @classmethod
    def raw(cls, body: bytes, content_type: str = "application/json") -> Self:
        """200 with exactly these bytes."""
        return cls(body=body, content_type=content_type)

    @classmethod
    def error(cls, status: int) -> Self:
        return cls(status=status, body=b'{"err":"stand-in error"}')

    @classmethod
    def login_page(cls) -> Self:
        """200 with HTML: what an identity endpoint behind a login redirect may hand back."""
        page = b"<!DOCTYPE html><html><body><h1>Sign in</h1></body></html>\n"
        return cls(body=page, content_type="text/html")

    @classmethod
    def garbage(cls) -> Self:
        return cls(body=bytes(range(256)) * 4, content_type="application/octet-stream")

    @classmethod
    def huge(cls, size: int = 4 * 1024 * 1024, *, declare_length: bool = True) -> Self:
        """A syntactically valid identity document of ``size`` bytes (a long padding member)."""
        doc = documented_identity()
        base = len(json.dumps(doc | {"padding": ""}).encode())
        doc["padding"] = "x" * max(size - base, 0)
        return cls(body=json.dumps(doc).encode(), declare_length=declare_length)

    @classmethod
    def redirect(cls, status: int = 302, location: str = MOVED_PATH) -> Self:
        """A redirect to ``location`` (default `MOVED_PATH`, which serves a valid identity)."""
        return cls(status=status, headers=(("Location", location),))

    def slow(self, seconds: float) -> Self:
        return replace(self, delay=seconds)

    def held(self) -> Self:
        return replace(self, hold=True)


UNKNOWN_TOKEN_REPLY = IdentityReply(
    status=401, body=b'{"err":"no valid CF_Authorization"}', content_type="application/json"
)


@dataclass(frozen=True)
class SeenRequest:
    """One request as the stand-in received it."""

    path: str
    cookie: str | None  # the raw Cookie header(s), joined with "; " when there were several
    token: str | None  # the CF_Authorization value in it, if any
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)


class _Handler(QuietHandler):
    protocol_version = "HTTP/1.0"  # every answer closes its connection: no keep-alive surprises

    def do_GET(self) -> None:  # noqa: N802 -- the stdlib names it
        owner = self.server.owner  # type: ignore[attr-defined]  # stack's server knows it
        reply = owner._record(self)  # noqa: SLF001 -- the handler is the server's own part
        try:
            self._answer(owner, reply)
        finally:
            owner._left()  # noqa: SLF001

    def _answer(self, owner: GetIdentityServer, reply: IdentityReply) -> None:
        if reply.delay and owner.closing.wait(reply.delay):
            return  # shutting down while slow: drop the connection
        if reply.hold:
            owner.released.wait()
            if owner.closing.is_set():
                return
        self.send_body(
            reply.status,
            reply.body,
            reply.content_type,
            reply.headers,
            declare_length=reply.declare_length,
        )


class GetIdentityServer(LoopbackServer):
    """Cloudflare's get-identity endpoint on 127.0.0.1, answering per ``CF_Authorization`` token.

    ``answer(token, reply)`` sets what one token gets; ``answer_all(reply)`` what every token
    gets, the per-token answers aside; a token with no answer gets `UNKNOWN_TOKEN_REPLY` (401).
    Every request is recorded (`requests`, `request_count`, `cookies`, `tokens`), whatever it is
    answered; `in_flight` counts the ones being answered right now (slow or held).
    Use it as a context manager, or call `start()` and `stop()`.
    """

    handler = _Handler

    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self._lock = threading.Condition()
        self._replies: dict[str, IdentityReply] = {}
        self._all: IdentityReply | None = None
        self._seen: list[SeenRequest] = []
        self._in_flight = 0
        self.closing = threading.Event()
        self.released = threading.Event()  # what held answers wait for

    # Lifecycle --------------------------------------------------------------------------------

    def start(self) -> Self:
        self.closing.clear()
        self._listen()
        return self

    def stop(self) -> None:
        """Stop listening; slow and held answers are dropped, not sent."""
        self.closing.set()
        self.released.set()
        self._close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The get-identity URL, for an issuer's ``get_identity_url``."""
        return self.base_url + GET_IDENTITY_PATH

    # Steering ---------------------------------------------------------------------------------

    def answer(self, token: str, reply: IdentityReply | Mapping[str, Any]) -> None:
        """What ``token`` gets from now on: a reply, or a document to answer 200 with."""
        with self._lock:
            self._replies[token] = _as_reply(reply)

    def answer_all(self, reply: IdentityReply | Mapping[str, Any] | None) -> None:
        """What every token without its own answer gets (None: back to 401)."""
        with self._lock:
            self._all = None if reply is None else _as_reply(reply)

    def release(self) -> None:
        """Let held answers go, now and from now on until `hold_again()`."""
        self.released.set()

    def hold_again(self) -> None:
        self.released.clear()

    def reset(self) -> None:
        """Forget every answer and every recorded request (between tests of one server)."""
        with self._lock:
            self._replies.clear()
            self._all = None
            self._seen.clear()
        self.released.clear()

    # What it saw ------------------------------------------------------------------------------

    @property
    def requests(self) -> list[SeenRequest]:
        with self._lock:
            return list(self._seen)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._seen)

    @property
    def cookies(self) -> list[str | None]:
        """The Cookie header of each request, in order."""
        return [r.cookie for r in self.requests]

    @property
    def tokens(self) -> list[str | None]:
        """The ``CF_Authorization`` value of each request, in order."""
        return [r.token for r in self.requests]

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def wait_in_flight(self, count: int, timeout: float = 5.0) -> bool:
        """Block until at least ``count`` answers are being held or delayed (call it from a
        thread, e.g. ``asyncio.to_thread``, when the client runs on an event loop)."""
        with self._lock:
            return self._lock.wait_for(lambda: self._in_flight >= count, timeout)

    # The handler's side -----------------------------------------------------------------------

    def _record(self, handler: _Handler) -> IdentityReply:
        cookie_headers = handler.headers.get_all("Cookie") or []
        cookie = "; ".join(cookie_headers) if cookie_headers else None
        token = _cookie_token(cookie)
        seen = SeenRequest(handler.path, cookie, token, tuple(handler.headers.items()))
        with self._lock:
            self._seen.append(seen)
            self._in_flight += 1
            self._lock.notify_all()
            if handler.path == MOVED_PATH:
                return IdentityReply.document()
            if handler.path != GET_IDENTITY_PATH:
                return IdentityReply.error(404)
            reply = self._replies.get(token) if token is not None else None
            return reply or self._all or UNKNOWN_TOKEN_REPLY

    def _left(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._lock.notify_all()


def _as_reply(reply: IdentityReply | Mapping[str, Any]) -> IdentityReply:
    if isinstance(reply, IdentityReply):
        return reply
    return IdentityReply.document(copy.deepcopy(dict(reply)))


def _cookie_token(cookie: str | None) -> str | None:
    if cookie is None:
        return None
    jar = http.cookies.SimpleCookie()
    try:
        jar.load(cookie)
    except http.cookies.CookieError:
        return None
    morsel = jar.get(COOKIE_NAME)
    return morsel.value if morsel is not None else None
