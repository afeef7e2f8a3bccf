"""Fixtures of the system tests (see sysharness.py): the packages, the Debian 12 base system,
booted containers."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from sysharness import (
    BASE_PACKAGES,
    CACHE,
    MIRROR,
    REPO,
    SUITE,
    Container,
    Packages,
    require,
    sh,
    version,
)


@pytest.fixture(scope="session")
def tools() -> None:
    """The make targets install what is missing (as root); then every tool must be there."""
    require("make")
    sh(["make", "-C", str(REPO), "--no-print-directory", "packaging-deps", "system-test-deps"])
    require("debootstrap", "systemd-nspawn", "nsenter", "systemd-analyze", "rpm", "rpmlint")


@pytest.fixture(scope="session")
def packages(tools) -> Packages:  # noqa: ARG001 -- needs the tools installed first
    ver = version()
    dist = os.environ.get("AUTHD_DIST")
    upgrade_dist = REPO / "build" / "pkg" / "dist-upgrade"
    if dist is None:
        sh(["make", "-C", str(REPO), "packages"], timeout=1200)
        dist = str(REPO / "dist")
    # Revision 2 of the same tree: what an upgrade installs.
    sh(
        ["make", "-C", str(REPO), "deb", "DEB_REVISION=2", f"DIST={upgrade_dist}"],
        timeout=1200,
    )
    found = Packages(
        version=ver,
        deb=Path(dist) / f"authd_{ver}-1_amd64.deb",
        rpm=Path(dist) / f"authd-{ver}-1.x86_64.rpm",
        deb_upgrade=upgrade_dist / f"authd_{ver}-2_amd64.deb",
    )
    for path in (found.deb, found.rpm, found.deb_upgrade):
        assert path.is_file(), f"{path} was not built"
    return found


@pytest.fixture(scope="session")
def base_root(tools) -> Path:  # noqa: ARG001 -- needs the tools installed first
    """A debootstrapped Debian 12, made once per cache directory; never modified."""
    key = hashlib.sha256(f"{SUITE} {MIRROR} {' '.join(BASE_PACKAGES)}".encode()).hexdigest()
    root = CACHE / f"{SUITE}-{key[:12]}"
    done = root.with_suffix(".complete")
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        sh(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                SUITE,
                str(root),
                MIRROR,
            ],
            timeout=900,
        )
        # Nothing from the host leaks in; the containers have no network anyway.
        (root / "etc" / "hostname").write_text("authd-test\n")
        sh(["chroot", str(root), "apt-get", "clean"])
        done.touch()
    return root


@pytest.fixture(scope="module")
def boot(base_root, tmp_path_factory):
    """boot(name) -> a running Container, powered off and removed after the module."""
    started: list[Container] = []
    workdir = tmp_path_factory.mktemp("containers")

    def _boot(name: str) -> Container:
        container = Container(base_root, workdir, f"authd-{name}-{os.getpid()}")
        started.append(container)
        return container

    yield _boot
    for container in started:
        container.stop()
