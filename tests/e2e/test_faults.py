"""Drills with a stack of their own: keys missing at cold start, rotation, authd stopped.

Each one fails closed (nginx answers 500, never 200) and recovers without a restart.
"""

from __future__ import annotations

import secrets
import signal

import pytest

from devtools.stack import KEY_SERVER_FAULTS, MOVED_PATH, jwks_of, metric, wait_for

pytestmark = pytest.mark.e2e


def failed_fetches(stack) -> int:
    return stack.authd.count("keys_fetch_failed")


def test_keys_down_at_cold_start_fail_closed_and_recover_by_themselves(
    key_server, drill, make_token
):
    key_server.down()
    visit = drill(wait_ready=False, fetch_timeout_seconds=2)
    token = make_token(email="alice@example.com")

    first = visit("/wiki/", token=token)
    assert first.status == 500
    assert first.received is None
    assert first.audit["decision"] == "error"
    assert first.audit["reason"] == "keys_unavailable"
    text = visit.stack.authd.metrics()
    assert metric(text, "authd_keys_usable", issuer="test") == 0
    assert metric(text, "authd_key_fetches_total", issuer="test", result="error") >= 1
    assert metric(text, "authd_key_fetches_total", issuer="test", result="ok") == 0
    assert metric(text, "authd_decisions_total", decision="error", reason="keys_unavailable") == 1

    key_server.up()
    visits = visit.until(200, "/wiki/", token=token)

    assert [v.status for v in visits[:-1]] == [500] * (len(visits) - 1)
    assert visits[-1].received is not None
    assert visits[-1].received.values("x-authd-email") == ["alice@example.com"]
    text = visit.stack.authd.metrics()
    assert metric(text, "authd_keys_usable", issuer="test") == 1
    assert metric(text, "authd_key_fetches_total", issuer="test", result="ok") == 1
    assert metric(text, "authd_decisions_total", reason="keys_unavailable") == len(visits)
    assert metric(text, "authd_decisions_total", decision="allow") == 1


BAD_KEY_ANSWERS = [pytest.param(fault, id=name) for name, fault in KEY_SERVER_FAULTS.items()]


@pytest.mark.parametrize("misbehave", BAD_KEY_ANSWERS)
def test_a_bad_key_answer_at_cold_start_fails_closed(key_server, drill, make_token, misbehave):
    misbehave(key_server)
    visit = drill(wait_ready=False, fetch_timeout_seconds=1)
    wait_for(lambda: failed_fetches(visit.stack), what="authd to report a failed key fetch")

    seen = visit("/wiki/", token=make_token())

    assert seen.status == 500
    assert seen.received is None
    assert seen.audit["reason"] == "keys_unavailable"
    assert MOVED_PATH not in key_server.paths  # a redirect is never followed
    text = visit.stack.authd.metrics()
    assert metric(text, "authd_keys_usable", issuer="test") == 0
    assert metric(text, "authd_key_fetches_total", issuer="test", result="error") >= 1
    assert metric(text, "authd_key_fetches_total", issuer="test", result="ok") == 0
    assert metric(text, "authd_decisions_total", decision="error", reason="keys_unavailable") == 1


def test_a_gzip_encoded_key_set_is_read(key_server, drill, make_token):
    key_server.serve_gzipped()
    visit = drill()

    assert visit("/wiki/", token=make_token()).status == 200


def test_a_new_key_is_picked_up_after_one_refetch(key_server, drill, make_token, dev_key, next_key):
    visit = drill(refetch_cooldown_seconds=1)
    rotated = make_token(key=next_key, email="alice@example.com")

    before = visit("/wiki/", token=rotated)
    assert before.status == 401
    assert before.audit["reason"] == "unknown_kid"

    key_server.serve_jwks(jwks_of(next_key, dev_key))
    visits = visit.until(200, "/wiki/", token=rotated)

    assert {v.audit["reason"] for v in visits[:-1]} <= {"unknown_kid"}
    assert visits[-1].received is not None
    assert visits[-1].received.values("x-authd-email") == ["alice@example.com"]
    assert visit("/wiki/", token=make_token()).status == 200  # the previous key still works


def test_a_flood_of_unknown_kids_costs_at_most_one_refetch(key_server, drill, make_token):
    visit = drill(refetch_cooldown_seconds=60)
    fetches_before = key_server.request_count

    strangers = [
        visit("/wiki/", token=make_token(headers={"kid": secrets.token_hex(32)})) for _ in range(20)
    ]

    assert {(v.status, v.audit["reason"]) for v in strangers} == {(401, "unknown_kid")}
    assert key_server.request_count - fetches_before <= 1
    assert visit("/wiki/", token=make_token()).status == 200


def test_authd_stopped_means_500_and_a_restart_restores_service(drill, make_token):
    visit, token = drill(), make_token()
    assert visit("/wiki/", token=token).status == 200

    # uvicorn finishes its graceful shutdown, then re-raises SIGTERM (systemd counts that as clean).
    assert visit.stack.authd.stop() in {0, -signal.SIGTERM}
    down = visit("/wiki/", token=token, audited=False)

    assert down.status == 500
    assert down.received is None

    visit.stack.authd.start()
    assert visit.until(200, "/wiki/", token=token)[-1].received is not None


def test_a_hung_authd_means_500_never_200(drill, make_token):
    visit, token = drill(), make_token()
    visit.stack.authd.freeze()
    try:
        hung = visit("/wiki/", token=token, audited=False)  # nginx gives up after its timeout
    finally:
        visit.stack.authd.thaw()

    assert hung.status == 500
    assert hung.received is None
    assert visit("/wiki/", token=token).status == 200
