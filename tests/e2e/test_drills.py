"""Fault drills against real processes (issue 4): each one asserts what nginx's client sees,
what the audit log says and what /metrics says.

Drills 1, 4 and 9 (and a first look at 5, 6 and 8) are in test_faults.py, test_key_faults.py
and test_operate.py; these are the rest: keys going stale (2), a hung key endpoint (3), rotation
through refetch and refresh (5), a flood of random kids (6), SIGTERM (7) and a killed worker (8)
under load, and clock skew (10).

Time that authd must see pass (a 60 s refresh at the least, staleness, skew) is moved with
libfaketime in authd's process only (`FakeTime`): nginx, the key server and the test keep the
true time. Nothing here asserts on durations.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest

from devtools.stack import (
    ClientLoad,
    DevKey,
    FakeTime,
    http_request,
    jwks_of,
    metric,
    rss_bytes,
    wait_for,
    wrk_flood,
)

pytestmark = pytest.mark.e2e

ISSUER = "test"  # the issuer's name in make_config, the `issuer` label of the key metrics
# Every decision line has exactly these members (`detail` only on refusals).
AUDIT_MEMBERS = {
    "decision", "status", "reason", "policy", "rule", "cached", "user", "email", "sub",
    "service_token", "issuer",
    "iss", "kid", "token_id", "method", "uri", "host", "client_ip", "request_id", "duration_ms",
    "pid", "event", "level", "timestamp",
}  # fmt: skip
DECISION_OF = {200: "allow", 401: "deny", 403: "deny", 503: "error"}


def complete(line: dict) -> bool:
    return set(line) - {"detail", "enrichment"} == AUDIT_MEMBERS


def lines_by_uri(lines: list[dict]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        found[line["uri"]].append(line)
    return found


def decisions(text: str, **labels: str) -> float:
    return metric(text, "authd_decisions_total", **labels)


def ready(stack) -> tuple[int, dict]:
    answer = http_request(stack.authd.listen, "/readyz")
    return answer.status, json.loads(answer.body)


def assert_right_or_failed_closed(sent) -> Counter:
    """nginx answered every request; a valid token got 200 or a fail-closed 500, an invalid
    one 401 or 500, never a 200; and both kinds were really answered along the way.
    Returns the count of (valid, status)."""
    assert all(s.error is None for s in sent), [s for s in sent if s.error][:3]
    wrong = [s for s in sent if s.status not in ({200, 500} if s.valid else {401, 500})]
    assert not wrong, wrong[:5]
    statuses = Counter((s.valid, s.status) for s in sent)
    assert statuses[True, 200]
    assert statuses[False, 401]
    return statuses


# --- 2. the key endpoint goes down after keys were loaded ---


def test_known_keys_serve_until_max_stale_then_fail_closed(tmp_path, key_server, drill, make_token):
    """refresh 60 s (the least allowed) and max_stale 60 s: the keys fetched at start serve
    until 120 s after that fetch, then every request with a token is 503 (nginx: 500).
    authd's clock (wall and monotonic) is moved forward; nothing else's is."""
    clock = FakeTime(tmp_path, monotonic=True)
    visit = drill(env=clock.env, refresh_seconds=60, max_stale_seconds=60, fetch_timeout_seconds=1)
    authd = visit.stack.authd
    token = make_token(ttl=3600)
    assert visit(token=token).status == 200
    key_server.down()

    # +30 s: the refresh is not due yet; nothing was fetched, nothing failed.
    clock.set(30)
    assert [visit(token=token).status for _ in range(5)] == [200] * 5
    assert authd.count("keys_fetch_failed") == 0

    # +70 s: the refresh was due at 60 s and fails (then retries with backoff); the last good
    # set serves on: users are not affected.
    clock.set(70)
    failed = authd.wait_for_event("keys_fetch_failed")
    assert failed["keys_usable"] is True
    stale_but_good = [visit(token=token) for _ in range(5)]
    assert {(v.status, v.audit["decision"]) for v in stale_but_good} == {(200, "allow")}
    assert all(v.received.values("x-authd-email") == ["alice@example.com"] for v in stale_but_good)
    text = authd.metrics()
    assert metric(text, "authd_key_fetches_total", issuer=ISSUER, result="error") >= 1
    assert metric(text, "authd_keys_usable", issuer=ISSUER) == 1
    assert ready(visit.stack)[0] == 200

    # +130 s: past refresh + max_stale: fail closed, never a 200.
    clock.set(130)
    refused = [visit(token=token) for _ in range(10)]
    refused.append(visit(token=make_token(headers={"kid": "a-stranger"}, ttl=3600)))
    assert [v.status for v in refused] == [500] * 11
    assert all(v.received is None for v in refused)
    for v in refused:
        assert (v.audit["decision"], v.audit["status"]) == ("error", 503)
        assert v.audit["reason"] == "keys_unavailable"
        assert "past max_stale_seconds" in v.audit["detail"]
    assert authd.count("keys_refetch") == 0  # a stale set refuses before looking at the kid
    direct = authd.request("/auth/wiki", headers={"Cf-Access-Jwt-Assertion": token})
    assert (direct.status, direct.header("x-authd-reason")) == (503, "keys_unavailable")
    no_token = visit()
    assert (no_token.status, no_token.audit["reason"]) == (401, "no_token")
    status, body = ready(visit.stack)
    assert status == 503
    assert body["issuers"][ISSUER]["usable"] is False
    assert body["issuers"][ISSUER]["last_error"]

    def usable_metric() -> str | None:  # the gauge follows within a heartbeat (2 s)
        text = authd.metrics()
        return text if metric(text, "authd_keys_usable", issuer=ISSUER) == 0 else None

    text = wait_for(usable_metric, what="authd_keys_usable to drop to 0", timeout=10)
    assert decisions(text, decision="error", reason="keys_unavailable") == 12  # and `direct`
    assert decisions(text, decision="allow") == 11
    assert metric(text, "authd_key_fetches_total", result="error") >= authd.count(
        "keys_fetch_failed"
    )
    assert metric(text, "authd_key_fetches_total", result="ok") == 1

    # The endpoint returns: the next retry (backoff at most a minute: move past it) restores
    # service, without a restart.
    key_server.up()
    clock.set(200)
    visits = visit.until(200, token=token, timeout=20)
    assert {v.status for v in visits[:-1]} <= {500}
    assert authd.metric("authd_key_fetches_total", result="ok") == 2


# --- 3. the key endpoint hangs beyond the fetch timeout ---


def test_a_hung_key_endpoint_does_not_hold_up_known_keys(key_server, drill, make_token, next_key):
    """A stranger's kid starts a refetch that the key server holds past the fetch timeout;
    meanwhile requests with the known kid are answered, while authd still waits for it."""
    # A fetch timeout far beyond what the visits below need even on a loaded machine.
    visit = drill(refetch_cooldown_seconds=1, fetch_timeout_seconds=10)
    authd = visit.stack.authd
    token = make_token()
    fetches = key_server.request_count
    key_server.hang()

    with ThreadPoolExecutor(1) as pool:
        stranger = pool.submit(visit, token=make_token(key=next_key))
        wait_for(lambda: key_server.in_flight == 1, what="authd's refetch to be held")
        known = [visit(token=token) for _ in range(10)]
        # Still held by the key server, and authd has not given up on it yet: every one of
        # those requests was answered while the fetch was in flight.
        assert key_server.in_flight == 1
        assert authd.count("keys_fetch_failed") == 0
        held = stranger.result(timeout=30)

    assert {(v.status, v.audit["reason"]) for v in known} == {(200, None)}
    assert all(v.received.values("x-authd-email") == ["alice@example.com"] for v in known)
    # The stranger waited for the refetch (at most 3 s), then was refused, not failed.
    assert (held.status, held.audit["reason"]) == (401, "unknown_kid")

    failed = authd.wait_for_event("keys_fetch_failed", timeout=25)
    assert failed["error"] == "timed out after 10s"
    assert failed["keys_usable"] is True
    assert visit(token=token).status == 200
    key_server.release()
    assert key_server.request_count == fetches + 1
    text = authd.metrics()
    assert metric(text, "authd_key_fetches_total", issuer=ISSUER, result="error") == 1
    assert metric(text, "authd_keys_usable", issuer=ISSUER) == 1
    assert decisions(text, decision="allow") == len(known) + 1
    assert decisions(text, reason="unknown_kid") == 1


# --- 5. rotation ---


def test_rotation_new_kid_removed_kid_and_new_material(  # noqa: PLR0917 - pytest's fixtures
    tmp_path, key_server, drill, make_token, dev_key, next_key
):
    """A new kid: allowed after exactly one refetch. A kid dropped from the set, and a kid whose
    key material changed: both follow the set at the next scheduled refresh (Cache-Control
    max-age=5 is raised to the 60 s floor); authd's clock is moved to it."""
    third = DevKey.create(tmp_path / "third")
    clock = FakeTime(tmp_path, monotonic=True)
    key_server.serve_jwks(dev_key.jwks, max_age=5)
    visit = drill(env=clock.env)  # refresh 3600 s, cooldown 60 s: max-age decides
    authd = visit.stack.authd
    assert authd.wait_for_event("keys_fetched")["next_refresh_s"] == 60
    old = make_token(ttl=3600)  # dev_key's kid
    assert visit(token=old).status == 200

    # The issuer publishes a new key (kid N) and signs with it: one refetch, then 200.
    key_server.serve_jwks(jwks_of(next_key, dev_key), max_age=5)
    fetches = key_server.request_count
    new = make_token(key=next_key, ttl=3600)
    first = visit(token=new)
    assert first.status == 200
    assert first.received.values("x-authd-email") == ["alice@example.com"]
    assert first.audit["kid"] == next_key.kid
    assert key_server.request_count == fetches + 1
    assert authd.count("keys_refetch") == 1
    assert [visit(token=t).status for t in (new, old, new)] == [200] * 3
    assert key_server.request_count == fetches + 1  # known kids never fetch

    # The issuer drops the old kid and puts new material under kid N.
    key_server.serve_jwks({"keys": [{**third.jwk, "kid": next_key.kid}]}, max_age=5)
    rekeyed = make_token(key=third, headers={"kid": next_key.kid}, ttl=3600)

    # +30 s: no refresh yet; authd serves the set it has.
    clock.set(30)
    before = {name: visit(token=t) for name, t in (("old", old), ("new", new), ("re", rekeyed))}
    assert {n: (v.status, v.audit["reason"]) for n, v in before.items()} == {
        "old": (200, None),
        "new": (200, None),
        "re": (401, "bad_signature"),
    }
    assert key_server.request_count == fetches + 1

    # +70 s: the refresh, due 60 s after the first fetch, takes the new set.
    clock.set(70)
    wait_for(lambda: key_server.request_count == fetches + 2, what="the scheduled refresh")
    wait_for(lambda: authd.count("keys_fetched") == 3, what="the refreshed set")  # start, refetch
    refreshed = [e for e in authd.events() if e.get("event") == "keys_fetched"][-1]
    assert refreshed["changed"] is True
    assert len(refreshed["kids"]) == 1
    after = {name: visit(token=t) for name, t in (("old", old), ("new", new), ("re", rekeyed))}
    assert {n: (v.status, v.audit["reason"]) for n, v in after.items()} == {
        "old": (401, "unknown_kid"),
        "new": (401, "bad_signature"),
        "re": (200, None),
    }
    assert after["re"].received.values("x-authd-email") == ["alice@example.com"]
    # The dropped kid is a stranger now: it may cost one refetch (the cooldown has passed).
    assert key_server.request_count <= fetches + 3
    text = authd.metrics()
    assert metric(text, "authd_key_fetches_total", result="ok") == key_server.request_count
    assert metric(text, "authd_key_fetches_total", result="error") == 0
    assert decisions(text, reason="bad_signature") == 2
    assert decisions(text, reason="unknown_kid") == 1
    assert decisions(text, decision="allow") == 8


