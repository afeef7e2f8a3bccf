"""The deb on a booted, clean Debian 12: install, nginx through socket activation, readiness,
the journal, reload, restart, the sandbox. One container for the module; each test leaves
authd configured as setup_operator() did."""

from __future__ import annotations

import json
import time

import pytest
from debops import (
    CONNECT_PROXY,
    KEY_SERVER,
    KEYS,
    TLS_KEY_SERVER,
    authd_socket_get,
    config,
    exposure,
    get,
    get_token,
    install_deb,
    journal_cursor,
    journal_events,
    main_pid,
    make_test_ca,
    mint,
    setup_operator,
    write_config,
)

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def fresh(boot, packages):
    """A clean Debian 12 with nginx, booted; the deb copied in but not installed yet."""
    c = boot("debian")
    c.copy_in(packages.deb, "/root/authd.deb")
    return c


@pytest.fixture(scope="module")
def nginx_before(fresh):
    return fresh.out("nginx -T 2>/dev/null")


@pytest.fixture(scope="module")
def debian(fresh, nginx_before):  # noqa: ARG001 -- nginx's configuration is recorded first
    """authd installed with apt (after nginx's configuration was recorded)."""
    install_deb(fresh, "/root/authd.deb")
    return fresh


def restart(c) -> None:
    c.run("systemctl restart authd.service", timeout=120)


def test_install_enables_and_starts_both_units_unconfigured(debian):
    c = debian
    assert c.out("systemctl is-enabled authd.socket authd.service").split() == [
        "enabled",
        "enabled",
    ]
    c.wait_until(
        "authd.service active",
        lambda: (
            c.out("systemctl is-active authd.socket authd.service", check=False).split()
            == ["active", "active"]
        ),
    )
    # Not configured yet: it runs, says so, and denies.
    assert c.authd_status().startswith("not configured")
    assert authd_socket_get(c, "/auth/anything").status in {401, 403}
    assert authd_socket_get(c, "/healthz").status == 200


def test_install_creates_user_socket_and_protected_config(debian):
    c = debian
    passwd = c.out("getent passwd authd").split(":")
    assert passwd[0] == "authd"
    assert passwd[5] == "/nonexistent"
    assert passwd[6] in {"/usr/sbin/nologin", "/sbin/nologin"}
    assert c.out("getent group authd").startswith("authd:")
    assert c.out("stat -c '%A %U %G' /run/authd/authd.sock") == "srw-rw---- root www-data"
    assert c.out("stat -c '%a %U %G' /etc/authd/authd.toml") == "640 root authd"
    assert c.out("authd check-config").endswith("listen unix:/run/authd/authd.sock)")
    assert c.out("readlink -f /usr/bin/authd") == "/opt/authd/bin/authd"
    assert c.out("head -1 /opt/authd/bin/authd") == "#!/opt/authd/bin/python"
    # The venv runs on the distribution's interpreter, with the package's bytecode.
    assert "home = /usr/bin" in c.out("cat /opt/authd/pyvenv.cfg")
    code = "import authd.cli; print(authd.cli.__cached__, authd.cli.main.__code__.co_filename)"
    cached, source = c.out(f"/opt/authd/bin/python -c '{code}'").split()
    assert cached.startswith("/opt/authd/lib/python3.11/site-packages/authd/__pycache__/")
    assert source == "/opt/authd/lib/python3.11/site-packages/authd/cli.py"


def test_install_leaves_nginx_alone(debian, nginx_before):
    assert debian.out("nginx -T 2>/dev/null") == nginx_before
    assert debian.out("ls /etc/nginx/authd").split() == [
        "authd-http-microcache.conf",
        "authd-http.conf",
        "authd-location-fastcgi.conf",
        "authd-location-uwsgi.conf",
        "authd-location.conf",
        "authd-server-microcache.conf",
        "authd-server.conf",
    ]
    assert "server unix:/run/authd/authd.sock;" in debian.out(
        "cat /etc/nginx/authd/authd-http.conf"
    )


@pytest.fixture(scope="module")
def configured(debian):
    setup_operator(debian)
    debian.run("systemctl reload authd.service")
    debian.wait_until(
        "the reloaded configuration",
        lambda: debian.authd_status().startswith("ready"),
    )
    return debian


