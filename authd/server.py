"""Running the daemon: one serving process, or a supervisor with N worker processes.

With ``workers = 1`` the process that systemd started serves the socket itself. With more,
that process becomes a small supervisor: it forks the workers, which share the listening
socket (the kernel spreads connections among them), and it alone talks to systemd.

- READY=1 once every worker has served its first key fetches (success or not).
- SIGHUP is forwarded to every worker, each of which validates the configuration file and
  either reloads in place (keys kept, no restart, no dropped connection) or logs every
  problem and keeps serving what it has; either way it reopens the audit file and reports
  back. (`authd reload` validates before it signals at all.)
  uvicorn's own supervisor would restart every worker on SIGHUP unchecked: not used.
- SIGTERM/SIGINT: STOPPING=1, every worker drains its requests (``DRAIN_SECONDS``) and
  exits; idle keepalive connections are closed at once.
- A worker that dies is replaced. The watchdog is fed only while every worker reports in.

Workers tell the supervisor how they are doing with one-line JSON messages on a pipe
(``{"event": "started", "pid": ..., "status": "..."}``); a message stays below
``PIPE_BUF``, so writes of several workers never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import selectors
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog
import uvicorn

from authd import __version__, audit
from authd.systemd import Notifier

if TYPE_CHECKING:
    import socket
    from types import FrameType

    from authd.config import Config
    from authd.service import Service

log = structlog.get_logger("authd.server")

DRAIN_SECONDS = 10
HEARTBEAT_SECONDS = 2.0
# A started worker that has not reported for this long is stuck: the supervisor replaces it.
# Under a systemd watchdog, a third of its interval, so that one stuck worker is replaced
# before the watchdog (fed only while every started worker reports) takes the service down.
STUCK_SECONDS = 30.0
# A worker that has not finished starting (its first key fetches) by then is replaced.
STARTUP_SECONDS = 120.0
# Signals a worker must not die of in the moment between fork() and its own handlers.
_DEFERRED_SIGNALS = {signal.SIGHUP, signal.SIGUSR1}
# More deaths than this within RESPAWN_WINDOW means something is badly wrong: give up
# and let systemd's restart policy (and its start limit) take over.
MAX_RESPAWNS = 5
RESPAWN_WINDOW = 30.0
# A message is written with one write(): below PIPE_BUF (4096), writes never interleave.
_MESSAGE_MAX = 1024
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def message(event: str, pid: int, status: str = "", **fields: object) -> bytes:
    """One line for the supervisor, cut to ``_MESSAGE_MAX`` by shortening its status."""
    body: dict[str, object] = {"event": event, "pid": pid, **fields}
    if status:
        body["status"] = status
    data = json.dumps(body).encode() + b"\n"
    if len(data) > _MESSAGE_MAX:
        body["status"] = status[: max(0, len(status) - (len(data) - _MESSAGE_MAX) - 3)] + "..."
        data = json.dumps(body).encode() + b"\n"
    return data


class Reporter(Protocol):
    """How a serving process tells its manager what happens (systemd, or the supervisor)."""

    def started(self, status: str) -> None: ...
    def reloading(self) -> None: ...
    def reloaded(self, ok: bool, status: str) -> None: ...
    def heartbeat(self) -> None: ...
    def stopping(self) -> None: ...


class SystemdReporter:
    """The single-process daemon reports straight to systemd."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier

    def started(self, status: str) -> None:
        self.notifier.ready(status)

    def reloading(self) -> None:
        self.notifier.reloading()

    def reloaded(self, ok: bool, status: str) -> None:
        self.notifier.ready(status if ok else f"reload failed, still serving as before; {status}")

    def heartbeat(self) -> None:
        self.notifier.watchdog()

    def stopping(self) -> None:
        self.notifier.stopping()