# --- 6. a flood of random kids ---

FLOOD_WORKERS = 2
FLOOD_COOLDOWN = 2


def test_a_flood_of_random_kids(tmp_path, key_server, drill, make_token):
    """wrk sends thousands of tokens with random kids (16 connections) while a user keeps
    visiting: at most one fetch per cooldown per worker, the user always gets 200, and the
    workers' memory stays flat. Decisions go to an audit file (far too many for stdout)."""
    audit_file = tmp_path / "audit.log"
    visit = drill(
        workers=FLOOD_WORKERS, refetch_cooldown_seconds=FLOOD_COOLDOWN, audit_file=audit_file
    )
    stack = visit.stack
    authd = stack.authd
    wait_for(lambda: authd.count("started") == FLOOD_WORKERS, what="both workers")
    token = make_token(ttl=3600)
    initial_fetches = key_server.request_count
    assert initial_fetches == FLOOD_WORKERS
    started = time.monotonic()

    def flood(seconds: int) -> dict[int, int]:
        return wrk_flood(
            stack.url, "/wiki/flood", token, workdir=tmp_path, seconds=seconds, connections=16
        )

    warm = flood(3)  # first refetches, allocator and caches warmed up
    pids = [authd.pid, *authd.worker_pids()]
    rss_before = {pid: rss_bytes(pid) for pid in pids}
    with ClientLoad(stack.nginx.port, valid_token=token, invalid_token=None, threads=1) as user:
        statuses = flood(7)
        user.wait_for_more(5)
    rss_after = {pid: rss_bytes(pid) for pid in pids}
    fetches = key_server.request_count - initial_fetches
    elapsed = time.monotonic() - started

    flooded = sum(warm.values()) + sum(statuses.values())
    assert set(warm) | set(statuses) == {401}
    assert flooded >= 2000
    # Each worker refetches at most once per cooldown: in `elapsed` seconds, at most
    # elapsed/cooldown + 1 times each. And the flood did make them refetch.
    assert 1 <= fetches <= FLOOD_WORKERS * (elapsed / FLOOD_COOLDOWN + 1)
    seen = user.sent()
    assert len(seen) >= 5
    assert {s.status for s in seen} == {200}
    for pid in pids:
        assert rss_after[pid] <= rss_before[pid] * 1.10 + 4 * 2**20, (pid, rss_before, rss_after)

    assert set(authd.worker_pids()) == set(pids[1:])  # no worker died or was replaced

    # Once the last requests nginx still had in flight are decided: one complete audit line per
    # decision, and the metrics count the same.
    def settled() -> tuple[list[dict], str] | None:
        text = authd.metrics()
        written = audit_file.read_text().split("\n")[:-1]  # whole lines only
        lines = [json.loads(line) for line in written]
        return (lines, text) if len(lines) == decisions(text) else None

    lines, text = wait_for(settled, what="the audit file and the metrics to agree", timeout=10)
    assert all(complete(line) for line in lines)
    by_reason = Counter((line["status"], line["reason"]) for line in lines)
    assert set(by_reason) == {(401, "unknown_kid"), (200, None)}
    assert by_reason[200, None] == len(seen)
    assert by_reason[401, "unknown_kid"] >= flooded  # wrk drops answers in flight at its end
    assert decisions(text, reason="unknown_kid") == by_reason[401, "unknown_kid"]
    assert decisions(text, decision="allow") == len(seen)
    assert metric(text, "authd_key_fetches_total", result="ok") == key_server.request_count
    assert metric(text, "authd_keys_usable", issuer=ISSUER) == 1
    refetches = key_server.request_count - initial_fetches  # also any after `elapsed`
    wait_for(lambda: authd.count("keys_refetch") == refetches, what="a keys_refetch per fetch")


