"""Identity headers a client sends itself must never reach the upstream.

`/wiki/` includes the shipped location snippet only; `/custom/` includes it and declares
`proxy_set_header`s of its own (the nginx inheritance pitfall); `/team/` has a policy with a
custom header and includes a location snippet rendered for the configuration.
"""

from __future__ import annotations

import pytest

from devtools.stack import SERVICE_TOKEN_ID

pytestmark = pytest.mark.e2e

FORGED = "mallory@evil.example"
IDENTITY_HEADERS = [
    "X-Authd-Email",
    "X-Authd-User",
    "X-Authd-Sub",
    "X-Authd-Groups",
    "X-Authd-Country",
    "X-Authd-Service-Token",
    "X-Authd-Policy",
    "Cf-Access-Authenticated-User-Email",
]
LOCATIONS = ["/wiki/", "/custom/", "/team/"]


def forged_values(received) -> list[tuple[str, str]]:
    """Every header the upstream got that carries the forged identity."""
    return [(name, value) for name, value in received.headers if FORGED in value]


@pytest.mark.parametrize("location", LOCATIONS)
@pytest.mark.parametrize("header", IDENTITY_HEADERS)
def test_a_forged_identity_header_never_reaches_the_upstream(visit, make_token, location, header):
    seen = visit(location, token=make_token(email="alice@example.com"), headers=[(header, FORGED)])

    assert seen.status == 200
    assert seen.received is not None
    assert forged_values(seen.received) == []
    assert seen.received.values("x-authd-email") == ["alice@example.com"]


@pytest.mark.parametrize("location", LOCATIONS)
def test_forged_headers_in_every_spelling_never_reach_the_upstream(visit, make_token, location):
    forged = [
        ("X-Authd-Email", FORGED),
        ("X-Authd-Email", FORGED),  # repeated
        ("x-authd-email", FORGED),
        ("X-AUTHD-USER", FORGED),
        ("X_Authd_Email", FORGED),  # nginx drops names with underscores by default
        ("X_Authd_User", FORGED),
        ("x-authd_email", FORGED),
        ("Cf-Access-Authenticated-User-Email", FORGED),
    ]

    seen = visit(location, token=make_token(email="alice@example.com"), headers=forged)

    assert seen.status == 200
    assert seen.received is not None
    assert forged_values(seen.received) == []
    assert seen.received.values("x-authd-email") == ["alice@example.com"]
    assert seen.received.values("x-authd-user") == ["alice@example.com"]


def test_a_forged_policy_header_never_reaches_the_upstream(visit, make_token):
    forged = [("X-Authd-Department", FORGED), ("X_Authd_Department", FORGED)]

    seen = visit("/team/", token=make_token(custom={"department": "Research"}), headers=forged)

    assert seen.status == 200
    assert seen.received is not None
    assert forged_values(seen.received) == []
    assert seen.received.values("x-authd-department") == ["Research"]


def test_a_forged_policy_header_is_removed_when_the_claim_is_missing(visit, make_token):
    seen = visit(
        "/team/", token=make_token(custom={"groups": []}), headers=[("X-Authd-Department", FORGED)]
    )

    assert seen.status == 200
    assert seen.received is not None
    assert seen.received.get("x-authd-department") is None


def test_the_location_with_its_own_proxy_set_header_keeps_them(visit, make_token):
    # Without this, the /custom/ cases above would not test the inheritance pitfall at all.
    seen = visit("/custom/", token=make_token())

    assert seen.status == 200
    assert seen.received is not None
    assert seen.received.values("x-custom-header") == ["custom"]
    assert seen.received.values("host") == ["wiki.internal"]


def test_a_service_token_does_not_let_a_forged_email_through(visit, make_service_token):
    # A service token has no email: the identity header is empty, and the client's must not
    # take its place.
    forged = [("X-Authd-Email", FORGED), ("X-Authd-User", FORGED), ("X_Authd_Email", FORGED)]

    seen = visit("/ops/", token=make_service_token(), headers=forged)

    assert seen.status == 200
    assert seen.received is not None
    assert forged_values(seen.received) == []
    assert seen.received.get("x-authd-email") is None
    assert seen.received.values("x-authd-user") == [SERVICE_TOKEN_ID]


@pytest.mark.parametrize("location", LOCATIONS)
def test_forged_identity_headers_without_a_token_are_401(visit, location):
    forged = [(header, FORGED) for header in IDENTITY_HEADERS]

    seen = visit(location, headers=forged)

    assert seen.status == 401
    assert seen.received is None
    assert seen.audit["reason"] == "no_token"


@pytest.mark.parametrize(
    "facts",
    [
        pytest.param([("X-Original-URI", "/public/")], id="original-uri"),
        pytest.param([("X-Forwarded-For", "127.0.0.1")], id="forwarded-for"),
        pytest.param([("X-Forwarded-Host", "public.example")], id="forwarded-host"),
        pytest.param([("User-Agent", "kube-probe/1.29")], id="health-check-user-agent"),
        pytest.param([("X-Original-Method", "OPTIONS")], id="original-method"),
    ],
)
def test_request_facts_from_the_client_do_not_open_the_door(visit, facts):
    seen = visit("/wiki/", headers=facts)

    assert seen.status == 401
    assert seen.received is None
    assert seen.audit["uri"] == seen.path


def test_a_forged_original_uri_does_not_change_what_the_audit_records(visit, make_token):
    seen = visit("/wiki/", token=make_token(), headers=[("X-Original-URI", "/elsewhere")])

    assert seen.status == 200
    assert seen.audit["uri"] == seen.path


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_and_bodies_do_not_open_the_door(visit, method):
    seen = visit("/wiki/", method=method, body=b'{"email": "alice@example.com"}')

    assert seen.status == 401
    assert seen.received is None
    assert seen.audit["reason"] == "no_token"


def test_a_post_with_a_token_reaches_the_upstream_with_its_body(visit, make_token):
    seen = visit("/wiki/", method="POST", body=b"hello", token=make_token())

    assert seen.status == 200
    assert seen.received is not None
    assert seen.received.method == "POST"
    assert seen.received.values("x-authd-email") == ["alice@example.com"]


@pytest.mark.parametrize("path", ["/_authd", "/_authd?x=1", "/_authd/", "/auth/wiki"])
def test_the_auth_location_cannot_be_called_from_outside(stack, client, make_token, path):
    response = client.get(path, headers={"Cf-Access-Jwt-Assertion": make_token()})

    assert response.status_code == 404
    assert [line for line in stack.authd.audit_lines() if line.get("uri") == path] == []


@pytest.mark.parametrize(
    "odd",
    [
        pytest.param("%0d%0aX-Authd-Email:%20mallory@evil.example%0d%0a", id="crlf-encoded"),
        pytest.param("%252e%252e%252fadmin", id="double-encoded"),
        pytest.param(";jsessionid=1?admin=1&x=", id="matrix-and-query"),
        pytest.param("x" * 4000, id="4000-chars"),
        pytest.param("%C3%A9t%C3%A9?q=%ff", id="utf8-and-bad-byte"),
    ],
)
def test_an_odd_uri_changes_no_decision(visit, make_token, odd):
    location = f"/wiki/{odd}"

    refused = visit(location, audited=False)
    allowed = visit(location, token=make_token(email="alice@example.com"), audited=False)

    assert refused.status == 401
    assert refused.received is None
    assert allowed.status == 200
    assert allowed.received is not None
    assert allowed.received.values("x-authd-email") == ["alice@example.com"]
