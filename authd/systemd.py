"""The two systemd protocols authd speaks: socket activation and ``sd_notify``.

Both are a few lines over the documented environment variables and a datagram socket
(sd_listen_fds(3), sd_notify(3)); a binding library would add a C dependency for them.
Outside systemd the environment variables are absent and every call here does nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping, MutableMapping

SD_LISTEN_FDS_START = 3


def activated_socket(env: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """The listening socket systemd passed to this process, or None.

    The variables are removed afterwards, so that no child process takes them for its own.
    """
    env = os.environ if env is None else env
    fds, pid = env.pop("LISTEN_FDS", None), env.pop("LISTEN_PID", None)
    env.pop("LISTEN_FDNAMES", None)
    if fds is None or pid is None or not pid.isdigit() or int(pid) != os.getpid():
        return None
    if not fds.isdigit() or int(fds) != 1:
        raise OSError(f"expected one socket from systemd, got LISTEN_FDS={fds}")
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    os.set_inheritable(sock.fileno(), False)  # noqa: FBT003 -- os's signature
    if sock.type != socket.SOCK_STREAM:
        raise OSError("the socket from systemd is not a stream socket")
    return sock


class Notifier:
    """Sends ``sd_notify`` messages to the service manager, if there is one."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # the abstract namespace
            address = "\0" + address[1:]
        self.address = address
        usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        for_us = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_seconds = int(usec) / 1_000_000 if usec.isdigit() and for_us else None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, **fields: str | int) -> None:
        """Send ``READY=1``-style fields, e.g. ``notify(READY=1, STATUS="...")``.

        A manager that is gone (or a full socket) must never take authd down with it.
        """
        if not self.address:
            return
        message = "\n".join(f"{k}={_one_line(str(v))}" for k, v in fields.items()).encode()
        with (
            contextlib.suppress(OSError),
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
        ):
            sock.sendto(message, self.address)

    def ready(self, status: str) -> None:
        self.notify(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, status: str) -> None:
        self.notify(STATUS=status)

    def reloading(self) -> None:
        self.notify(RELOADING=1, STATUS="reloading the configuration")

    def stopping(self) -> None:
        self.notify(STOPPING=1, STATUS="stopping: finishing requests in flight")

    def watchdog(self) -> None:
        self.notify(WATCHDOG=1)


def _one_line(value: str) -> str:
    return value.replace("\n", " ")