# --- 7. SIGTERM under load ---


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_sigterm_under_load_answers_what_it_accepted(  # noqa: PLR0917 - pytest's fixtures
    key_server, drill, make_token, dev_key, next_key, workers
):
    """Clients with valid and badly signed tokens keep coming while authd gets SIGTERM; one
    request is inside authd (waiting for a refetch the key server holds) at that moment."""
    visit = drill(workers=workers, refetch_cooldown_seconds=1, fetch_timeout_seconds=8)
    authd = visit.stack.authd
    wait_for(lambda: authd.count("started") == workers, what="every worker to serve")
    valid = make_token(ttl=3600)
    forged = make_token(key=next_key, headers={"kid": dev_key.kid}, ttl=3600)  # bad_signature

    with ClientLoad(visit.stack.nginx.port, valid_token=valid, invalid_token=forged) as load:
        load.wait_for_more(200)
        key_server.hang()
        with ThreadPoolExecutor(1) as pool:
            stranger = pool.submit(visit, token=make_token(key=next_key))
            wait_for(lambda: key_server.in_flight == 1, what="a request waiting inside authd")
            text = authd.metrics()
            os.kill(authd.pid, signal.SIGTERM)
            wait_for(lambda: not authd.running(), what="authd to exit", timeout=20)
            load.wait_for_more(40)  # and after it is gone
            held = stranger.result(timeout=30)
    sent = load.sent()
    key_server.release()

    assert authd.process.returncode in {0, -signal.SIGTERM}
    assert authd.count("stopped") == workers
    assert not [e for e in authd.events() if e.get("level") in {"error", "critical"}]
    assert "Traceback" not in authd.all_output()

    # The request inside authd at SIGTERM was answered, and audited.
    assert (held.status, held.audit["reason"]) == (401, "unknown_kid")

    # Every answer is right or fails closed; no request went unanswered by nginx.
    statuses = assert_right_or_failed_closed(sent)
    # At least the ones sent after authd was gone (one per thread may have been answered before).
    assert statuses[True, 500] + statuses[False, 500] >= 40 - load.threads

    # Exactly one complete audit line for every request authd answered, saying what the client
    # saw; none for a request it did not answer.
    by_uri = lines_by_uri(authd.audit_lines())
    for s in sent:
        lines = by_uri.pop(s.path, [])
        if s.status == 500:
            assert lines == [], s
        else:
            assert len(lines) == 1, s
            assert complete(lines[0])
            assert (lines[0]["status"], lines[0]["decision"]) == (s.status, DECISION_OF[s.status])
    assert list(by_uri) == [held.path]  # no line for anything else

    # /metrics just before SIGTERM: no error decisions, nothing counted that is not audited.
    audited = authd.audit_lines()
    assert decisions(text, decision="error") == 0
    assert decisions(text, decision="allow") <= sum(1 for a in audited if a["status"] == 200)
    assert decisions(text, decision="deny") <= sum(1 for a in audited if a["status"] == 401)


