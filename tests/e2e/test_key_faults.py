"""A key server that fails after a good start: the last good keys keep users working.

An unknown kid makes authd refetch (at most once per cooldown, 1 s here), so a stranger's token
is how these tests make authd meet the failing key server.
"""

from __future__ import annotations

import pytest

from devtools.stack import KEY_SERVER_FAULTS, metric, wait_for

pytestmark = pytest.mark.e2e

FAULTS = [pytest.param(fault, id=name) for name, fault in KEY_SERVER_FAULTS.items()]


@pytest.fixture(scope="module")
def stack_settings():
    return {"refetch_cooldown_seconds": 1, "fetch_timeout_seconds": 1}


@pytest.fixture
def failing_key_server(module_key_server):
    """The shared stack's key server, put back to serving good keys after the test."""
    yield module_key_server
    module_key_server.up()
    module_key_server.serve_jwks()


@pytest.mark.parametrize("misbehave", FAULTS)
def test_users_keep_working_on_the_last_good_keys(
    visit, failing_key_server, make_token, next_key, misbehave
):
    def failed_fetches() -> int:
        return visit.stack.authd.count("keys_fetch_failed")

    authd = visit.stack.authd
    misbehave(failing_key_server)
    before = failed_fetches()
    errors, allowed = (
        authd.metric("authd_key_fetches_total", result="error"),
        authd.metric("authd_decisions_total", decision="allow"),
    )
    stranger = make_token(key=next_key)

    def refetch_failed() -> bool:
        seen = visit("/wiki/", token=stranger)
        assert (seen.status, seen.audit["reason"]) == (401, "unknown_kid")
        return failed_fetches() > before

    wait_for(refetch_failed, what="a refetch to fail", timeout=20, interval=0.3)
    seen = visit("/wiki/", token=make_token(email="alice@example.com"))

    assert seen.status == 200
    assert seen.received is not None
    assert seen.received.values("x-authd-email") == ["alice@example.com"]
    text = authd.metrics()
    assert metric(text, "authd_key_fetches_total", result="error") > errors
    assert metric(text, "authd_keys_usable", issuer="test") == 1
    assert metric(text, "authd_decisions_total", decision="allow") == allowed + 1
