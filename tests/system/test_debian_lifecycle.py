"""The deb's maintainer scripts on a booted, clean Debian 12, in order: install, upgrade with an
edited configuration, remove, purge (what debhelper's scripts do for every package)."""

from __future__ import annotations

import pytest
from debops import config, get_token, install_deb, main_pid, mint, setup_operator

pytestmark = pytest.mark.system

EDIT = "# the operator's own note, kept across upgrades\n"


@pytest.fixture(scope="module")
def lifecycle(boot, packages):
    c = boot("lifecycle")
    c.copy_in(packages.deb, "/root/authd_1.deb")
    c.copy_in(packages.deb_upgrade, "/root/authd_2.deb")
    install_deb(c, "/root/authd_1.deb")
    return c


def status(c) -> str:
    """dpkg's two-letter state: ii installed, rc removed with its conffiles, un unknown."""
    return c.out("dpkg-query -W -f='${db:Status-Abbrev}' authd", check=False).strip()


def test_upgrade_keeps_the_edited_config_and_restarts_authd(lifecycle, packages):
    c = lifecycle
    setup_operator(c)
    c.run("systemctl reload authd.service")
    edited = EDIT + config()
    c.run("cat > /etc/authd/authd.toml", input_text=edited)
    c.run("systemctl restart authd.service")
    assert get_token(c, mint(c)).status == 200
    pid = main_pid(c)
    socket_since = c.show("authd.socket", "ActiveEnterTimestampMonotonic")

    install_deb(c, "/root/authd_2.deb")

    assert c.out("dpkg-query -W -f='${Version}' authd") == f"{packages.version}-2"
    assert c.path("/etc/authd/authd.toml").read_text() == edited
    assert not c.path("/etc/authd/authd.toml.dpkg-new").exists()
    assert c.out("stat -c '%a %U %G' /etc/authd/authd.toml") == "640 root authd"
    c.wait_until(
        "authd restarted",
        lambda: (
            main_pid(c) not in {0, pid}
            and c.out("systemctl is-active authd.service", check=False) == "active"
        ),
    )
    # The socket stayed open through the upgrade: nginx never saw a refused connection.
    assert c.show("authd.socket", "ActiveEnterTimestampMonotonic") == socket_since
    assert get_token(c, mint(c)).status == 200


def test_upgrade_leaves_a_disabled_authd_stopped(lifecycle):
    c = lifecycle
    c.run("systemctl disable --now authd.socket authd.service")
    # A reinstall runs the maintainer scripts exactly as an upgrade does.
    c.run("apt-get install -y --reinstall /root/authd_2.deb", timeout=300)
    assert c.out("systemctl is-active authd.service authd.socket", check=False).split() == [
        "inactive",
        "inactive",
    ]
    assert c.out("systemctl is-enabled authd.socket authd.service", check=False).split() == [
        "disabled",
        "disabled",
    ]
    c.run("systemctl enable --now authd.socket authd.service")
    assert get_token(c, mint(c)).status == 200


def test_remove_stops_authd_and_keeps_its_config(lifecycle):
    c = lifecycle
    c.run("mkdir -p /var/log/authd && touch /var/log/authd/audit.log")
    c.run("apt-get remove -y authd", timeout=300)
    assert status(c) == "rc"
    assert c.out("systemctl is-active authd.service authd.socket", check=False).split() == [
        "inactive",
        "inactive",
    ]
    assert not c.path("/run/authd/authd.sock").exists()
    assert not c.path("/opt/authd").exists()
    assert not c.path("/usr/bin/authd").exists()
    assert c.path("/etc/authd/authd.toml").read_text().startswith(EDIT)
    assert c.path("/var/log/authd/audit.log").exists()
    assert c.out("getent passwd authd").startswith("authd:")
    # nginx still runs (its configuration includes snippets that are still there).
    assert c.out("systemctl is-active nginx") == "active"


def test_purge_removes_config_and_logs(lifecycle):
    c = lifecycle
    # What an operator must do first: nginx would fail on the missing snippets.
    c.run("rm /etc/nginx/conf.d/authd.conf /etc/nginx/sites-enabled/authd-test")
    c.run("apt-get purge -y authd", timeout=300)
    assert status(c) in {"un", ""}
    assert not c.path("/etc/authd/authd.toml").exists()
    assert not c.path("/etc/nginx/authd").exists()
    assert not c.path("/etc/default/authd").exists()
    assert not c.path("/var/log/authd").exists()
    assert c.out("systemctl is-enabled authd.socket", check=False) != "enabled"
    assert not list(c.path("/var/lib/systemd/deb-systemd-helper-enabled").glob("**/authd*"))
    assert c.out("nginx -t 2>&1")
    assert c.out("systemctl is-active nginx") == "active"