# --- 8. a worker killed under load ---


def answering_workers(authd, token: str, tries: int = 400) -> set[int]:
    """Ask authd directly, a fresh connection each time (nginx would reuse one, so one worker),
    until every worker has answered 200 (or `tries` ran out); the pids that answered."""
    workers, answered = set(authd.worker_pids()), set()
    for n in range(tries):
        request_id = f"every-worker-{n}-{time.monotonic_ns()}"
        headers = {"Cf-Access-Jwt-Assertion": token, "X-Request-ID": request_id}
        assert http_request(authd.listen, "/auth/wiki", headers=headers).status == 200
        (line,) = authd.wait_for_audit(lambda e, r=request_id: e.get("request_id") == r)
        answered.add(line["pid"])
        if answered == workers:
            break
    return answered


def test_a_worker_killed_under_load(drill, make_token, next_key, dev_key):
    visit = drill(workers=2)
    stack = visit.stack
    authd = stack.authd
    wait_for(lambda: authd.count("started") == 2, what="both workers")
    valid = make_token(ttl=3600)
    forged = make_token(key=next_key, headers={"kid": dev_key.kid}, ttl=3600)  # bad_signature

    with ClientLoad(stack.nginx.port, valid_token=valid, invalid_token=forged) as load:
        load.wait_for_more(200)
        victim = authd.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        died = authd.wait_for_event("worker_died")
        wait_for(lambda: authd.count("started") == 3, what="a new worker to serve")
        load.wait_for_more(200)
    sent = load.sent()

    assert died["pid"] == victim
    assert died["exit"] == "killed by SIGKILL"
    assert_right_or_failed_closed(sent)

    # Service resumes: every worker (the new one included) answers, and through nginx all 200.
    workers = set(authd.worker_pids())
    assert victim not in workers
    assert len(workers) == 2
    assert answering_workers(authd, valid) == workers
    assert [visit(token=valid).status for _ in range(10)] == [200] * 10

    # Audit: one complete line per answered request, matching the client's status. A request
    # the victim had decided (and audited) but not yet sent may have been retried by nginx on
    # the other worker: then its second line, from a live worker, is what the client saw.
    lines = authd.audit_lines()
    by_uri = lines_by_uri(lines)
    for s in sent:
        found = by_uri.get(s.path, [])
        live = [line for line in found if line["pid"] != victim]
        assert all(complete(line) for line in found)
        assert len(found) - len(live) <= 1, found
        if s.status == 500:
            assert live == [], s
        else:
            assert len(live) == 1 or (len(found) == 1 and found[0]["pid"] == victim), found
            assert found[-1]["status"] == s.status, (s, found)
    # Metrics add up over the dead and live workers: every decision counted and audited (the
    # victim may have counted one it was killed before auditing).
    text = authd.metrics()
    total = decisions(text)
    assert len(lines) <= total <= len(lines) + 1
    assert decisions(text, decision="error") == 0
    assert metric(text, "authd_keys_usable", issuer=ISSUER) == 1
    assert authd.count("worker_died") == 1


