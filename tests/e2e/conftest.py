"""Fixtures for the end-to-end tests: keys, tokens, and whole stacks of real processes.

A test module shares one stack (authd on a unix socket, nginx with the shipped snippets, the
recording upstream, a key server) through the module-scoped `stack` fixture; drills that need a
stack of their own (cold start, rotation, authd stopped) build one with `drill`.
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from devtools.stack import (
    DEFAULT_ISSUER,
    OPS_AUD,
    SERVICE_TOKEN_ID,
    WIKI_AUD,
    DevKey,
    KeyServer,
    make_config,
    protected_location,
    running_stack,
    wait_for,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    from devtools.stack import ReceivedRequest, Stack

# The policies every shared stack serves, one nginx location `/<name>/` each.
POLICIES: Mapping[str, Mapping[str, Any]] = {
    "wiki": {"audience": [WIKI_AUD], "allow_email_domains": ["example.com"]},
    # Custom headers: its location includes a snippet rendered for this configuration.
    "team": {
        "audience": [WIKI_AUD],
        "allow_email_domains": ["example.com"],
        "headers": {"X-Authd-Department": "custom.department"},
    },
    "ops": {
        "audience": [OPS_AUD],
        "allow_emails": ["alice@example.com"],
        "allow_service_tokens": [SERVICE_TOKEN_ID],
    },
    "germany": {
        "audience": [WIKI_AUD],
        "allow_email_domains": ["example.com"],
        "require_claims": {"country": ["DE"]},
    },
}


# --- keys and tokens ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dev_key(tmp_path_factory) -> DevKey:
    """The issuer's current signing key, made by `authd dev keygen`."""
    return DevKey.create(tmp_path_factory.mktemp("keys") / "current")


@pytest.fixture(scope="session")
def next_key(tmp_path_factory) -> DevKey:
    """A second key: the issuer's next key in rotation drills, a foreign key elsewhere."""
    return DevKey.create(tmp_path_factory.mktemp("keys") / "next")


