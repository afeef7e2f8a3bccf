"""Logging: structlog rendering JSON lines, and the one decision event per request.

The shape of the audit line is decided here and nowhere else. A line is written and
flushed as soon as its decision is made, so a killed process loses no line of a
request it answered. No token ever reaches a log line: only its short fingerprint.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

import orjson
import structlog

from authd.errors import Reason

if TYPE_CHECKING:
    from pathlib import Path

    from authd.decision import Decision
    from authd.headers import RequestFacts

# Tracebacks as JSON, without local variables: a frame's locals may hold the token.
_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False),
)
_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
]


def _dumps(event: object, default: Callable[[object], object]) -> str:
    """orjson: a tenth of ``json.dumps``'s time, on every request; the rare value it cannot
    take (an integer beyond 64 bits) falls back to ``json.dumps``."""
    try:
        return orjson.dumps(event, default=default, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(event, default=default)


_JSON = structlog.processors.JSONRenderer(serializer=_dumps)
_PROCESSORS: list[Any] = [*_SHARED, _TRACEBACKS, _JSON]


def configure(
    stream: TextIO | None = None,
    level: int = logging.INFO,
    *,
    cache: bool = True,
) -> None:
    """Render every event, authd's and the libraries' (uvicorn, httpx), as one JSON line.

    ``cache`` freezes each logger's configuration on first use (the daemon's hot path);
    one-shot commands and tests that reconfigure logging pass False.
    """
    stream = stream if stream is not None else sys.stdout
    structlog.configure(
        processors=_PROCESSORS,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=cache,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_SHARED, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _TRACEBACKS,
                _JSON,
            ],
        ),
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request URL at INFO; key fetches have their own events.
    logging.getLogger("httpx").setLevel(logging.WARNING)


class AuditFile:
    """The ``audit_file``: appended to a line at a time, reopened after logrotate moved it.

    Every worker process opens the file for itself with ``O_APPEND``; a line is one
    ``write``, so lines of different workers never interleave.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = self._open()

    def _open(self) -> TextIO:
        return self.path.open("a", encoding="utf-8", buffering=1)

    def write(self, text: str) -> None:
        self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def reopen(self) -> None:
        """Open the path anew (a new file after a rotation); on failure keep the old one."""
        try:
            new = self._open()
        except OSError as ex:
            structlog.get_logger("authd.audit").error(
                "audit_file_reopen_failed", path=str(self.path), error=str(ex)
            )
            return
        old, self._file = self._file, new
        old.close()

    def close(self) -> None:
        self._file.close()


class Auditor:
    """Writes the decision events: to the configured logging stream, or to an audit file."""

    def __init__(self, file: AuditFile | None = None) -> None:
        self.file = file
        self.pid = os.getpid()  # which worker decided (created in the serving process)
        if file is None:
            self._log = structlog.get_logger("authd.audit")
        else:
            self._log = structlog.wrap_logger(
                structlog.WriteLogger(file),  # type: ignore[arg-type]  # duck-typed file
                processors=_PROCESSORS,
                wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
                cache_logger_on_first_use=True,
            )

    def decision(self, d: Decision, facts: RequestFacts, duration_ms: float) -> None:
        c = d.claims
        fields = {
            "decision": d.decision,
            "status": d.status,
            "reason": d.reason.value if d.reason is not None else None,
            "policy": d.policy,
            "rule": d.rule,
            "cached": d.cached,
            "user": c.user if c else None,
            "email": c.email or None if c else None,
            "sub": c.sub or None if c else None,
            "service_token": c.service_token or None if c else None,
            "issuer": c.issuer_name if c else None,
            "iss": c.iss if c else None,
            "kid": c.kid if c else None,
            "token_id": d.token_id,
            "method": facts.method,
            "uri": facts.uri,
            "host": facts.host,
            "client_ip": facts.client_ip,
            "request_id": facts.request_id,
            "duration_ms": round(duration_ms, 3),
            "pid": self.pid,
        }
        if d.enrichment is not None:
            fields["enrichment"] = d.enrichment
        if d.detail:
            fields["detail"] = d.detail
        if d.decision == "error" or d.reason is Reason.UNKNOWN_POLICY:
            # unknown_policy is nginx's configuration pointing at a policy authd lacks.
            self._log.error("decision", exc_info=d.exc_info, **fields)
        else:
            self._log.info("decision", **fields)