# --- 10. clock skew ---


def test_clock_skew_within_and_beyond_the_leeway(tmp_path, drill, make_token, make_claims, dev_key):
    """authd's wall clock (only its wall clock) is moved against true time, where the tokens
    were minted; the leeway is 30 s."""
    clock = FakeTime(tmp_path, monotonic=False)
    visit = drill(env=clock.env, leeway_seconds=30)
    authd = visit.stack.authd
    # iat = nbf = now, exp = now + 120; and one without nbf (as service tokens come).
    minted = time.time()
    token = make_token(ttl=120)
    without_nbf = dev_key.sign({k: v for k, v in make_claims(ttl=120).items() if k != "nbf"})

    def at(offset: int) -> tuple[tuple[int, str | None], tuple[int, str | None]]:
        """authd's clock at `offset` seconds from the minting, however long the test runs."""
        clock.set(round(offset - (time.time() - minted)))
        seen = [visit(token=token), visit(token=without_nbf)]
        for v in seen:  # authd's own clock: the audit line's timestamp
            stamped = datetime.fromisoformat(v.audit["timestamp"]).timestamp()
            assert abs(stamped - minted - offset) < 10, (offset, v.audit["timestamp"])
        return tuple((v.status, v.audit["reason"]) for v in seen)

    allowed = ((200, None), (200, None))
    assert at(0) == allowed
    assert at(-20) == allowed  # authd 20 s behind: nbf and iat 20 s ahead, within the leeway
    assert at(-50) == ((401, "not_yet_valid"), (401, "issued_in_future"))
    assert at(140) == allowed  # 20 s past exp, within the leeway
    assert at(170) == ((401, "expired"), (401, "expired"))
    assert at(86400) == ((401, "expired"), (401, "expired"))
    # Only the wall clock moved: a day ahead, the key set (aged by the monotonic clock) is
    # as fresh as ever.
    status, body = ready(visit.stack)
    assert status == 200
    assert body["issuers"][ISSUER]["key_set_age_s"] < 60
    assert at(0) == allowed

    text = authd.metrics()
    assert decisions(text, decision="allow") == 8
    assert decisions(text, reason="not_yet_valid") == 1
    assert decisions(text, reason="issued_in_future") == 1
    assert decisions(text, reason="expired") == 4
    assert metric(text, "authd_keys_usable", issuer=ISSUER) == 1


