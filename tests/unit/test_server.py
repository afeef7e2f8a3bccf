"""The supervisor's bookkeeping: worker messages, READY after every worker, reload acks."""

import json
import os
import socket

import pytest

from authd import config
from authd.server import _MESSAGE_MAX, PipeReporter, Supervisor, message

# Above any pid_max (2**22): signals the supervisor sends them reach no real process.
WORKERS = (2**22 + 1001, 2**22 + 1002)


@pytest.fixture
def manager(tmp_path, monkeypatch):
    """systemd's end of the notify socket, for the supervisor to talk to."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    yield sock
    sock.close()


def notes(sock: socket.socket) -> list[dict[str, str]]:
    out = []
    while True:
        try:
            data = sock.recv(4096)
        except TimeoutError:
            return out
        out.append(dict(line.split("=", 1) for line in data.decode().splitlines()))


@pytest.fixture
def supervisor(tmp_path, manager):  # noqa: ARG001 -- NOTIFY_SOCKET must be set first
    path = tmp_path / "authd.toml"
    path.write_text("workers = 2\n")
    private = tmp_path / "run"  # the supervisor's own directory (mkdtemp in real life)
    private.mkdir()
    with socket.socket() as sock:
        sup = Supervisor(config.load(path), path, path.read_bytes(), sock, private)
        for pid in WORKERS:  # as if forked
            sup.workers[pid] = sup.spawned[pid] = 0.0
        yield sup
    os.close(sup.read_fd)
    os.close(sup.write_fd)


def deliver(sup: Supervisor, *lines: bytes) -> None:
    os.set_blocking(sup.read_fd, False)
    for line in lines:
        os.write(sup.write_fd, line)
    assert sup._read_messages(b"") == b""


def test_a_long_status_is_cut_and_the_message_still_ends_its_line():
    data = message("started", WORKERS[0], status="waiting for keys: " + "x (timeout), " * 400)
    assert len(data) <= _MESSAGE_MAX
    assert data.endswith(b"\n")
    parsed = json.loads(data)
    assert parsed["event"] == "started"
    assert parsed["status"].endswith("...")


def test_ready_only_once_every_worker_has_started_even_with_long_statuses(supervisor, manager):
    long_status = "waiting for keys (503 until they arrive): " + "issuer (timed out), " * 60
    deliver(supervisor, message("started", WORKERS[0], long_status))
    assert notes(manager) == []
    deliver(supervisor, message("started", WORKERS[1], long_status))
    (ready,) = notes(manager)
    assert ready["READY"] == "1"
    assert ready["STATUS"].startswith("2 workers; waiting for keys")


def test_the_reporter_writes_what_the_supervisor_reads(supervisor, manager):
    supervisor.workers[os.getpid()] = supervisor.spawned[os.getpid()] = 0.0
    supervisor.workers.pop(WORKERS[1])
    supervisor.workers.pop(WORKERS[0])
    PipeReporter(supervisor.write_fd).started("ready: keys loaded for 1 issuer(s)")
    supervisor._read_messages(b"")
    assert notes(manager)[0]["STATUS"] == "1 workers; ready: keys loaded for 1 issuer(s)"


def test_garbage_and_strangers_on_the_pipe_change_nothing(supervisor, manager):
    deliver(supervisor, b"not json\n", b"[1, 2]\n", message("started", 2**22 + 4242, "ready"))
    assert supervisor.started == set()
    assert notes(manager) == []


def test_a_reload_ends_with_ready_once_every_worker_answered(supervisor, manager):
    for pid in WORKERS:
        deliver(supervisor, message("started", pid, "ready"))
    notes(manager)
    supervisor._reload()
    assert notes(manager)[0]["RELOADING"] == "1"
    assert (supervisor.snapshot.read_bytes(), supervisor.cfg.workers) == (b"workers = 2\n", 2)

    deliver(supervisor, message("reloaded", WORKERS[0], "ready", ok=True))
    assert notes(manager) == []
    deliver(supervisor, message("reloaded", WORKERS[1], "ready", ok=False))
    (ready,) = notes(manager)
    assert ready["READY"] == "1"
    assert "reload failed in a worker" in ready["STATUS"]


def test_a_worker_that_dies_during_a_reload_does_not_hold_it_up(supervisor, manager):
    supervisor._reload()
    notes(manager)
    deliver(supervisor, message("reloaded", WORKERS[0], "ready", ok=True))
    supervisor._reload_done(WORKERS[1])  # what reaping it does
    assert notes(manager)[0]["READY"] == "1"


def test_a_broken_file_is_not_snapshotted_and_no_reload_starts(supervisor, manager):
    supervisor.path.write_text("workers = 2\nsurprise = 1\n")
    supervisor._reload()
    assert supervisor.snapshot.read_bytes() == b"workers = 2\n"
    (status,) = notes(manager)
    assert "RELOADING" not in status
    assert status["STATUS"].startswith("reload failed, still serving as before")
    assert supervisor.pending_reload == set()


def test_the_watchdog_waits_only_for_started_workers(supervisor):
    assert not supervisor._all_reporting(now=1.0)  # nobody has started yet
    deliver(supervisor, message("started", WORKERS[0], "ready"))
    seen = supervisor.workers[WORKERS[0]]
    assert supervisor._all_reporting(now=seen + 1)  # the other is still starting: not counted
    assert not supervisor._all_reporting(now=seen + 60)


def test_the_command_line_does_not_import_prometheus_client_before_serve_sets_it_up():
    # prometheus_client picks single- or multi-process mode when first imported; with workers,
    # the supervisor must set PROMETHEUS_MULTIPROC_DIR first, or /metrics shows no decisions.
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    probe = "import sys, authd.cli; print(sorted(m for m in sys.modules if 'prometheus' in m))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