def test_nginx_location_is_protected_through_socket_activation(configured):
    c = configured
    started = time.monotonic()
    c.run("systemctl stop authd.service")
    # SIGTERM: a clean, prompt stop (authd drains for at most 10 s), not a kill at 20 s.
    assert time.monotonic() - started < 12
    assert c.show("authd.service", "Result") == "success"
    assert c.out("systemctl is-active authd.service", check=False) == "inactive"
    assert c.out("systemctl is-active authd.socket") == "active"

    # The first connection starts authd; nginx's request waits in the socket's backlog.
    token = mint(c)
    ok = get_token(c, token)
    assert ok.status == 200, ok
    assert "email=alice@example.com user=alice@example.com policy=app" in ok.body
    assert "cf=alice@example.com" in ok.body
    # With workers, the first one answers while the supervisor still waits for the others
    # before it says READY=1 (the service is "activating" until then).
    c.wait_until(
        "authd.service active",
        lambda: c.out("systemctl is-active authd.service", check=False) == "active",
    )
    assert "authd.socket" in c.show("authd.service", "TriggeredBy")

    denied = get(c)
    assert denied.status == 401
    forged = get(c, "/app/", "X-Authd-Email: mallory@example.com")
    assert forged.status == 401
    spoofed = get_token(c, token, "X-Authd-Email: mallory@example.com")
    assert spoofed.status == 200
    assert "email=alice@example.com" in spoofed.body
    assert "mallory" not in spoofed.body
    assert get_token(c, mint(c, "eve@evil.example")).status == 403


def test_ready_is_sent_after_the_keys_are_loaded(configured):
    c = configured
    c.write("/root/keyserver.py", KEY_SERVER)
    c.run(f"systemd-run --unit=slow-keys python3.11 /root/keyserver.py 8091 3 {KEYS}/jwks.json")
    c.wait_until(
        "the key server",
        lambda: (
            c.run(
                "curl -sf -o /dev/null --max-time 10 http://127.0.0.1:8091/", check=False
            ).returncode
            == 0
        ),
    )
    write_config(c, config(jwks='jwks_url = "http://127.0.0.1:8091/certs"'))
    try:
        started = time.monotonic()
        restart(c)  # returns once systemd has READY=1
        took = time.monotonic() - started
        assert took >= 3, f"systemctl restart returned after {took:.1f} s, before the keys"
        assert c.authd_status() == "ready: keys loaded for 1 issuer(s)"
        assert authd_socket_get(c, "/readyz").status == 200
        assert get_token(c, mint(c)).status == 200
    finally:
        write_config(c, config())
        c.run("systemctl stop slow-keys.service")
        restart(c)


def test_a_hung_key_endpoint_does_not_time_the_start_out(configured):
    c = configured
    c.run(f"systemd-run --unit=hung-keys python3.11 /root/keyserver.py 8092 600 {KEYS}/jwks.json")
    write_config(
        c,
        config(jwks='jwks_url = "http://127.0.0.1:8092/certs"\nfetch_timeout_seconds = 2'),
    )
    try:
        started = time.monotonic()
        restart(c)
        took = time.monotonic() - started
        assert took < 30, f"the start took {took:.1f} s"
        assert c.out("systemctl is-active authd.service") == "active"
        assert c.authd_status().startswith("waiting for keys")
        assert authd_socket_get(c, "/readyz").status == 503
        # authd answers 503 for a token it cannot check yet; nginx turns that into 500.
        assert get_token(c, mint(c)).status == 500
        assert get(c).status == 401
    finally:
        write_config(c, config())
        c.run("systemctl stop hung-keys.service")
        restart(c)