def user_claims(
    *,
    email: str = "alice@example.com",
    aud: str | Sequence[str] = WIKI_AUD,
    ttl: int = 300,
    country: str = "DE",
    custom: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """The claims of a Cloudflare Access application token for a user who just logged in."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": DEFAULT_ISSUER,
        "aud": [aud] if isinstance(aud, str) else list(aud),
        "email": email,
        "sub": str(uuid.uuid5(uuid.NAMESPACE_DNS, email)),
        "type": "app",
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "country": country,
        "identity_nonce": uuid.uuid4().hex,
        "custom": dict(custom if custom is not None else {"department": "Engineering"}),
    }
    claims.update(overrides)
    return claims


def service_claims(*, client_id: str = SERVICE_TOKEN_ID, aud: str = OPS_AUD) -> dict[str, Any]:
    """The claims of a service-token application token: no email, empty sub, no nbf."""
    now = int(time.time())
    return {
        "iss": DEFAULT_ISSUER,
        "aud": [aud],
        "type": "app",
        "common_name": client_id,
        "sub": "",
        "iat": now,
        "exp": now + 300,
    }


@pytest.fixture(scope="session")
def make_claims() -> Callable[..., dict[str, Any]]:
    """`make_claims(**overrides)`: the claims of a user token, unsigned."""
    return user_claims


@pytest.fixture(scope="session")
def make_token(dev_key) -> Callable[..., str]:
    """`make_token(**claim_overrides)`: a user token signed with the current key (or `key=`)."""

    def make(*, key: DevKey | None = None, headers: Mapping[str, Any] | None = None, **claims):
        return (key or dev_key).sign(user_claims(**claims), headers=headers)

    return make


@pytest.fixture(scope="session")
def make_service_token(dev_key) -> Callable[..., str]:
    """`make_service_token(client_id=..., aud=...)`: a machine client's token."""

    def make(**claims: Any) -> str:
        return dev_key.sign(service_claims(**claims))

    return make


# --- stacks ---------------------------------------------------------------------------------------


def _extra_locations(upstream_url: str) -> list[str]:
    """`/custom/`: the wiki policy, with `proxy_set_header`s of its own (the inheritance pitfall);
    `/nosuch/`: a policy authd does not know."""
    custom = (
        "proxy_set_header X-Custom-Header custom;\n"
        "proxy_set_header X-Forwarded-Proto https;\n"
        "proxy_set_header Host wiki.internal;"
    )
    return [
        protected_location("/custom/", "wiki", upstream_url, extra=custom),
        protected_location("/nosuch/", "nosuch", upstream_url),
    ]


@pytest.fixture
def key_server(dev_key) -> Iterator[KeyServer]:
    """A key server for this test only, serving the current key."""
    with KeyServer(dev_key.jwks) as server:
        yield server


@pytest.fixture(scope="module")
def module_key_server(dev_key) -> Iterator[KeyServer]:
    """The key server of the module's shared stack, serving the current key."""
    with KeyServer(dev_key.jwks) as server:
        yield server


@pytest.fixture(scope="module")
def stack_settings() -> dict[str, Any]:
    """Config settings of the module's shared stack: override this fixture in a module."""
    return {}


@pytest.fixture(scope="module")
def extra_locations() -> Callable[[str], list[str]]:
    """Locations of the module's shared stack besides `/<policy>/`: override in a module."""
    return _extra_locations


@pytest.fixture(scope="module")
def stack(tmp_path_factory, module_key_server, stack_settings, extra_locations) -> Iterator[Stack]:
    """One stack shared by a test module, serving `/<policy>/` for each of `POLICIES` and
    `extra_locations`."""
    workdir = tmp_path_factory.mktemp("stack")
    config = make_config(
        workdir, jwks_url=module_key_server.url, policies=POLICIES, **stack_settings
    )
    with running_stack(workdir, config, extra_locations=extra_locations) as running:
        yield running


# --- visiting through nginx -----------------------------------------------------------------------


@dataclass
class Visit:
    """One request through nginx, and what each party noticed."""

    path: str
    response: httpx.Response
    received: ReceivedRequest | None  # what the upstream got; None if it was never called
    audits: list[dict[str, Any]] = field(default_factory=list)  # authd's decision lines for it

    @property
    def status(self) -> int:
        return self.response.status_code

    @property
    def audit(self) -> dict[str, Any]:
        assert len(self.audits) == 1, f"expected one audit line for {self.path}: {self.audits}"
        return self.audits[0]


class Visitor:
    """Sends requests through a stack's nginx, each to a fresh path, and gathers what happened."""

    def __init__(self, stack: Stack, http: httpx.Client) -> None:
        self.stack = stack
        self.http = http

    def __call__(
        self,
        location: str = "/wiki/",
        *,
        token: str | None = None,
        cookie: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        method: str = "GET",
        body: bytes | None = None,
        audited: bool = True,
    ) -> Visit:
        """Request a fresh path under `location`, with `token` in the assertion header and/or
        `cookie` as `CF_Authorization`; collect the upstream's view and authd's audit line.

        `audited=False` for requests that nginx answers without asking authd.
        """
        path = f"{location}{uuid.uuid4().hex}"
        sent = list(headers)
        if token is not None:
            sent.append(("Cf-Access-Jwt-Assertion", token))
        if cookie is not None:
            sent.append(("Cookie", f"CF_Authorization={cookie}"))
        response = self.http.request(method, path, headers=sent, content=body)
        audits = (
            self.stack.authd.wait_for_audit(lambda line: line.get("uri") == path) if audited else []
        )
        received = self.stack.upstream.requests_for(path)
        assert len(received) <= 1
        return Visit(path, response, received[0] if received else None, audits)

    def until(
        self, status: int, location: str = "/wiki/", *, token: str, timeout: float = 30.0
    ) -> list[Visit]:
        """Visit every 0.2 s until the client sees `status`; return every visit made."""
        visits: list[Visit] = []

        def reached() -> bool:
            visits.append(self(location, token=token))
            return visits[-1].status == status

        wait_for(reached, what=f"{location} to answer {status}", timeout=timeout, interval=0.2)
        return visits


@pytest.fixture(scope="module")
def client(stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=15.0) as http:
        yield http


@pytest.fixture(scope="module")
def visit(stack, client) -> Visitor:
    """`visit(location, token=..., cookie=..., headers=[...])` through the module's shared stack."""
    return Visitor(stack, client)


@pytest.fixture
def drill(tmp_path, key_server) -> Iterator[Callable[..., Visitor]]:
    """`drill(wait_ready=True, activated=False, env=None, **settings)`: a stack for this test
    only, with its keys from `key_server` and `settings` in its config; returns a `Visitor`
    (`.stack` is the stack). `activated` starts authd through systemd-socket-activate.

    nginx serves the same locations as the shared stack. Everything stops at the test's end.
    """
    with contextlib.ExitStack() as exits:

        def start(
            *,
            wait_ready: bool = True,
            activated: bool = False,
            env: Mapping[str, str] | None = None,
            **settings: Any,
        ) -> Visitor:
            config = make_config(tmp_path, jwks_url=key_server.url, policies=POLICIES, **settings)
            stack = exits.enter_context(
                running_stack(
                    tmp_path,
                    config,
                    extra_locations=_extra_locations,
                    wait_ready=wait_ready,
                    activated=activated,
                    env=env,
                )
            )
            http = exits.enter_context(httpx.Client(base_url=stack.url, timeout=15.0))
            return Visitor(stack, http)

        yield start
