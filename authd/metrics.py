"""Prometheus metrics, correct across worker processes.

With several workers, prometheus_client's multiprocess mode keeps every process's values
in files under one directory and ``/metrics`` (answered by any worker) adds them up. That
mode is chosen by the ``PROMETHEUS_MULTIPROC_DIR`` environment variable *at import time*
of prometheus_client, so the supervisor (authd.server) sets it before anything imports this
module. A single process keeps its values in memory.

Key set freshness is exported as the time of the last successful fetch, not as an age
(Prometheus practice: ``time() - authd_keys_last_success_timestamp_seconds``); across
workers the oldest one is reported, because that is the one that expires first.
"""

from __future__ import annotations

import os
import platform
from typing import TYPE_CHECKING, Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

from authd import __version__
from authd.enrich import FETCH_RESULTS

if TYPE_CHECKING:
    from authd.decision import Decision

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

DECISIONS = Counter(
    "authd_decisions",
    "Decisions by policy, decision (allow, deny, error) and reason code ('' on allow).",
    ["policy", "decision", "reason"],
)
DURATION = Histogram(
    "authd_decision_duration_seconds",
    "Time from the auth request's arrival to its answer, inside authd.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1, 3, 5),
)
ALLOWS = Counter(
    "authd_allows",
    "Allows by how they were decided: from the decision cache (cache), or verified in full.",
    ["source"],
)
CACHE_ENTRIES = Gauge(
    "authd_decision_cache_entries",
    "Allows held in the decision cache (summed over workers).",
    multiprocess_mode="livesum",
)
KEY_FETCHES = Counter(
    "authd_key_fetches",
    "Key set fetches by issuer and result (ok, error).",
    ["issuer", "result"],
)
KEYS_LAST_SUCCESS = Gauge(
    "authd_keys_last_success_timestamp_seconds",
    "Unix time of the last successful key fetch per issuer (the oldest across workers).",
    ["issuer"],
    multiprocess_mode="livemin",
)
KEYS_USABLE = Gauge(
    "authd_keys_usable",
    "1 when the issuer's key set is usable in every worker, else 0.",
    ["issuer"],
    multiprocess_mode="livemin",
)
ENRICHMENT_FETCHES = Counter(
    "authd_enrichment_fetches",
    "get-identity fetches by result: ok, or why the answer was not used (timeout, http_error, "
    "transport, too_large, bad_response, mismatch).",
    ["result"],
)
ENRICHMENT_CACHE_HITS = Counter(
    "authd_enrichment_cache_hits",
    "Enriched identities served from the get-identity cache, without a fetch.",
)
for _result in FETCH_RESULTS:  # every result is exported from the start, at 0
    ENRICHMENT_FETCHES.labels(_result)
BUILD_INFO = Gauge(
    "authd_build_info",
    "authd's version and the Python running it; always 1.",
    ["version", "python"],
    multiprocess_mode="livemax",
)
BUILD_INFO.labels(__version__, platform.python_version()).set(1)

# Known policies are a fixed set; anything else nginx asks for is counted under one label,
# so the label set stays bounded whatever the URL says.
UNKNOWN_POLICY_LABEL = "(unknown)"


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


# The counters' children by label values: labels() takes a lock and builds tuples on every
# call; the label sets are few and fixed (see UNKNOWN_POLICY_LABEL), so each is looked up once.
_DECISION_CHILDREN: dict[tuple[str, str, str, bool], Any] = {}


def observe(decision: Decision, known_policy: bool, seconds: float) -> None:
    policy = decision.policy if known_policy else UNKNOWN_POLICY_LABEL
    reason = decision.reason.value if decision.reason is not None else ""
    key = (policy, decision.decision, reason, decision.cached)
    children = _DECISION_CHILDREN.get(key)
    if children is None:
        children = _DECISION_CHILDREN[key] = (
            DECISIONS.labels(*key[:3]),
            ALLOWS.labels("cache" if decision.cached else "verified"),
        )
    children[0].inc()
    if decision.status == 200:
        children[1].inc()
    DURATION.observe(seconds)


def cache_entries(count: int) -> None:
    CACHE_ENTRIES.set(count)


def key_fetch(issuer: str, *, ok: bool, wall_time: float) -> None:
    KEY_FETCHES.labels(issuer, "ok" if ok else "error").inc()
    if ok:
        KEYS_LAST_SUCCESS.labels(issuer).set(wall_time)


def keys_usable(issuer: str, usable: bool) -> None:
    KEYS_USABLE.labels(issuer).set(1 if usable else 0)


def enrichment_fetch(result: str) -> None:
    """Count one get-identity fetch; ``result`` is one of :data:`authd.enrich.FETCH_RESULTS`."""
    ENRICHMENT_FETCHES.labels(result).inc()


def enrichment_cache_hit() -> None:
    ENRICHMENT_CACHE_HITS.inc()


def worker_exited(pid: int) -> None:
    """Forget a dead worker's live gauges (its counters still count)."""
    if multiprocess_enabled():
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def render() -> bytes:
    """The text exposition of every metric, summed over the workers when there are several."""
    if multiprocess_enabled():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return prometheus_client.generate_latest(registry)
    return prometheus_client.generate_latest()
