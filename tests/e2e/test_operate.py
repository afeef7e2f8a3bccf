"""Operating authd the way systemd does: socket activation, sd_notify, reload, workers, metrics.

authd is started by `systemd-socket-activate` (systemd's own tool: it binds the socket and
hands it over as fd 3, like authd.socket) with a notify socket that records what authd tells
the service manager. The packaged units under a real systemd are tested in tests/system.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from devtools.stack import OPS_AUD, NotifySocket, authd_executable, http_request, wait_for

pytestmark = pytest.mark.e2e

WORKERS = [pytest.param(1, id="one-process"), pytest.param(2, id="two-workers")]


@pytest.fixture
def notify(tmp_path):
    with NotifySocket(tmp_path) as sock:
        yield sock


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def edit_policy(config: Path, old: str, new: str) -> None:
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new))


def authd_reload(config: Path, pid: int) -> subprocess.CompletedProcess[str]:
    """`authd reload`, as the unit's ExecReload runs it."""
    argv = [str(authd_executable()), "reload", "--config", str(config), "--pid", str(pid)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def every_worker_answers(stack, policy: str, token: str, status: int, *, tries: int = 400) -> None:
    """Ask authd directly, a fresh connection each time (nginx would reuse one, so one worker),
    until every worker has answered; every answer must be `status`."""
    workers = set(stack.authd.worker_pids()) or {stack.authd.pid}
    answered: set[int] = set()
    for n in range(tries):
        request_id = f"every-worker-{policy}-{status}-{n}-{time.monotonic_ns()}"
        headers = {"Cf-Access-Jwt-Assertion": token, "X-Request-ID": request_id}
        assert http_request(stack.authd.listen, f"/auth/{policy}", headers=headers).status == status
        (line,) = stack.authd.wait_for_audit(lambda e, r=request_id: e.get("request_id") == r)
        answered.add(line["pid"])
        if answered == workers:
            return
    pytest.fail(f"only workers {sorted(answered)} of {sorted(workers)} answered in {tries} tries")


@pytest.mark.parametrize("workers", WORKERS)
def test_socket_activation_ready_status_and_stop(drill, notify, make_token, workers):
    visit = drill(activated=True, env=notify.env, workers=workers)
    stack = visit.stack

    ready = notify.wait_for("READY")
    assert "keys loaded for 1 issuer(s)" in ready["STATUS"]
    assert ready["MAINPID"] == str(stack.authd.pid)
    seen = visit("/wiki/", token=make_token())
    assert seen.status == 200
    assert seen.received.get("x-authd-email") == "alice@example.com"
    assert visit("/wiki/").status == 401

    stack.authd.process.signal_group(signal.SIGTERM)
    notify.wait_for("STOPPING")
    wait_for(lambda: not stack.authd.running(), what="authd to exit", timeout=15)
    assert stack.authd.count("stopped") == workers


def test_ready_is_sent_when_the_key_endpoint_is_down_at_boot(drill, notify, key_server, make_token):
    key_server.down()
    started = time.monotonic()
    visit = drill(activated=True, env=notify.env, wait_ready=False, fetch_timeout_seconds=2)

    ready = notify.wait_for("READY", timeout=15)
    assert time.monotonic() - started < 10  # bounded by the fetch timeout, not a start job's
    assert ready["STATUS"].startswith("waiting for keys (503 until they arrive): test (")
    assert visit("/wiki/", token=make_token()).status == 500  # fails closed

    key_server.up()
    visit.until(200, token=make_token(), timeout=30)  # authd retries by itself


@pytest.mark.parametrize("workers", WORKERS)
def test_reload_switches_every_worker_to_a_valid_configuration(drill, notify, make_token, workers):
    visit = drill(activated=True, env=notify.env, workers=workers)
    stack = visit.stack
    notify.wait_for("READY")
    assert visit("/ops/", token=make_token(email="carol@example.com", aud=OPS_AUD)).status == 403
    before = len(notify.messages())

    edit_policy(
        stack.config, 'allow_emails = ["alice@example.com"]', 'allow_emails = ["carol@example.com"]'
    )
    result = authd_reload(stack.config, stack.authd.pid)
    assert result.returncode == 0, result.stderr

    notify.wait_for("RELOADING", after=before)
    notify.wait_for("READY", after=before)
    wait_for(lambda: stack.authd.count("reloaded") == workers, what="every worker to reload")
    # Many requests, so that every worker answers some: all of them use the new policy.
    # Every worker, not just the one nginx's keepalive connection happens to reach.
    every_worker_answers(stack, "ops", make_token(email="carol@example.com", aud=OPS_AUD), 200)
    every_worker_answers(stack, "ops", make_token(aud=OPS_AUD), 403)
    assert visit("/ops/", token=make_token(email="carol@example.com", aud=OPS_AUD)).status == 200
    assert stack.authd.count("keys_fetched") >= 2 * workers  # the reload refreshed the keys


@pytest.mark.parametrize("workers", WORKERS)
def test_a_broken_configuration_is_refused_and_the_old_one_keeps_serving(
    drill, notify, make_token, workers
):
    visit = drill(activated=True, env=notify.env, workers=workers)
    stack = visit.stack
    notify.wait_for("READY")
    good = stack.config.read_text()
    stack.config.write_text(good + "\n[policies.broken]\naudience = []\nsurprise = 1\n")

    result = authd_reload(stack.config, stack.authd.pid)
    assert result.returncode == 2
    assert "policies.broken.surprise: unknown key" in result.stderr
    assert "not reloading" in result.stderr

    # A plain SIGHUP (kill -HUP) is checked by authd itself.
    os.kill(stack.authd.pid, signal.SIGHUP)
    failed = stack.authd.wait_for_event("reload_failed")
    assert "policies.broken.surprise: unknown key" in failed["problems"]
    every_worker_answers(stack, "wiki", make_token(), 200)
    assert visit("/wiki/").status == 401
    assert stack.authd.count("reloaded") == 0
    assert stack.authd.running()
    # The refused configuration fetched nothing (a valid reload refetches) and changed nothing.
    text = http_request(stack.authd.listen, "/metrics").body.decode()
    assert metric(text, "authd_key_fetches_total", issuer="test", result="ok") == workers
    assert metric(text, "authd_keys_usable", issuer="test") == 1
    allowed = [line for line in stack.authd.audit_lines() if line["decision"] == "allow"]
    assert metric(text, "authd_decisions_total", decision="allow") == len(allowed)
    assert metric(text, "authd_decisions_total", decision="deny", reason="no_token") == 1


def test_a_killed_worker_is_replaced_without_a_wrong_answer(drill, notify, make_token, next_key):
    visit = drill(activated=True, env=notify.env, workers=2)
    stack = visit.stack
    notify.wait_for("READY")
    victim, survivor = stack.authd.worker_pids()

    os.kill(victim, signal.SIGKILL)
    statuses = set()
    for _ in range(30):
        statuses.add(visit("/wiki/", token=make_token()).status)
        # A forged token is never allowed, whichever worker (or none) answers.
        assert visit("/wiki/", token=make_token(key=next_key), audited=False).status in {
            401,
            500,
            502,
        }

    assert statuses <= {200, 500, 502}
    died = stack.authd.wait_for_event("worker_died")
    assert (died["pid"], died["exit"]) == (victim, "killed by SIGKILL")
    wait_for(lambda: len(stack.authd.worker_pids()) == 2, what="a new worker")
    assert survivor in stack.authd.worker_pids()
    assert all(visit("/wiki/", token=make_token()).status == 200 for _ in range(10))


def test_metrics_add_up_over_every_worker(drill, notify, make_token):
    visit = drill(activated=True, env=notify.env, workers=2)
    stack = visit.stack
    notify.wait_for("READY")
    for _ in range(12):
        assert visit("/wiki/", token=make_token()).status == 200
    for _ in range(5):
        assert visit("/wiki/").status == 401
    assert visit("/nosuch/", token=make_token()).status == 403

    answer = http_request(stack.authd.listen, "/metrics")
    text = answer.body.decode()
    assert answer.status == 200
    assert answer.header("content-type").startswith("text/plain")
    assert metric(text, "authd_decisions_total", policy="wiki", decision="allow") == 12
    assert metric(text, "authd_decisions_total", policy="wiki", reason="no_token") == 5
    assert metric(text, "authd_decisions_total", policy="(unknown)", reason="unknown_policy") == 1
    assert metric(text, "authd_decision_duration_seconds_count") == 18
    assert metric(text, "authd_key_fetches_total", issuer="test", result="ok") == 2  # per worker
    assert metric(text, "authd_keys_usable", issuer="test") == 1
    fetched = metric(text, "authd_keys_last_success_timestamp_seconds", issuer="test")
    assert time.time() - 60 < fetched <= time.time()
    assert metric(text, "authd_build_info") == 1
    # Not reachable through nginx: the auth location is internal, and only ever asks /auth/.
    assert visit("/_authd", audited=False).status == 404


def test_the_audit_file_is_reopened_by_every_worker(drill, notify, tmp_path):
    """logrotate renames the file, then signals authd: a valid reload (SIGHUP), SIGUSR1,
    or a SIGHUP while the configuration is broken; each time every worker moves on to the
    new file."""
    audit = tmp_path / "log" / "audit.log"
    audit.parent.mkdir()
    visit = drill(activated=True, env=notify.env, workers=2, audit_file=audit)
    stack = visit.stack
    notify.wait_for("READY")
    workers = set(stack.authd.worker_pids())

    def every_worker_writes_to_the_new_file() -> None:
        def pids() -> set[int]:
            http_request(stack.authd.listen, "/auth/wiki")  # a fresh connection: any worker
            lines = audit.read_text().splitlines() if audit.exists() else []
            return {json.loads(line)["pid"] for line in lines}

        wait_for(lambda: pids() == workers, what="every worker to write to the new file")

    every_worker_writes_to_the_new_file()

    audit.rename(audit.with_suffix(".log.1"))
    assert authd_reload(stack.config, stack.authd.pid).returncode == 0
    every_worker_writes_to_the_new_file()

    audit.rename(audit.with_suffix(".log.2"))
    os.kill(stack.authd.pid, signal.SIGUSR1)
    every_worker_writes_to_the_new_file()

    audit.rename(audit.with_suffix(".log.3"))
    stack.config.write_text(stack.config.read_text() + "surprise = 1\n")
    os.kill(stack.authd.pid, signal.SIGHUP)
    stack.authd.wait_for_event("reload_failed")
    every_worker_writes_to_the_new_file()

    rotated = [audit.with_suffix(f".log.{n}").read_text() for n in (1, 2, 3)]
    assert all(
        sum(json.loads(line)["event"] == "decision" for line in text.splitlines()) >= 2
        for text in rotated
    )
    assert not stack.authd.audit_lines()  # decisions went to the file, not to stdout
    assert visit("/wiki/", audited=False).status == 401

    # `authd logs` reads it: piped, the matching lines exactly as written.
    shown = subprocess.run(
        [str(authd_executable()), "logs", "--file", str(audit), "--decision", "deny"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert shown == audit.read_text()
    text = subprocess.run(
        [str(authd_executable()), "logs", "--file", str(audit), "--text", "--color", "never"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "401" in text
    assert "no_token" in text
    assert "wiki" in text


@pytest.mark.parametrize("workers", WORKERS)
def test_the_watchdog_is_fed(drill, notify, workers):
    env = {**notify.env, "WATCHDOG_USEC": "2000000"}
    drill(activated=True, env=env, workers=workers)
    notify.wait_for("READY")
    first = notify.wait_for("WATCHDOG", timeout=5)
    count = len([m for m in notify.messages() if m.get("WATCHDOG") == "1"])
    wait_for(
        lambda: len([m for m in notify.messages() if m.get("WATCHDOG") == "1"]) > count,
        what="a second watchdog ping",
        timeout=5,
    )
    assert first == {"WATCHDOG": "1"}


def test_workers_exit_when_their_supervisor_is_killed(drill, notify):
    visit = drill(activated=True, env=notify.env, workers=2)
    stack = visit.stack
    notify.wait_for("READY")
    workers = stack.authd.worker_pids()

    os.kill(stack.authd.pid, signal.SIGKILL)

    def gone(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        return state == "Z"

    wait_for(lambda: all(gone(pid) for pid in workers), what="orphaned workers to exit", timeout=15)
    assert stack.authd.count("supervisor_gone") == 2


def test_a_worker_started_after_a_reload_serves_the_new_configuration(drill, notify, make_token):
    visit = drill(activated=True, env=notify.env, workers=2)
    stack = visit.stack
    notify.wait_for("READY")
    edit_policy(
        stack.config,
        'allow_emails = ["alice@example.com"]',
        'allow_emails = ["carol@example.com"]',
    )
    assert authd_reload(stack.config, stack.authd.pid).returncode == 0
    wait_for(lambda: stack.authd.count("reloaded") == 2, what="both workers to reload")

    os.kill(stack.authd.worker_pids()[0], signal.SIGKILL)
    wait_for(lambda: stack.authd.count("worker_died") == 1, what="the supervisor to notice")
    wait_for(lambda: len(stack.authd.worker_pids()) == 2, what="a new worker")
    wait_for(lambda: stack.authd.count("started") == 3, what="the new worker to serve")
    every_worker_answers(stack, "ops", make_token(email="carol@example.com", aud=OPS_AUD), 200)
    every_worker_answers(stack, "ops", make_token(aud=OPS_AUD), 403)


def test_a_reload_during_startup_is_not_fatal_and_is_carried_out(
    drill, notify, key_server, make_token
):
    key_server.slow(3)  # the first key fetch takes a while: authd is still starting
    visit = drill(activated=True, env=notify.env, wait_ready=False, fetch_timeout_seconds=10)
    stack = visit.stack
    stack.authd.wait_for_event("Waiting for application startup.")  # uvicorn: keys next

    os.kill(stack.authd.pid, signal.SIGHUP)

    notify.wait_for("READY", timeout=20)
    stack.authd.wait_for_event("reloaded")
    assert stack.authd.running()
    assert visit("/wiki/", token=make_token()).status == 200