@pytest.mark.parametrize("monotonic", [False, True], ids=["wall-clock", "both-clocks"])
def test_faketime_moves_the_clocks_of_the_process_it_is_preloaded_into(tmp_path, monotonic):
    """What the clock drills rely on: a Python child's time.time() follows the offset as the
    test moves it, and so does its time.monotonic() only when asked; this process keeps the
    true time."""
    clock = FakeTime(tmp_path, monotonic=monotonic)
    clock.set(600)
    child = subprocess.Popen(
        [sys.executable, "-c", _CLOCK_READER],
        env={**os.environ, **clock.env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wall, mono = map(float, child.stdout.readline().split())
        assert abs(wall - (time.time() + 600)) < 10
        clock.set(4200)  # an hour on
        child.stdin.write("\n")
        child.stdin.flush()
        wall2, mono2 = map(float, child.stdout.readline().split())
    finally:
        child.kill()
        child.wait()
    assert abs(wall2 - (time.time() + 4200)) < 10
    assert abs((mono2 - mono) - (3600 if monotonic else 0)) < 10


# Prints time.time() and time.monotonic(), then again after a line on stdin.
_CLOCK_READER = """
import sys, time
print(time.time(), time.monotonic(), flush=True)
sys.stdin.readline()
print(time.time(), time.monotonic(), flush=True)
"""
