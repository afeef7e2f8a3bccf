"""The built packages as files: lintian and rpmlint, contents, metadata, maintainer scripts, the
units' hardening score; and the rpm installed into a Debian root with `rpm --root`."""

from __future__ import annotations

import re

import pytest
from debops import exposure
from sysharness import REPO, require, sh

pytestmark = pytest.mark.system

SNIPPETS = [
    f"/etc/nginx/authd/authd-{c}.conf"
    for c in (
        "http",
        "location-fastcgi",
        "location-uwsgi",
        "location",
        "server",
        "http-microcache",
        "server-microcache",
    )
]


def offline_score(*args: str) -> float:
    require("systemd-analyze")
    out = sh(["systemd-analyze", "security", "--offline=true", "--no-pager", *args]).stdout
    match = re.search(r"Overall exposure level for authd\.service: (\d+\.\d+)", out)
    assert match, out
    return float(match.group(1))


def test_unit_hardening_score():
    assert offline_score(str(REPO / "systemd" / "authd.service")) <= 1.2


def test_local_keys_dropin_hardening_score(tmp_path):
    units = tmp_path / "etc" / "systemd" / "system"
    (units / "authd.service.d").mkdir(parents=True)
    for name in ("authd.service", "authd.socket"):
        (units / name).write_text((REPO / "systemd" / name).read_text())
    dropin = (REPO / "systemd" / "authd-local-keys.conf").read_text()
    (units / "authd.service.d" / "local-keys.conf").write_text(dropin)
    assert offline_score(f"--root={tmp_path}", "authd.service") <= 0.3


def test_unit_restricts_for_real():
    """The score comes from settings that restrict, not from allow-everything lists."""
    unit = (REPO / "systemd" / "authd.service").read_text()
    settings = [line.strip() for line in unit.splitlines() if not line.startswith("#")]
    assert not [s for s in settings if s.startswith("IPAddressAllow=")]
    assert "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6" in settings
    assert "CapabilityBoundingSet=" in settings
    assert "ProtectSystem=strict" in settings
    assert "PrivateTmp=yes" in settings
    assert "MemoryDenyWriteExecute=yes" in settings
    assert "LogRateLimitIntervalSec=0" in settings
    assert "ExecReload=/usr/bin/authd reload --pid $MAINPID" in settings


# --- deb ----------------------------------------------------------------------------------


def test_lintian_reports_no_errors(packages):
    require("lintian")
    proc = sh(["lintian", "--fail-on", "error", str(packages.deb)], check=False)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("E:")]
    assert errors == [], proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_deb_metadata_and_conffiles(packages, tmp_path):
    require("dpkg-deb")
    fields = sh(["dpkg-deb", "--field", str(packages.deb)]).stdout
    depends = re.search(r"^Depends: (.*)$", fields, re.MULTILINE)
    assert depends
    assert "python3.11" in depends.group(1).split(", ")
    assert f"Version: {packages.version}-1" in fields
    sh(["dpkg-deb", "--control", str(packages.deb), str(tmp_path)])
    conffiles = (tmp_path / "conffiles").read_text().split()
    assert sorted(conffiles) == sorted(
        ["/etc/authd/authd.toml", "/etc/default/authd", "/etc/logrotate.d/authd", *SNIPPETS]
    )
    postinst = (tmp_path / "postinst").read_text()
    assert "systemd-sysusers" in postinst
    assert "deb-systemd-invoke start 'authd.socket'" in postinst
    assert "deb-systemd-invoke $_dh_action 'authd.service'" in postinst
    assert "rm -rf /var/log/authd" in (tmp_path / "postrm").read_text()


def test_deb_contents(packages):
    listing = sh(["dpkg-deb", "--contents", str(packages.deb)]).stdout
    entries = {line.split()[-1].removeprefix("."): line.split()[0] for line in listing.splitlines()}
    assert entries["/etc/authd/authd.toml"] == "-rw-r-----"
    assert "/lib/systemd/system/authd.socket" in entries
    assert "/usr/lib/sysusers.d/authd.conf" in entries
    assert "/usr/share/authd/authd-local-keys.conf" in entries
    assert "/opt/authd/bin/authd" in entries
    # Installing must not change what nginx does: nothing nginx reads by itself.
    assert not [p for p in entries if p.startswith(("/etc/nginx/conf.d", "/etc/nginx/sites-"))]
    # No pip in the shipped venv, and the bytecode is there.
    assert not [p for p in entries if "/site-packages/pip/" in p]
    assert "/opt/authd/lib/python3.11/site-packages/authd/__pycache__/" in entries


# --- rpm ----------------------------------------------------------------------------------


def rpmq(packages, *query: str) -> str:
    require("rpm")
    return sh(["rpm", "-qp", *query, str(packages.rpm)]).stdout


