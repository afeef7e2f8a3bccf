"""Who gets in, through the real nginx with the shipped snippets: allow, 401 and 403."""

from __future__ import annotations

import time

import pytest

from devtools.stack import DEFAULT_ISSUER, OPS_AUD, SERVICE_TOKEN_ID, WIKI_AUD

pytestmark = pytest.mark.e2e


def test_allowed_user_reaches_the_upstream_with_their_identity(visit, make_token):
    token = make_token(email="alice@example.com", country="DE", custom={"department": "Research"})

    seen = visit("/wiki/", token=token)

    assert seen.status == 200
    assert seen.received is not None
    assert seen.received.values("x-authd-email") == ["alice@example.com"]
    assert seen.received.values("x-authd-user") == ["alice@example.com"]
    assert seen.received.get("x-authd-sub")
    assert seen.received.values("x-authd-country") == ["DE"]
    assert seen.received.values("x-authd-policy") == ["wiki"]
    assert seen.received.get("x-authd-service-token") is None
    assert seen.audit["decision"] == "allow"
    assert seen.audit["status"] == 200
    assert seen.audit["policy"] == "wiki"
    assert seen.audit["email"] == "alice@example.com"


def test_a_policy_header_carries_a_claim_to_the_upstream(visit, make_token):
    seen = visit("/team/", token=make_token(custom={"department": "Research"}))

    assert seen.status == 200
    assert seen.received is not None
    assert seen.received.values("x-authd-department") == ["Research"]
    assert seen.received.values("x-authd-policy") == ["team"]


def test_a_required_claim_that_matches_lets_the_user_in(visit, make_token):
    seen = visit("/germany/", token=make_token(country="DE"))

    assert seen.status == 200
    assert seen.received is not None
    assert seen.received.values("x-authd-policy") == ["germany"]


def test_the_upstream_sees_the_sub_claim_of_the_token(visit, make_token):
    token = make_token(sub="7335d417-61da-459d-899c-0a01c76a2f94")

    seen = visit("/wiki/", token=token)

    assert seen.status == 200
    assert seen.received is not None
    assert seen.received.values("x-authd-sub") == ["7335d417-61da-459d-899c-0a01c76a2f94"]


def test_a_token_in_the_cookie_alone_is_enough(visit, make_token):
    seen = visit("/wiki/", cookie=make_token(email="carol@example.com"))

    assert seen.status == 200
    assert seen.received is not None
    assert seen.received.values("x-authd-email") == ["carol@example.com"]


def test_the_same_token_in_header_and_cookie_is_not_ambiguous(visit, make_token):
    token = make_token()

    seen = visit("/wiki/", token=token, cookie=token)

    assert seen.status == 200


def test_a_service_token_is_allowed_and_named_to_the_upstream(visit, make_service_token):
    seen = visit("/ops/", token=make_service_token(client_id=SERVICE_TOKEN_ID))

    assert seen.status == 200
    assert seen.received is not None
    assert seen.received.values("x-authd-service-token") == [SERVICE_TOKEN_ID]
    assert seen.received.get("x-authd-email") is None
    assert seen.audit["decision"] == "allow"