def test_keys_over_https_through_the_proxy_with_the_system_ca_store(configured):
    """HTTPS_PROXY from /etc/default/authd, and a CA that only the system store trusts."""
    c = configured
    host = "keys.example.test"  # resolvable by nobody: only the proxy can reach it
    make_test_ca(c, host)
    c.write("/root/tls-keyserver.py", TLS_KEY_SERVER)
    c.write("/root/proxy.py", CONNECT_PROXY)
    c.run(
        "systemd-run --unit=tls-keys python3.11 /root/tls-keyserver.py 8443 "
        f"/root/tls/server.crt /root/tls/server.key {KEYS}/jwks.json && "
        "systemd-run --unit=proxy python3.11 /root/proxy.py 3128 8443 /root/proxy.log"
    )
    default = c.path("/etc/default/authd").read_text()
    c.write("/etc/default/authd", default + "HTTPS_PROXY=http://127.0.0.1:3128\n")
    write_config(c, config(jwks=f'jwks_url = "https://{host}/certs"'))
    try:
        restart(c)
        assert c.authd_status() == "ready: keys loaded for 1 issuer(s)"
        assert f"CONNECT {host}:443" in c.out("cat /root/proxy.log")
        assert get_token(c, mint(c)).status == 200
    finally:
        c.write("/etc/default/authd", default)
        write_config(c, config())
        c.run("systemctl stop proxy.service tls-keys.service")
        restart(c)


def test_audit_lines_are_in_the_journal(configured):
    c = configured
    cursor = journal_cursor(c)
    assert get_token(c, mint(c, "carol@example.com")).status == 200
    assert get(c).status == 401

    def decisions():
        return [e for e in journal_events(c, cursor) if e.get("event") == "decision"]

    c.wait_until("two decision lines", lambda: len(decisions()) >= 2)
    allow, deny = decisions()[-2:]
    assert allow["decision"] == "allow"
    assert allow["email"] == "carol@example.com"
    assert allow["policy"] == "app"
    assert allow["uri"] == "/app/"
    assert deny["decision"] == "deny"
    assert deny["reason"] == "no_token"
    assert deny["status"] == 401


def test_authd_logs_shows_the_audit_stream(configured):
    c = configured
    assert get(c).status == 401
    assert get_token(c, mint(c, "dave@example.com")).status == 200
    out = c.out("authd logs --json --decision deny --since 10m")
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines, "authd logs printed nothing"
    assert all(line["decision"] == "deny" for line in lines)
    assert any(line["reason"] == "no_token" for line in lines)
    text = c.out("authd logs --text --user dave@example.com --since 10m")
    assert "dave@example.com" in text
    assert "allow" in text
    assert "no_token" not in text


def test_reload_with_a_bad_config_keeps_serving(configured):
    c = configured
    pid = main_pid(c)
    write_config(c, config() + "\nbogus_key = 1\n")
    try:
        reload = c.run("systemctl reload authd.service", check=False)
        assert reload.returncode != 0, "systemctl reload accepted an invalid configuration"
        assert main_pid(c) == pid
        assert c.out("systemctl is-active authd.service") == "active"
        assert "bogus_key" in c.out("journalctl -u authd.service -o cat -n 30 --no-pager")
        assert get_token(c, mint(c)).status == 200

        # A plain SIGHUP (kill -HUP, logrotate) with the bad file: logged, still serving.
        cursor = journal_cursor(c)
        c.run("systemctl kill --kill-whom=main --signal=SIGHUP authd.service")
        c.wait_until(
            "reload_failed in the journal",
            lambda: any(e.get("event") == "reload_failed" for e in journal_events(c, cursor)),
        )
        assert main_pid(c) == pid
        assert get_token(c, mint(c)).status == 200
    finally:
        write_config(c, config())

    # A good configuration is applied by the reload, without a restart.
    write_config(c, config(policy='allow_emails = ["bob@example.com"]'))
    try:
        c.run("systemctl reload authd.service")
        c.wait_until("the new policy", lambda: get_token(c, mint(c)).status == 403)
        assert get_token(c, mint(c, "bob@example.com")).status == 200
        assert main_pid(c) == pid
    finally:
        write_config(c, config())
        c.run("systemctl reload authd.service")
        c.wait_until("the old policy", lambda: get_token(c, mint(c)).status == 200)


def test_the_watchdog_is_fed(configured):
    c = configured
    assert c.show("authd.service", "WatchdogUSec") == "30s"
    first = int(c.show("authd.service", "WatchdogTimestampMonotonic"))
    # authd pings every WatchdogSec/2 = 15 s.
    c.wait_until(
        "a WATCHDOG=1 ping",
        lambda: int(c.show("authd.service", "WatchdogTimestampMonotonic")) > first,
        timeout=20,
    )


