"""The HTTP application nginx talks to: ``/auth/<policy>``, health, readiness, metrics."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import falcon
import falcon.asgi
import structlog

from authd import metrics
from authd.decision import enrichment_failed
from authd.errors import Reason
from authd.headers import RequestFacts, find_token

if TYPE_CHECKING:
    from authd.audit import Auditor
    from authd.decision import Decision
    from authd.keys import Clock
    from authd.service import Service

log = structlog.get_logger("authd.app")

AUTH_PREFIX = "/auth/"


class AuthSink:
    """``/auth/<policy>`` for any method; the body is never read, every answer has none."""

    def __init__(self, service: Service, auditor: Auditor) -> None:
        self.service = service
        self.auditor = auditor

    async def __call__(
        self,
        req: Request,
        resp: falcon.asgi.Response | None,
        **_: Any,  # noqa: ANN401 -- Falcon's sink signature
    ) -> None:
        assert resp is not None  # None only for WebSocket routes
        started = time.perf_counter()
        gen = self.service.current  # one generation for the whole request, even across a reload
        policy = req.path[len(AUTH_PREFIX) :]
        if "/" in policy:
            policy = ""
        headers = req.every_value
        client = (headers.get_header("X-Real-IP") or "")[:64]  # set by authd-server.conf
        decision = await gen.authorizer.decide(policy, lambda s: find_token(s, headers), client)
        render(decision, resp, gen.config.nginx_cache_seconds, self.service.clock)
        seconds = time.perf_counter() - started
        metrics.observe(decision, policy in gen.authorizer.plans, seconds)
        facts = RequestFacts.from_request(headers, req.method)
        self.auditor.decision(decision, facts, seconds * 1000)


class Request(falcon.asgi.Request):
    """Falcon's request, with every value of every header kept too (``every_value``).

    Falcon keeps only the last of repeated ``Cookie`` headers (a "singleton" header for it),
    so a second ``Cookie`` line would hide the first one's token instead of making the
    request ambiguous: token extraction and the request facts read :class:`EveryValue`.
    ASGI allows ``scope["headers"]`` to be a one-shot iterable (Falcon's test client makes
    it one), so it is made a list before both read it.
    """

    def __init__(self, scope: dict[str, Any], *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 -- Falcon's signature
        raw = scope["headers"]
        if not isinstance(raw, list):
            raw = [(bytes(n), bytes(v)) for n, v in raw]
            scope = {**scope, "headers": raw}
        self.every_value = EveryValue(raw)
        super().__init__(scope, *args, **kwargs)


class EveryValue:
    """A request's headers, every repeat of a header joined by ",", decoded as Falcon does
    (Latin-1); read in one pass. Names are ASCII-lowercased, as ASGI servers send them."""

    __slots__ = ("_values",)

    def __init__(self, raw: Iterable[tuple[bytes, bytes]]) -> None:
        values: dict[bytes, str] = {}
        for name, value in raw:
            key = name.lower()
            text = value.decode("latin-1")
            prior = values.get(key)
            values[key] = text if prior is None else f"{prior},{text}"
        self._values = values

    def get_header(self, name: str) -> str | None:
        return self._values.get(name.lower().encode("latin-1"))


def render(d: Decision, resp: falcon.asgi.Response, nginx_cache_seconds: int, clock: Clock) -> None:
    """The wire form of a decision: status and headers, decided here and nowhere else.

    With ``nginx_cache_seconds`` (micro-cache mode), ``X-Accel-Expires`` tells nginx how
    long it may reuse an allow (never past the token's ``exp``) and forbids reusing
    anything else. It comes first: nginx 1.22 ignores it after a ``Cache-Control``.
    """
    resp.status = d.status
    if nginx_cache_seconds:
        ttl = nginx_ttl(d, nginx_cache_seconds, clock.time())
        resp.set_header("X-Accel-Expires", str(ttl))
    resp.set_header("Cache-Control", "no-store")
    for name, value in d.headers:
        resp.set_header(name, value)
    if d.reason is not None:
        resp.set_header("X-Authd-Reason", d.reason.value)
    if d.status == 401:
        # RFC 6750: no error code when the request carried no credentials at all.
        resp.set_header(
            "WWW-Authenticate",
            "Bearer" if d.reason is Reason.NO_TOKEN else 'Bearer error="invalid_token"',
        )


def nginx_ttl(d: Decision, cap: int, now: float) -> int:
    """Whole seconds nginx may reuse this answer: 0 (never) unless it is an allow.

    One second short of ``exp``: nginx counts in whole seconds of its own clock, and an
    entry must be gone by the time the token expires.
    """
    if d.status != 200 or d.claims is None or enrichment_failed(d.enrichment):
        return 0  # an allow without get-identity's answer: the next request asks again
    return max(0, min(cap, math.floor(d.claims.exp - now) - 1))


class Health:
    """``/healthz``: the process is up and serving."""

    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.media = {"status": "ok"}

    on_head = on_get


class Ready:
    """``/readyz``: 200 only when every issuer has a usable key set, else 503."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        keys = self.service.current.keys
        ready = keys.ready()
        resp.status = 200 if ready else 503
        resp.content_type = falcon.MEDIA_JSON
        resp.media = {
            "ready": ready,
            "status": self.service.status(),
            "issuers": {
                k.name: {
                    "usable": k.usable(),
                    "key_set_age_s": None if (age := k.age()) is None else round(age, 1),
                    "kids": len(k.kids()),
                    "last_error": k.last_error,
                }
                for k in keys.issuers.values()
            },
        }

    on_head = on_get


class Metrics:
    """``/metrics``: Prometheus text format, over every worker process."""

    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = metrics.CONTENT_TYPE
        resp.data = metrics.render()


class Lifecycle:
    """Startup: the first fetch of every key set (bounded), then background refresh."""

    def __init__(
        self,
        service: Service,
        started: Sequence[Callable[[], Awaitable[None]]],
        closing: Sequence[Callable[[], Awaitable[None]]],
    ) -> None:
        self.service = service
        self.started = started
        self.closing = closing

    async def process_startup(self, _scope: object, _event: object) -> None:
        await self.service.start()
        keys = self.service.current.keys
        log.info(
            "started",
            ready=keys.ready(),
            issuers={k.name: k.usable() for k in keys.issuers.values()},
            status=self.service.status(),
        )
        for hook in self.started:
            await hook()

    async def process_shutdown(self, _scope: object, _event: object) -> None:
        await self.service.stop()
        for close in self.closing:
            await close()


async def _unexpected(
    req: falcon.asgi.Request,
    resp: falcon.asgi.Response,
    ex: Exception,
    _params: object,
) -> None:
    # A backstop outside the decision path (the decision itself never raises): 500, no body.
    log.error("unhandled_exception", path=req.path, exc_info=ex)
    resp.status = 500
    resp.set_header("Cache-Control", "no-store")
    resp.set_header("X-Authd-Reason", Reason.INTERNAL_ERROR.value)


def create_app(
    *,
    service: Service,
    auditor: Auditor,
    started: Sequence[Callable[[], Awaitable[None]]] = (),
    closing: Sequence[Callable[[], Awaitable[None]]] = (),
) -> falcon.asgi.App[Request, falcon.asgi.Response]:
    """Build the application from ready-made collaborators (the CLI and tests make them).

    ``started`` are called once the first key fetches have finished; ``closing`` at
    shutdown, after the key refresh has stopped.
    """
    app: falcon.asgi.App[Request, falcon.asgi.Response] = falcon.asgi.App(
        middleware=[Lifecycle(service, started, closing)],
        request_type=Request,
    )
    # Auth answers have no body, so no Content-Type either; JSON resources set theirs.
    app.resp_options.default_media_type = None  # type: ignore[assignment]
    app.add_sink(AuthSink(service, auditor), prefix=AUTH_PREFIX)
    app.add_route("/healthz", Health())
    app.add_route("/readyz", Ready(service))
    app.add_route("/metrics", Metrics())
    app.add_error_handler(Exception, _unexpected)
    return app