class PipeReporter:
    """A worker reports to its supervisor; a supervisor that is gone ends the worker."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def _send(self, event: str, status: str = "", **fields: object) -> None:
        data = message(event, os.getpid(), status, **fields)
        try:
            os.write(self.fd, data)
        except BrokenPipeError:
            log.warning("supervisor_gone")
            os.kill(os.getpid(), signal.SIGTERM)  # drain and exit like a normal stop

    def started(self, status: str) -> None:
        self._send("started", status=status)

    def reloading(self) -> None:
        pass  # the supervisor said so already

    def reloaded(self, ok: bool, status: str) -> None:
        self._send("reloaded", ok=ok, status=status)

    def heartbeat(self) -> None:
        self._send("heartbeat")

    def stopping(self) -> None:
        pass  # the supervisor said so already


def serve(
    cfg: Config,
    path: Path | None,
    sock: socket.socket,
    reporter: Reporter,
) -> None:
    """Serve ``sock`` in this process until SIGTERM/SIGINT; SIGHUP reloads in place."""
    # Imported here, in the serving process, after `run` chose the metrics mode.
    from authd.app import create_app  # noqa: PLC0415
    from authd.fetch import make_http_client  # noqa: PLC0415
    from authd.keys import SystemClock  # noqa: PLC0415
    from authd.service import Service, record_fetch  # noqa: PLC0415

    audit_file = audit.AuditFile(cfg.audit_file) if cfg.audit_file is not None else None
    client = make_http_client()
    service = Service.from_config(
        cfg,
        path=path,
        client=client,
        clock=SystemClock(),
        on_fetch=record_fetch,
        audit_file=audit_file,
    )
    tasks: set[asyncio.Task[None]] = set()
    # A SIGHUP during startup (the first key fetches) is remembered, not fatal, and acted on
    # once the service runs.
    early: list[int] = []
    signal.signal(signal.SIGHUP, lambda sig, _frame: early.append(sig))
    signal.signal(signal.SIGUSR1, lambda _sig, _frame: _reopen(audit_file))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _DEFERRED_SIGNALS)  # blocked across a fork

    async def started() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: _spawn(tasks, _reload(service, reporter)))
        loop.add_signal_handler(signal.SIGUSR1, _reopen, audit_file)
        _spawn(tasks, _heartbeats(service, reporter))
        reporter.started(service.status())
        if early:
            _spawn(tasks, _reload(service, reporter))

    async def closing() -> None:
        for task in tasks:
            task.cancel()
        await client.aclose()
        if audit_file is not None:
            audit_file.close()
        # Here, not after server.run(): uvicorn re-raises the stop signal once it is done.
        log.info("stopped", pid=os.getpid())

    app = create_app(
        service=service,
        auditor=audit.Auditor(audit_file),
        started=(started,),
        closing=(closing,),
    )
    server = _Server(uvicorn.Config(app, **UVICORN_SETTINGS), reporter)
    server.run(sockets=[sock])


# How authd runs uvicorn (devtools/bench.py serves its floor row with the same).
UVICORN_SETTINGS: dict[str, Any] = {
    "loop": "uvloop",
    "http": "httptools",
    "lifespan": "on",
    "log_config": None,  # logging is configured by authd.audit: JSON lines
    "access_log": False,  # the audit line is the access log
    "server_header": False,
    "date_header": False,
    "proxy_headers": False,
    # nginx closes idle upstream connections after 60 s (authd-http.conf); staying open
    # longer means authd never closes one that nginx is about to reuse.
    "timeout_keep_alive": 75,
    "timeout_graceful_shutdown": DRAIN_SECONDS,
}


class _Server(uvicorn.Server):
    """uvicorn's server, saying STOPPING=1 the moment a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, reporter: Reporter) -> None:
        super().__init__(config)
        self.reporter = reporter

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.reporter.stopping()
        super().handle_exit(sig, frame)


def _spawn(tasks: set[asyncio.Task[None]], coro: Any) -> None:  # noqa: ANN401 -- a coroutine
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _reload(service: Service, reporter: Reporter) -> None:
    reporter.reloading()
    log.info("reload_requested", pid=os.getpid())
    ok = False
    try:
        ok = await service.reload()
    except Exception:
        log.exception("reload_failed", pid=os.getpid())
    finally:
        reporter.reloaded(ok, service.status())


def _reopen(audit_file: audit.AuditFile | None) -> None:
    """SIGUSR1: reopen the audit file (logrotate), nothing else."""
    if audit_file is not None:
        audit_file.reopen()


async def _heartbeats(service: Service, reporter: Reporter) -> None:
    from authd import metrics  # noqa: PLC0415 -- see `serve`

    while True:
        gen = service.current
        for keys in gen.keys.issuers.values():
            metrics.keys_usable(keys.name, keys.usable())
        metrics.cache_entries(len(gen.authorizer.cache or ()))
        reporter.heartbeat()
        await asyncio.sleep(HEARTBEAT_SECONDS)


# --------------------------------------------------------------------------------------
# The supervisor


