"""The system tests' harness: the packages built by `make packages`, installed on a clean
Debian 12 that boots its own systemd (systemd-nspawn), and the rpm inspected and installed
into a root.

Needs root, debootstrap, systemd-nspawn and the packaging tools: `make system-test` installs
them and runs these tests. A missing tool fails the test with the command that installs it;
nothing is skipped.

The Debian base system is debootstrapped from deb.debian.org once and kept in
/var/cache/authd-tests (AUTHD_TEST_CACHE); every container starts from a fresh copy.
AUTHD_DIST=DIR uses the packages in DIR instead of running `make packages`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("AUTHD_TEST_CACHE", "/var/cache/authd-tests"))
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
# The base system: what an operator's minimal Debian 12 with nginx has, plus what the tests
# drive it with (curl, logrotate) and authd's own dependencies, so that installing the deb
# needs no network.
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "nginx-light",
    "curl",
    "ca-certificates",
    "logrotate",
    "python3.11",
)
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def require(*commands: str) -> None:
    """Fail, never skip, when a tool is missing: `make system-test` installs all of them."""
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: run 'make system-test-deps packaging-deps' as root "
            "(or 'make system-test', which runs these tests)",
            pytrace=False,
        )
    if os.geteuid() != 0:
        pytest.fail("the system tests boot containers: run them as root", pytrace=False)


def sh(
    args: list[str] | str,
    *,
    check: bool = True,
    timeout: float = 600,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    input_text: str | None = None,
    what: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command (a string goes to /bin/sh); check: fail, naming ``what``, on non-zero exit."""
    cmd = ["/bin/sh", "-c", args] if isinstance(args, str) else args
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
        input=input_text,
        check=False,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{what or cmd} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}",
            pytrace=False,
        )
    return proc


# --- packages ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Packages:
    version: str
    deb: Path
    rpm: Path
    # The same package with the next Debian revision, for the upgrade.
    deb_upgrade: Path


def version() -> str:
    text = (REPO / "authd" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    assert match, "authd/__init__.py has no __version__"
    return match.group(1)


# --- the Debian 12 base system --------------------------------------------------------------


# --- containers ---------------------------------------------------------------------------


class Container:
    """A copy of the base system booted by systemd-nspawn, driven with nsenter.

    PID 1 on the test machine is not systemd: nspawn runs with --register=no --keep-unit,
    and commands enter the container's namespaces (nsenter -a) rather than machinectl.
    --private-network: the container has only loopback; the test machine's ports are safe.
    """

    def __init__(self, base: Path, workdir: Path, name: str) -> None:
        self.name = name
        self.root = workdir / name
        sh(["cp", "-a", "--reflink=auto", str(base), str(self.root)])
        self.console = workdir / f"{name}.console.log"
        self._console = self.console.open("w")
        self.nspawn = subprocess.Popen(
            [
                "systemd-nspawn",
                "--boot",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--console=read-only",
                f"--machine={name}",
                f"--directory={self.root}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._console,
            stderr=subprocess.STDOUT,
        )
        self.leader = self._find_leader()
        # systemctl answers once PID 1 listens on its private socket; then it waits for boot.
        deadline = time.monotonic() + 90
        while True:
            state = self.run("systemctl is-system-running --wait", check=False, timeout=90)
            if state.stdout.strip() in {"running", "degraded"}:
                break
            if time.monotonic() > deadline or state.stdout.strip():
                pytest.fail(
                    f"container did not boot: {state.stdout} {state.stderr}\n{self.console_tail()}"
                )
            time.sleep(0.2)

    def _find_leader(self) -> int:
        children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                pytest.fail(f"systemd-nspawn exited early:\n{self.console_tail()}")
            pids = children.read_text().split() if children.exists() else []
            for pid in pids:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            time.sleep(0.1)
        pytest.fail(f"no systemd in the container after 30 s:\n{self.console_tail()}")
        raise AssertionError  # unreachable: pytest.fail raises

    def console_tail(self) -> str:
        self._console.flush()
        return self.console.read_text(errors="replace")[-4000:]

    def run(
        self,
        command: str,
        *,
        check: bool = True,
        timeout: float = 120,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell command inside the container as root; check: fail on non-zero exit."""
        argv = [
            "nsenter",
            "-t",
            str(self.leader),
            "-a",
            "/usr/bin/env",
            "-i",
            f"PATH={CONTAINER_PATH}",
            "LANG=C.UTF-8",
            "HOME=/root",
            "SYSTEMD_PAGER=",
            "SYSTEMD_COLORS=0",
            "DEBIAN_FRONTEND=noninteractive",
            "/bin/sh",
            "-c",
            command,
        ]
        return sh(
            argv,
            check=check,
            timeout=timeout,
            input_text=input_text,
            what=f"in the container: {command!r}",
        )

    def out(self, command: str, **kwargs: object) -> str:
        return self.run(command, **kwargs).stdout.strip()  # type: ignore[arg-type]

    def path(self, path: str) -> Path:
        """The host's view of a path inside the container."""
        return self.root / path.lstrip("/")

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        target = self.path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def copy_in(self, source: Path, path: str) -> str:
        shutil.copy(source, self.path(path))
        return path

    def show(self, unit: str, prop: str) -> str:
        return self.out(f"systemctl show --value -p {prop} {shlex.quote(unit)}")

    def authd_status(self) -> str:
        """authd.service's status line, without the "N workers; " of a supervisor (workers
        default to one per CPU, so how many there are depends on the machine)."""
        return re.sub(r"^\d+ workers; ", "", self.show("authd.service", "StatusText"))

    def wait_until(self, what: str, predicate: object, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():  # type: ignore[operator]
                return
            time.sleep(0.2)
        journal = self.out("journalctl -b --no-pager -n 60", check=False)
        pytest.fail(f"timed out after {timeout} s waiting for {what}\n--- journal\n{journal}")

    def stop(self) -> None:
        if self.nspawn.poll() is None:
            # SIGTERM: nspawn asks the container's systemd to power off.
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(timeout=30)
        self._console.close()
        shutil.rmtree(self.root, ignore_errors=True)
