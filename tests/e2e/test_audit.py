"""What authd writes down: one audit line per request, and never the token."""

from __future__ import annotations

import collections
import json
import uuid

import pytest

pytestmark = pytest.mark.e2e

WINDOW = 40  # no run of this many characters of a token may appear anywhere


def token_windows(tokens: list[str]) -> set[str]:
    return {t[i : i + WINDOW] for t in tokens for i in range(len(t) - WINDOW + 1)}


def leaks(text: str, windows: set[str]) -> list[str]:
    """The token fragments found in `text`."""
    return sorted({text[i : i + WINDOW] for i in range(len(text) - WINDOW + 1)} & windows)


@pytest.fixture(scope="module")
def mixed_traffic(visit, make_token, make_service_token, dev_key, next_key):
    """A mix of allowed, refused and hostile requests; returns (tokens sent, responses)."""
    alice, bob = make_token(email="alice@example.com"), make_token(email="bob@example.com")
    tokens = {
        "allowed": alice,
        "other": bob,
        "refused": make_token(email="mallory@other.org"),
        "expired": make_token(iat=1, nbf=1, exp=2),
        "wrong-audience": make_token(aud="f" * 64),
        "org": make_token(type="org"),
        "foreign-signature": make_token(key=next_key, headers={"kid": dev_key.kid}),
        "unknown-kid": make_token(key=next_key),
        "huge": make_token(custom={"padding": "x" * 4600}),
        "service": make_service_token(),
        "tampered": alice[:-12] + "AAAAAAAAAAAA",
    }
    sends = [
        ("/wiki/", [("Cf-Access-Jwt-Assertion", tokens["allowed"])]),
        ("/wiki/", [("Cookie", f"CF_Authorization={tokens['allowed']}")]),
        ("/wiki/", [("Cf-Access-Jwt-Assertion", tokens["refused"])]),
        ("/wiki/", [("Cf-Access-Jwt-Assertion", tokens["expired"])]),
        ("/wiki/", [("Cf-Access-Jwt-Assertion", tokens["wrong-audience"])]),
        ("/wiki/", [("Cf-Access-Jwt-Assertion", tokens["org"])]),
        ("/wiki/", [("Cf-Access-Jwt-Assertion", tokens["foreign-signature"])]),
        ("/wiki/", [("Cf-Access-Jwt-Assertion", tokens["unknown-kid"])]),
        ("/wiki/", [("Cf-Access-Jwt-Assertion", tokens["huge"])]),
        ("/wiki/", [("Cf-Access-Jwt-Assertion", tokens["tampered"])]),
        ("/ops/", [("Cf-Access-Jwt-Assertion", tokens["service"])]),
        ("/ops/", [("Cf-Access-Jwt-Assertion", tokens["allowed"])]),
        ("/nosuch/", [("Cf-Access-Jwt-Assertion", tokens["allowed"])]),
        ("/wiki/", [("Cf-Access-Jwt-Assertion", alice), ("Cookie", f"CF_Authorization={bob}")]),
        ("/custom/", [("Cf-Access-Jwt-Assertion", tokens["allowed"])]),
        ("/wiki/", []),
    ]
    responses = {}
    for location, headers in sends:
        path = f"{location}{uuid.uuid4().hex}"
        responses[path] = visit.http.get(path, headers=headers)
    # stdout is written in order: once the last request's line is there, all of them are.
    last = list(responses)[-1]
    visit.stack.authd.wait_for_audit(lambda line: line.get("uri") == last)
    return tokens, responses


def test_each_request_gets_exactly_one_audit_line(stack, mixed_traffic):
    _, responses = mixed_traffic

    lines_per_uri = collections.Counter(line.get("uri") for line in stack.authd.audit_lines())

    assert {path: lines_per_uri[path] for path in responses} == dict.fromkeys(responses, 1)


def test_each_audit_line_records_the_outcome_the_client_saw(stack, mixed_traffic):
    _, responses = mixed_traffic
    lines = {line["uri"]: line for line in stack.authd.audit_lines() if line["uri"] in responses}

    for path, response in responses.items():
        line = lines[path]
        expected = {200: "allow", 401: "deny", 403: "deny"}[response.status_code]
        assert line["decision"] == expected, line
        assert line["status"] == response.status_code, line
        assert (line["reason"] is None) == (response.status_code == 200), line
        assert line["request_id"], line


def test_request_ids_are_distinct(stack, mixed_traffic):
    _, responses = mixed_traffic

    ids = [line["request_id"] for line in stack.authd.audit_lines() if line["uri"] in responses]

    assert len(set(ids)) == len(responses)


def test_an_allowed_request_is_audited_with_who_and_which_policy(visit, make_token):
    seen = visit("/wiki/", token=make_token(email="erin@example.com"))

    assert seen.status == 200
    assert seen.audit["event"] == "decision"
    assert seen.audit["decision"] == "allow"
    assert seen.audit["policy"] == "wiki"
    assert seen.audit["user"] == "erin@example.com"
    assert seen.audit["email"] == "erin@example.com"
    assert seen.audit["token_id"]


def test_a_refused_user_is_audited_by_name(visit, make_token):
    seen = visit("/wiki/", token=make_token(email="mallory@other.org"))

    assert seen.status == 403
    assert seen.audit["reason"] == "not_allowed"
    assert seen.audit["email"] == "mallory@other.org"


def test_the_same_token_has_the_same_token_id(visit, make_token):
    token = make_token()

    first, second = visit("/wiki/", token=token), visit("/wiki/", cookie=token)

    assert first.audit["token_id"] == second.audit["token_id"]
    assert first.audit["token_id"] != visit("/wiki/", token=make_token()).audit["token_id"]


def test_no_token_appears_in_any_output(stack, mixed_traffic):
    tokens, responses = mixed_traffic
    windows = token_windows(list(tokens.values()))
    seen_by_client = {
        f"response {path}": _client_view(response) for path, response in responses.items()
    }

    texts = {
        "authd output": stack.authd.all_output(),
        "nginx logs": stack.nginx.all_output(),
        **seen_by_client,
    }

    assert {name: found for name, text in texts.items() if (found := leaks(text, windows))} == {}


def _client_view(response) -> str:
    """The response as the client sees it, less the upstream's echo of the client's own
    token-carrying request headers (the test upstream echoes what it got; that is no leak)."""
    headers = "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items())
    body = response.text
    if response.status_code == 200:
        echoed = json.loads(body)
        echoed["headers"].pop("cf-access-jwt-assertion", None)
        echoed["headers"].pop("cookie", None)
        body = json.dumps(echoed)
    return f"{response.status_code}\n{headers}\n\n{body}"


@pytest.mark.parametrize(
    ("claims", "status", "reason"),
    [
        pytest.param(None, 401, "no_token", id="no-token"),
        pytest.param({"email": "mallory@other.org"}, 403, "not_allowed", id="refused"),
        pytest.param({"exp": 2, "iat": 1, "nbf": 1}, 401, "expired", id="expired"),
        pytest.param({}, 200, None, id="allowed"),
    ],
)
def test_authd_answers_with_an_empty_body_and_the_reason_in_a_header(
    stack, make_token, claims, status, reason
):
    headers = {"X-Original-URI": f"/wiki/{uuid.uuid4().hex}"}
    if claims is not None:
        headers["Cf-Access-Jwt-Assertion"] = make_token(**claims)

    answer = stack.authd.request("/auth/wiki", headers=headers)

    assert answer.status == status
    assert answer.body == b""
    assert answer.header("x-authd-reason") == reason