def test_a_killed_authd_is_restarted(configured):
    c = configured
    pid = main_pid(c)
    restarts = int(c.show("authd.service", "NRestarts"))
    c.run(f"kill -9 {pid}")
    c.wait_until(
        "a new authd",
        lambda: (
            main_pid(c) not in {0, pid}
            and c.out("systemctl is-active authd.service", check=False) == "active"
        ),
    )
    assert int(c.show("authd.service", "NRestarts")) == restarts + 1
    assert get_token(c, mint(c)).status == 200


def test_the_sandbox_applies_and_scores(configured):
    c = configured
    pid = main_pid(c)
    status = dict(line.split(":\t", 1) for line in c.out(f"cat /proc/{pid}/status").splitlines())
    uid = c.out("id -u authd")
    assert status["Uid"].split()[0] == uid
    assert status["CapEff"].strip() == "0000000000000000"
    assert status["CapBnd"].strip() == "0000000000000000"
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"
    # mountinfo: ID PARENT DEV ROOT MOUNTPOINT OPTIONS...
    mounts = {
        fields[4]: fields[5].split(",")
        for fields in (line.split() for line in c.out(f"cat /proc/{pid}/mountinfo").splitlines())
    }
    assert "ro" in mounts["/"], "the root is writable for authd"
    assert "rw" in mounts["/var/log/authd"], "LogsDirectory is not writable"
    assert "rw" in mounts["/tmp"], "no private /tmp"
    # MemoryDenyWriteExecute and the syscall filter hold while RS256 verification works:
    # cryptography's bindings run under them (the 200s above); the score of the loaded unit:
    assert exposure(c) <= 1.2
    verify = c.run(
        "systemd-analyze verify --man=no /lib/systemd/system/authd.socket "
        "/lib/systemd/system/authd.service",
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    assert "authd" not in verify.stderr, verify.stderr


def test_local_keys_dropin_takes_the_network_away(configured):
    c = configured
    c.run(
        "mkdir -p /etc/systemd/system/authd.service.d && cp /usr/share/authd/authd-local-keys.conf"
        " /etc/systemd/system/authd.service.d/local-keys.conf && systemctl daemon-reload"
    )
    try:
        restart(c)
        pid = main_pid(c)
        interfaces = [
            line.split(":")[0].strip()
            for line in c.out(f"cat /proc/{pid}/net/dev").splitlines()[2:]
        ]
        assert interfaces == ["lo"]
        assert exposure(c) <= 0.3
        assert get_token(c, mint(c)).status == 200
    finally:
        c.run("rm -r /etc/systemd/system/authd.service.d && systemctl daemon-reload")
        restart(c)


def test_workers_share_the_socket(configured):
    c = configured
    write_config(c, config(top="workers = 2"))
    try:
        restart(c)
        pid = main_pid(c)
        c.wait_until(
            "two workers",
            lambda: len(c.out(f"cat /proc/{pid}/task/{pid}/children").split()) == 2,
        )
        for _ in range(10):
            assert get_token(c, mint(c)).status == 200
        metrics = authd_socket_get(c, "/metrics").body
        assert 'authd_decisions_total{decision="allow",policy="app",reason=""}' in metrics
        c.run("systemctl reload authd.service")
        assert main_pid(c) == pid
        assert get_token(c, mint(c)).status == 200
    finally:
        write_config(c, config())
        restart(c)


def test_audit_file_and_logrotate(configured):
    c = configured
    write_config(c, config(top='audit_file = "/var/log/authd/audit.log"'))
    try:
        restart(c)
        assert get_token(c, mint(c, "before@example.com")).status == 200
        c.wait_until(
            "the audit file",
            lambda: "before@example.com" in c.out("cat /var/log/authd/audit.log", check=False),
        )
        assert c.out("stat -c '%a %U' /var/log/authd") == "750 authd"
        c.run("logrotate --force /etc/logrotate.d/authd")
        assert "before@example.com" in c.out("cat /var/log/authd/audit.log.1")
        assert get_token(c, mint(c, "after@example.com")).status == 200
        c.wait_until(
            "the reopened audit file",
            lambda: "after@example.com" in c.out("cat /var/log/authd/audit.log", check=False),
        )
        assert "after@example.com" not in c.out("cat /var/log/authd/audit.log.1")
    finally:
        write_config(c, config())
        restart(c)