def test_no_token_is_401_and_the_upstream_is_never_called(visit):
    seen = visit("/wiki/")

    assert seen.status == 401
    assert seen.received is None
    assert seen.audit["decision"] == "deny"
    assert seen.audit["reason"] == "no_token"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        pytest.param(
            {"iat": -900, "nbf": -900, "exp": -300}, "expired", id="expired-beyond-leeway"
        ),
        pytest.param({"aud": OPS_AUD}, "bad_audience", id="another-applications-audience"),
        pytest.param({"aud": "f" * 64}, "bad_audience", id="unknown-audience"),
        pytest.param({"aud": WIKI_AUD.upper()}, "bad_audience", id="audience-case-changed"),
        pytest.param({"iss": DEFAULT_ISSUER + "/"}, "bad_issuer", id="issuer-trailing-slash"),
        pytest.param(
            {"iss": "https://evil.cloudflareaccess.com"}, "bad_issuer", id="issuer-other-team"
        ),
        pytest.param({"aud": []}, "bad_audience", id="audience-empty"),
        pytest.param({"aud": f" {WIKI_AUD}"}, "bad_audience", id="audience-with-blank"),
        pytest.param({"type": "org"}, "bad_type", id="org-session-token"),
        pytest.param({"exp": "9999999999"}, "bad_claims", id="exp-a-string"),
        pytest.param({"exp": 10**30 - int(time.time())}, "bad_claims", id="exp-absurdly-far"),
        pytest.param({"iat": 900, "nbf": 0, "exp": 1800}, "issued_in_future", id="iat-in-future"),
        pytest.param(
            {"iat": 0, "nbf": 900, "exp": 1800}, "not_yet_valid", id="not-valid-before-later"
        ),
    ],
)
def test_an_invalid_token_is_401_and_the_upstream_is_never_called(
    visit, make_token, claims, reason
):
    now = int(time.time())
    times = {
        k: now + v for k, v in claims.items() if k in {"iat", "nbf", "exp"} and isinstance(v, int)
    }
    token = make_token(**{**claims, **times})

    seen = visit("/wiki/", token=token)

    assert seen.status == 401
    assert seen.received is None
    assert seen.audit["decision"] == "deny"
    assert seen.audit["reason"] == reason


def test_a_token_signed_by_a_foreign_key_under_the_real_kid_is_401(
    visit, make_token, dev_key, next_key
):
    token = make_token(key=next_key, headers={"kid": dev_key.kid})

    seen = visit("/wiki/", token=token)

    assert seen.status == 401
    assert seen.received is None
    assert seen.audit["reason"] == "bad_signature"


@pytest.mark.parametrize(
    ("location", "claims", "reason"),
    [
        pytest.param("/wiki/", {"email": "mallory@other.org"}, "not_allowed", id="wrong-domain"),
        pytest.param(
            "/ops/", {"email": "bob@example.com", "aud": OPS_AUD}, "not_allowed", id="not-listed"
        ),
        pytest.param(
            "/germany/",
            {"email": "alice@example.com", "country": "FR"},
            "requirement_failed",
            id="required-claim-differs",
        ),
        pytest.param("/nosuch/", {}, "unknown_policy", id="policy-not-configured"),
    ],
)
def test_a_valid_token_the_policy_refuses_is_403(visit, make_token, location, claims, reason):
    seen = visit(location, token=make_token(**claims))

    assert seen.status == 403
    assert seen.received is None
    assert seen.audit["decision"] == "deny"
    assert seen.audit["reason"] == reason


def test_a_token_minted_by_the_cli_is_allowed(visit, dev_key):
    token = dev_key.mint(iss=DEFAULT_ISSUER, aud=WIKI_AUD, email="dave@example.com")

    seen = visit("/wiki/", token=token)

    assert seen.status == 200
    assert seen.received is not None
    assert seen.received.values("x-authd-email") == ["dave@example.com"]


def test_a_service_token_minted_by_the_cli_is_allowed(visit, dev_key):
    token = dev_key.mint(iss=DEFAULT_ISSUER, aud=OPS_AUD, service_token=SERVICE_TOKEN_ID)

    seen = visit("/ops/", token=token)

    assert seen.status == 200
    assert seen.received is not None
    assert seen.received.values("x-authd-service-token") == [SERVICE_TOKEN_ID]


def test_an_expired_token_minted_by_the_cli_is_401(visit, dev_key):
    token = dev_key.mint(iss=DEFAULT_ISSUER, aud=WIKI_AUD, email="dave@example.com", ttl=-600)

    seen = visit("/wiki/", token=token)

    assert seen.status == 401
    assert seen.received is None
    assert seen.audit["reason"] == "expired"


def test_an_org_token_minted_by_the_cli_is_401(visit, dev_key):
    token = dev_key.mint(
        iss=DEFAULT_ISSUER, aud=WIKI_AUD, email="dave@example.com", token_type="org"
    )

    seen = visit("/wiki/", token=token)

    assert seen.status == 401
    assert seen.audit["reason"] == "bad_type"