class Supervisor:
    """Forks ``workers`` serving processes and speaks for them to systemd.

    Workers never read the operator's file: the supervisor reads and validates it, and
    hands the workers a private snapshot of exactly those bytes (``snapshot``), so that a
    file edited while a reload runs cannot leave workers on different configurations, and
    a worker started later serves what its siblings serve.
    """

    def __init__(
        self,
        cfg: Config,
        path: Path,
        source: bytes,
        sock: socket.socket,
        directory: Path,
    ) -> None:
        self.cfg = cfg  # what a new worker starts with: updated by every valid reload
        self.size = cfg.workers
        self.path = path
        self.snapshot = directory / "authd.toml"
        self._write_snapshot(source)
        self.sock = sock
        self.notifier = Notifier()
        watchdog = self.notifier.watchdog_seconds
        self.stuck_seconds = min(STUCK_SECONDS, watchdog / 3) if watchdog else STUCK_SECONDS
        self.workers: dict[int, float] = {}  # pid -> monotonic time of its last message
        self.spawned: dict[int, float] = {}  # pid -> monotonic time of its fork
        self.started: set[int] = set()
        self.pending_reload: set[int] = set()
        self.reload_ok = True
        self.status = "starting"
        self.deaths: list[float] = []
        self.signals: list[int] = []
        self.stopping = False
        self.stop_deadline = float("inf")
        self.ready_sent = False
        self.read_fd, self.write_fd = os.pipe()

    def _write_snapshot(self, data: bytes) -> None:
        new = self.snapshot.with_suffix(".new")
        new.write_bytes(data)
        new.replace(self.snapshot)  # atomic: a worker reads the old bytes or the new

    def run(self) -> int:
        selector = selectors.DefaultSelector()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(self.read_fd, False)
        selector.register(self.read_fd, selectors.EVENT_READ)
        selector.register(wake_r, selectors.EVENT_READ)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        log.info("supervisor_started", workers=self.size, pid=os.getpid())
        for _ in range(self.size):
            self._spawn_worker(wake_r)
        buffer = b""
        last_watchdog = 0.0
        while self.workers or not self.stopping:
            for key, _ in selector.select(timeout=HEARTBEAT_SECONDS / 2):
                if key.fd == wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 4096)
                else:
                    buffer = self._read_messages(buffer)
            if self._handle_signals(wake_r) is not None:
                return 1
            now = time.monotonic()
            self._kill_stuck(now)
            if now > self.stop_deadline:
                log.error("workers_did_not_stop", pids=sorted(self.workers))
                self._signal_workers(signal.SIGKILL)
                self.stop_deadline = float("inf")
            watchdog = self.notifier.watchdog_seconds
            if watchdog and now - last_watchdog >= watchdog / 2 and self._all_reporting(now):
                self.notifier.watchdog()
                last_watchdog = now
        log.info("supervisor_stopped")
        return 0

    def _on_signal(self, sig: int, _frame: FrameType | None) -> None:
        self.signals.append(sig)

    def _spawn_worker(self, wake_r: int) -> None:
        # Blocked until the worker has its own handlers (see `serve`): a reload signal in
        # between must not kill it.
        signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                os.close(self.read_fd)
                os.close(wake_r)
                serve(self.cfg, self.snapshot, self.sock, PipeReporter(self.write_fd))
            except BaseException:
                log.exception("worker_failed")
                code = 1
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _DEFERRED_SIGNALS)
        self.workers[pid] = self.spawned[pid] = time.monotonic()
        log.info("worker_started", pid=pid)

    def _read_messages(self, buffer: bytes) -> bytes:
        with contextlib.suppress(BlockingIOError):
            buffer += os.read(self.read_fd, 65536)
        *lines, rest = buffer.split(b"\n")
        for line in lines:
            try:
                self._on_message(json.loads(line))
            except (ValueError, AttributeError):
                log.warning("worker_message_unreadable", length=len(line))
        return rest

    def _on_message(self, message: dict[str, Any]) -> None:
        pid = message.get("pid")
        if pid not in self.workers:
            return
        self.workers[pid] = time.monotonic()
        event = message.get("event")
        if event == "started":
            self.started.add(pid)
            self.status = str(message.get("status", ""))
            if not self.ready_sent and self.started >= set(self.workers):
                self.ready_sent = True
                self.notifier.ready(self._status())
                log.info("ready", workers=len(self.workers), status=self.status)
        elif event == "reloaded":
            self.reload_ok = self.reload_ok and bool(message.get("ok"))
            self.status = str(message.get("status", ""))
            self._reload_done(pid)

    def _reload_done(self, pid: int) -> None:
        """One worker has reloaded (or died); the last one ends the reload for systemd."""
        if pid not in self.pending_reload:
            return
        self.pending_reload.discard(pid)
        if self.pending_reload or self.stopping:
            return
        if not self.reload_ok:
            log.error("reload_incomplete", detail="a worker could not apply the configuration")
            self.status = f"reload failed in a worker, see the log; {self.status}"
        self.notifier.ready(self._status())

    def _status(self) -> str:
        return f"{len(self.workers)} workers; {self.status}"

    def _handle_signals(self, wake_r: int) -> int | None:
        while self.signals:
            sig = self.signals.pop(0)
            if sig == signal.SIGCHLD:
                if self._reap(wake_r) is not None:
                    return 1
            elif sig == signal.SIGHUP:
                self._reload()
            elif sig == signal.SIGUSR1:
                self._signal_workers(signal.SIGUSR1)  # reopen the audit file
            elif not self.stopping:  # SIGTERM, SIGINT
                self.stopping = True
                self.stop_deadline = time.monotonic() + DRAIN_SECONDS + 5
                self.notifier.stopping()
                log.info("stopping", workers=sorted(self.workers))
                self._signal_workers(signal.SIGTERM)
        return None

    def _reload(self) -> None:
        """Validate the file; if valid, snapshot it and have every worker switch to it.

        A broken file changes nothing (``reload_failed``), but the workers still reopen the
        audit file: logrotate must keep working while the configuration is broken.
        """
        from authd import config as config_mod  # noqa: PLC0415
        from authd.errors import ConfigError  # noqa: PLC0415

        if self.stopping:
            return
        try:
            new, data = config_mod.read(self.path)
        except ConfigError as ex:
            log.error("reload_failed", path=str(self.path), problems=ex.problems)  # noqa: TRY400 -- the problems are the message
            self.notifier.status(f"reload failed, still serving as before; {self.status}")
            self._signal_workers(signal.SIGUSR1)
            return
        self._write_snapshot(data)
        # The settings of the process stay as they are until a restart (workers say so).
        self.cfg = dataclasses.replace(
            new, listen=self.cfg.listen, workers=self.cfg.workers, audit_file=self.cfg.audit_file
        )
        self.notifier.reloading()
        # Every worker, also one still starting: it reloads once it has started.
        self.pending_reload = set(self.workers)
        self.reload_ok = True
        self._signal_workers(signal.SIGHUP)

    def _signal_workers(self, sig: signal.Signals) -> None:
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _reap(self, wake_r: int) -> int | None:
        from authd import metrics  # noqa: PLC0415 -- after `run` chose the metrics mode

        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid == 0:
                return None
            if self.workers.pop(pid, None) is None:
                continue
            self.spawned.pop(pid, None)
            self.started.discard(pid)
            self._reload_done(pid)
            metrics.worker_exited(pid)
            if self.stopping:
                log.info("worker_stopped", pid=pid, exit=_describe(status))
                continue
            log.error("worker_died", pid=pid, exit=_describe(status))
            now = time.monotonic()
            self.deaths = [t for t in self.deaths if now - t < RESPAWN_WINDOW] + [now]
            if len(self.deaths) > MAX_RESPAWNS:
                log.critical("workers_keep_dying", deaths=len(self.deaths), window_s=RESPAWN_WINDOW)
                self.stopping = True
                self._signal_workers(signal.SIGTERM)
                return 1
            self._spawn_worker(wake_r)

    def _kill_stuck(self, now: float) -> None:
        if self.stopping:
            return
        for pid, seen in list(self.workers.items()):
            if pid in self.started:
                stuck = now - seen > self.stuck_seconds
            else:
                stuck = now - self.spawned[pid] > STARTUP_SECONDS
            if stuck:
                log.error("worker_stuck", pid=pid, silent_s=round(now - seen, 1))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.workers[pid] = self.spawned[pid] = now  # reaped and replaced via SIGCHLD

    def _all_reporting(self, now: float) -> bool:
        """Every worker that has started reports in (one still starting does not count:
        its first key fetch may take up to its timeout, and it is watched by STARTUP_SECONDS)."""
        return bool(self.started) and all(
            now - self.workers[pid] < HEARTBEAT_SECONDS * 3 for pid in self.started
        )


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def run(cfg: Config, path: Path, source: bytes, sock: socket.socket) -> int:
    """Serve until stopped; the exit code for the command line.

    ``source`` is the bytes ``cfg`` was parsed from (the workers' snapshot).
    """
    log.info(
        "starting",
        version=__version__,
        listen=_describe_socket(sock),
        workers=cfg.workers,
        pid=os.getpid(),
    )
    if cfg.workers == 1:
        serve(cfg, path, sock, SystemdReporter(Notifier()))
        return 0
    # Before anything imports prometheus_client: its mode is fixed at import (authd.metrics).
    directory = Path(tempfile.mkdtemp(prefix="authd-"))
    metrics_dir = directory / "metrics"
    metrics_dir.mkdir()
    os.environ[METRICS_DIR_ENV] = str(metrics_dir)
    try:
        return Supervisor(cfg, path, source, sock, directory).run()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _describe_socket(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"unix:{name}"
