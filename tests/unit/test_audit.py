import io
import json
import logging
import os
import re
import sys

import structlog

from authd import audit
from authd.decision import Decision
from authd.errors import Reason
from authd.headers import RequestFacts

FACTS = RequestFacts(method="GET", uri="/x", host="h", client_ip="192.0.2.1", request_id="r")


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_decision_lines_are_json_with_rfc3339_utc_timestamps():
    out = io.StringIO()
    audit.configure(out, cache=False)
    audit.Auditor().decision(
        Decision(status=401, policy="wiki", reason=Reason.EXPIRED, token_id="abcd", detail="old"),
        FACTS,
        1.23456,
    )
    (line,) = lines(out)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", line["timestamp"])
    assert line["event"] == "decision"
    assert {k: line[k] for k in ("decision", "status", "reason", "policy", "token_id")} == {
        "decision": "deny",
        "status": 401,
        "reason": "expired",
        "policy": "wiki",
        "token_id": "abcd",
    }
    assert line["detail"] == "old"
    assert line["duration_ms"] == 1.235
    expected_keys = {
        "timestamp",
        "event",
        "level",
        "decision",
        "status",
        "reason",
        "policy",
        "rule",
        "cached",
        "user",
        "email",
        "sub",
        "service_token",
        "issuer",
        "iss",
        "kid",
        "token_id",
        "method",
        "uri",
        "host",
        "client_ip",
        "request_id",
        "duration_ms",
        "detail",
        "pid",
    }
    assert set(line) == expected_keys
    assert line["pid"] == os.getpid()


class Flushes(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[int] = []

    def flush(self) -> None:
        self.flushed.append(len(self.getvalue()))


def test_every_line_is_flushed_when_written():
    out = Flushes()
    audit.configure(out, cache=False)
    auditor = audit.Auditor()
    for _ in range(3):
        auditor.decision(Decision(status=401, policy="p", reason=Reason.NO_TOKEN), FACTS, 0)
    assert out.flushed == [len(out.getvalue()) // 3 * i for i in (1, 2, 3)]


def test_errors_carry_a_traceback_without_local_variables():
    out = io.StringIO()
    audit.configure(out, cache=False)
    secret_token = "eyJhbGciOiJSUzI1NiJ9.eyJzZWNyZXQiOnRydWV9.c2lnbmF0dXJlc2lnbmF0dXJl"

    def fail(token: str) -> None:  # noqa: ARG001 -- a local of the failing frame
        raise RuntimeError("boom")

    try:
        fail(secret_token)  # the token is a local variable of the failing frame
    except RuntimeError:
        exc_info = sys.exc_info()
    audit.Auditor().decision(
        Decision(status=500, policy="p", reason=Reason.INTERNAL_ERROR, exc_info=exc_info),  # type: ignore[arg-type]
        FACTS,
        0,
    )
    (line,) = lines(out)
    assert line["level"] == "error"
    assert line["exception"][0]["exc_type"] == "RuntimeError"
    assert secret_token not in out.getvalue()


def test_library_log_records_become_json_lines_too():
    out = io.StringIO()
    audit.configure(out, cache=False)
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
    logging.getLogger("httpx").info("HTTP Request: GET https://x/certs")  # silenced below WARNING
    (line,) = lines(out)
    assert line["event"] == "Started server process [42]"
    assert line["logger"] == "uvicorn.error"


def test_other_events_have_their_own_names():
    out = io.StringIO()
    audit.configure(out, cache=False)
    structlog.get_logger("authd.keys").warning("keys_fetch_failed", issuer="cf")
    (line,) = lines(out)
    assert (line["event"], line["level"], line["issuer"]) == ("keys_fetch_failed", "warning", "cf")