def test_rpmlint_reports_no_errors(packages):
    require("rpmlint")
    rc = REPO / "packaging" / "rpm" / "authd.rpmlintrc"
    proc = sh(["rpmlint", "--rpmlintrc", str(rc), str(packages.rpm)], check=False)
    assert re.search(r"\b0 errors\b", proc.stdout), proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rpm_files_owners_modes_and_config_flags(packages):
    rows = rpmq(
        packages,
        "--qf",
        "[%{FILEMODES:perms} %{FILEUSERNAME} %{FILEGROUPNAME} %{FILEFLAGS:fflags} %{FILENAMES}\n]",
    )
    files = {}
    for row in rows.splitlines():
        perms, user, group, *rest = row.split()
        flags, name = (rest[0], rest[1]) if len(rest) == 2 else ("", rest[0])
        files[name] = (perms, user, group, flags)
    assert files["/etc/authd/authd.toml"] == ("-rw-r-----", "root", "authd", "cn")
    assert files["/var/log/authd"] == ("drwxr-x---", "authd", "authd", "")
    for path in [*SNIPPETS, "/etc/sysconfig/authd", "/etc/logrotate.d/authd"]:
        assert files[path][3] == "cn", path  # %config(noreplace)
    assert files["/usr/lib/systemd/system/authd.service"][0] == "-rw-r--r--"
    assert "/usr/lib/sysusers.d/authd.conf" in files
    assert "/usr/lib/tmpfiles.d/authd.conf" in files
    assert files["/usr/bin/authd"][0].startswith("l")
    assert not [f for f in files if f.startswith(("/etc/nginx/conf.d", "/etc/nginx/default.d"))]
    assert not [f for f in files if f.startswith("/usr/lib/.build-id")]
    assert all(user == "root" for _, user, _, _ in files.values() if user != "authd")


def test_rpm_dependencies(packages):
    requires = set(rpmq(packages, "--requires").split("\n"))
    assert {"python3.11", "systemd", "ca-certificates"} <= requires
    # Nothing the bundled wheels link or provide leaks into the dependency graph.
    assert not [r for r in requires if ".so" in r]
    provides = rpmq(packages, "--provides").split("\n")
    assert not [p for p in provides if ".so" in p or "python3" in p]


def test_rpm_scriptlets(packages):
    scripts = rpmq(packages, "--scripts")
    pre, post = scripts.split("postinstall scriptlet")[0], scripts.split("postinstall")[1]
    assert "systemd-sysusers" in pre
    assert "u authd -" in pre
    assert "g nginx -" in pre
    assert "install-system-units authd.socket authd.service" in post
    assert "remove-system-units authd.socket authd.service" in scripts
    assert "mark-restart-system-units authd.service" in scripts
    assert "systemd-tmpfiles --create /usr/lib/tmpfiles.d/authd.conf" in post


def test_rpm_units_are_rhel_flavoured(packages, tmp_path):
    require("rpm2cpio", "cpio")
    sh(f"rpm2cpio {packages.rpm} | cpio -idm --quiet", cwd=tmp_path)
    socket = (tmp_path / "usr/lib/systemd/system/authd.socket").read_text()
    service = (tmp_path / "usr/lib/systemd/system/authd.service").read_text()
    assert "\nSocketGroup=nginx\n" in socket
    assert "\nEnvironmentFile=-/etc/sysconfig/authd\n" in service
    assert "/etc/default" not in service
    assert offline_score(str(tmp_path / "usr/lib/systemd/system/authd.service")) <= 1.2
    assert "#!/opt/authd/bin/python" in (tmp_path / "opt/authd/bin/authd").read_text()


def test_rpm_installs_into_a_root_and_serves(boot, packages):
    """rpm --root into a booted Debian 12 (no RHEL userland here): the scriptlets create the
    users, the files land with their owners, and the units serve."""
    require("rpm")
    c = boot("rpm")
    root = str(c.root)
    sh(["rpm", "--root", root, "--initdb"])
    proc = sh(["rpm", "--root", root, "-i", "--nodeps", str(packages.rpm)], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "does not exist" not in proc.stderr, proc.stderr  # users made before the files
    assert c.out("getent group nginx").startswith("nginx:")
    assert c.out("stat -c '%a %U %G' /etc/authd/authd.toml") == "640 root authd"
    assert c.out("stat -c '%a %U %G' /var/log/authd") == "750 authd authd"
    c.run("systemctl daemon-reload && systemctl start authd.socket")
    assert c.out("stat -c '%A %U %G' /run/authd/authd.sock") == "srw-rw---- root nginx"
    answer = c.run(
        "curl -sS -o /dev/null -w '%{http_code}' --unix-socket /run/authd/authd.sock "
        "http://authd/auth/app",
        check=False,
    )
    assert answer.stdout in {"401", "403"}, answer
    # A worker may answer a moment before the supervisor has told systemd it is ready.
    c.wait_until("authd's status", lambda: c.authd_status().startswith("not configured"))
    assert exposure(c) <= 1.2
    # %preun stops the units through systemd-update-helper, which Debian's systemd lacks
    # (RHEL's has it): stop them as it would, then erase.
    c.run("systemctl stop authd.socket authd.service")
    sh(["rpm", "--root", root, "-e", "--nodeps", "authd"])
    assert not c.path("/opt/authd").exists()
    assert not c.path("/etc/authd/authd.toml").exists()  # unmodified: no .rpmsave
