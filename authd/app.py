"""The HTTP application nginx talks to: ``/auth/<policy>``, ``/healthz``, ``/readyz``."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import falcon
import falcon.asgi
import structlog

from authd.errors import Reason
from authd.headers import RequestFacts, extract_token

if TYPE_CHECKING:
    from authd.audit import Auditor
    from authd.config import TokenSource
    from authd.decision import Authorizer, Decision
    from authd.keys import KeyStore

log = structlog.get_logger("authd.app")

AUTH_PREFIX = "/auth/"


class AuthSink:
    """``/auth/<policy>`` for any method; the body is never read, every answer has none."""

    def __init__(
        self,
        authorizer: Authorizer,
        token_sources: tuple[TokenSource, ...],
        auditor: Auditor,
    ) -> None:
        self.authorizer = authorizer
        self.token_sources = token_sources
        self.auditor = auditor

    async def __call__(
        self,
        req: falcon.asgi.Request,
        resp: falcon.asgi.Response | None,
        **_: Any,  # noqa: ANN401 -- Falcon's sink signature
    ) -> None:
        assert resp is not None  # None only for WebSocket routes
        started = time.perf_counter()
        policy = req.path[len(AUTH_PREFIX) :]
        decision = await self.authorizer.decide(
            policy if "/" not in policy else "",
            lambda: extract_token(self.token_sources, req),
        )
        render(decision, resp)
        facts = RequestFacts.from_request(req, req.method)
        self.auditor.decision(decision, facts, (time.perf_counter() - started) * 1000)


def render(d: Decision, resp: falcon.asgi.Response) -> None:
    """The wire form of a decision: status and headers, decided here and nowhere else."""
    resp.status = d.status
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


class Health:
    """``/healthz``: the process is up and serving."""

    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.media = {"status": "ok"}

    on_head = on_get


class Ready:
    """``/readyz``: 200 only when every issuer has a usable key set, else 503."""

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys

    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        ready = self.keys.ready()
        resp.status = 200 if ready else 503
        resp.content_type = falcon.MEDIA_JSON
        resp.media = {
            "ready": ready,
            "issuers": {
                k.name: {
                    "usable": k.usable(),
                    "key_set_age_s": None if (age := k.age()) is None else round(age, 1),
                    "kids": len(k.kids()),
                    "last_error": k.last_error,
                }
                for k in self.keys.issuers.values()
            },
        }

    on_head = on_get


class Lifecycle:
    """Startup: the first fetch of every key set (bounded), then background refresh."""

    def __init__(self, keys: KeyStore, closing: Sequence[Callable[[], Awaitable[None]]]) -> None:
        self.keys = keys
        self.closing = closing

    async def process_startup(self, _scope: object, _event: object) -> None:
        await self.keys.start()
        log.info(
            "started",
            ready=self.keys.ready(),
            issuers={k.name: k.usable() for k in self.keys.issuers.values()},
        )

    async def process_shutdown(self, _scope: object, _event: object) -> None:
        await self.keys.stop()
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
    authorizer: Authorizer,
    keys: KeyStore,
    auditor: Auditor,
    token_sources: tuple[TokenSource, ...],
    closing: Sequence[Callable[[], Awaitable[None]]] = (),
) -> falcon.asgi.App[falcon.asgi.Request, falcon.asgi.Response]:
    """Build the application from ready-made collaborators (the CLI and tests make them).

    ``closing`` are called at shutdown, after the key refresh has stopped.
    """
    app: falcon.asgi.App[falcon.asgi.Request, falcon.asgi.Response] = falcon.asgi.App(
        middleware=[Lifecycle(keys, closing)],
    )
    # Auth answers have no body, so no Content-Type either; JSON resources set theirs.
    app.resp_options.default_media_type = None  # type: ignore[assignment]
    app.add_sink(AuthSink(authorizer, token_sources, auditor), prefix=AUTH_PREFIX)
    app.add_route("/healthz", Health())
    app.add_route("/readyz", Ready(keys))
    app.add_error_handler(Exception, _unexpected)
    return app
