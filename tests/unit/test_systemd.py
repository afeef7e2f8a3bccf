import os
import socket

import pytest

from authd.systemd import Notifier, activated_socket


@pytest.fixture
def manager(tmp_path):
    """The service manager's end of the notify socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(2)
        yield sock


def received(sock: socket.socket) -> dict[str, str]:
    return dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())


def test_ready_carries_status_and_main_pid(manager, tmp_path):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    notifier.ready("ready: keys loaded for 1 issuer(s)")
    assert received(manager) == {
        "READY": "1",
        "STATUS": "ready: keys loaded for 1 issuer(s)",
        "MAINPID": str(os.getpid()),
    }


def test_a_status_is_one_line(manager, tmp_path):
    Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")}).status("two\nlines")
    assert received(manager) == {"STATUS": "two lines"}


def test_abstract_namespace_socket():
    name = f"authd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        Notifier({"NOTIFY_SOCKET": "@" + name}).stopping()
        assert received(sock)["STOPPING"] == "1"


def test_without_a_manager_nothing_is_sent_and_nothing_fails(tmp_path):
    assert not Notifier({}).enabled
    Notifier({}).ready("x")
    # A manager that went away: the send fails quietly, authd keeps serving.
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert gone.enabled
    gone.ready("x")


@pytest.mark.parametrize(
    ("env", "seconds"),
    [
        ({"WATCHDOG_USEC": "3000000"}, 3.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 3.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env, seconds):
    assert Notifier(env).watchdog_seconds == seconds


def test_no_activation_without_the_variables_or_for_another_process():
    assert activated_socket({}) is None
    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDNAMES": "authd"}
    assert activated_socket(env) is None
    assert env == {}  # never passed on to a child


def test_more_than_one_socket_is_refused():
    with pytest.raises(OSError, match="expected one socket"):
        activated_socket({"LISTEN_FDS": "2", "LISTEN_PID": str(os.getpid())})
