from dataclasses import replace

import falcon
import falcon.testing
import pytest
from structlog.testing import capture_logs

from authd.app import create_app
from authd.audit import Auditor
from authd.errors import Denied, Reason
from authd.keys import IssuerKeys, KeyStore
from tests.conftest import AUD, ISSUER, NOW, issuer_config, make_config, make_service

pytestmark = pytest.mark.usefixtures("store")


@pytest.fixture
def config():
    return make_config(
        wiki={"audience": [AUD], "allow_email_domains": ["example.com"]},
        open={"audience": [AUD]},
        de_only={"audience": [AUD], "require_claims": {"country": ["NL"]}},
    )


@pytest.fixture
def app(config, store, clock):
    return create_app(service=make_service(config, store, clock), auditor=Auditor())


@pytest.fixture
async def client(app):
    async with falcon.testing.ASGIConductor(app) as conductor:
        yield conductor


def decisions(logs):
    return [e for e in logs if e["event"] == "decision"]


async def test_allow_answers_200_with_identity_and_one_audit_line(client, forge):
    token = forge.valid()
    with capture_logs() as logs:
        resp = await client.simulate_get(
            "/auth/wiki",
            headers={
                "Cf-Access-Jwt-Assertion": token,
                "X-Original-URI": "/page?session=abc",
                "X-Original-Method": "POST",
                "X-Real-IP": "198.51.100.7",
                "X-Request-ID": "req-1",
            },
            host="wiki.example.com",
        )
    assert resp.status_code == 200
    assert resp.content == b""
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["X-Authd-Email"] == "alice@example.com"
    assert resp.headers["X-Authd-User"] == "alice@example.com"
    assert resp.headers["X-Authd-Groups"] == "sre,ops"
    assert resp.headers["X-Authd-Policy"] == "wiki"
    assert "X-Authd-Reason" not in resp.headers
    assert "Content-Type" not in resp.headers
    (line,) = decisions(logs)
    assert line | {"duration_ms": 0} == line | {
        "decision": "allow",
        "status": 200,
        "reason": None,
        "policy": "wiki",
        "rule": "allow_email_domains",
        "cached": False,
        "user": "alice@example.com",
        "email": "alice@example.com",
        "iss": ISSUER,
        "kid": forge.kid,
        "method": "POST",
        "uri": "/page?session=[redacted]",
        "host": "wiki.example.com",
        "client_ip": "198.51.100.7",
        "request_id": "req-1",
        "duration_ms": 0,
    }
    assert len(line["token_id"]) == 16
    assert "X-Accel-Expires" not in resp.headers  # only in micro-cache mode
    assert token not in repr(logs)


async def test_a_repeated_token_is_a_cache_hit_with_its_own_audit_line(client, forge):
    token = forge.valid()
    headers = {"Cf-Access-Jwt-Assertion": token}
    with capture_logs() as logs:
        first = await client.simulate_get("/auth/wiki", headers=headers)
        second = await client.simulate_get("/auth/wiki", headers=headers)
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.headers == first.headers
    lines = decisions(logs)
    assert [line["cached"] for line in lines] == [False, True]
    assert lines[1] | {"cached": False, "duration_ms": 0} == lines[0] | {"duration_ms": 0}


async def micro_cache_answers(store, clock, *tokens_and_paths):
    cfg = replace(
        make_config(wiki={"audience": [AUD], "allow_email_domains": ["example.com"]}),
        nginx_cache_seconds=30,
    )
    app = create_app(service=make_service(cfg, store, clock), auditor=Auditor())
    async with falcon.testing.ASGIConductor(app) as client:
        return [
            await client.simulate_get(path, headers={"Cf-Access-Jwt-Assertion": token})
            for token, path in tokens_and_paths
        ]


async def test_micro_cache_mode_lets_nginx_reuse_allows_until_exp_at_most(store, clock, forge):
    long, short, refused = (
        forge.valid(),
        forge.valid(exp=int(NOW) + 10),
        forge.valid(email="eve@evil.example"),
    )
    answers = await micro_cache_answers(
        store,
        clock,
        (long, "/auth/wiki"),
        (long, "/auth/wiki"),  # a hit in authd's own cache too
        (short, "/auth/wiki"),
        (refused, "/auth/wiki"),
        ("garbage", "/auth/wiki"),
        (long, "/auth/nope"),
    )
    expires = [a.headers.get("X-Accel-Expires") for a in answers]
    # The cap; a second short of exp; never a denial (0 forbids nginx to store it at all).
    assert expires == ["30", "30", "9", "0", "0", "0"]
    # nginx 1.22 honours X-Accel-Expires only before Cache-Control.
    names = [name.lower() for name, _ in answers[0].headers.items()]
    assert names.index("x-accel-expires") < names.index("cache-control")


async def test_micro_cache_mode_never_lets_nginx_keep_an_allow_past_exp(store, clock, forge):
    (answer,) = await micro_cache_answers(
        store, clock, (forge.valid(exp=int(NOW) + 1), "/auth/wiki")
    )
    assert (answer.status_code, answer.headers["X-Accel-Expires"]) == (200, "0")


@pytest.mark.parametrize(
    ("headers", "status", "reason"),
    [
        ({}, 401, Reason.NO_TOKEN),
        ({"Cf-Access-Jwt-Assertion": "garbage"}, 401, Reason.MALFORMED),
        ({"Cf-Access-Jwt-Assertion": "x" * 10_000}, 401, Reason.TOKEN_TOO_LARGE),
        ({"X-Authd-Email": "alice@example.com"}, 401, Reason.NO_TOKEN),
        ({"Cf-Access-Authenticated-User-Email": "alice@example.com"}, 401, Reason.NO_TOKEN),
    ],
)
async def test_without_a_valid_token_401(client, headers, status, reason):
    with capture_logs() as logs:
        resp = await client.simulate_get("/auth/wiki", headers=headers)
    assert resp.status_code == status
    assert resp.headers["X-Authd-Reason"] == reason.value
    assert resp.content == b""
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert not any(
        h.lower().startswith("x-authd-") and h.lower() != "x-authd-reason" for h in resp.headers
    )
    (line,) = decisions(logs)
    assert (line["decision"], line["reason"]) == ("deny", reason.value)


async def test_www_authenticate_says_invalid_token_only_when_a_token_was_sent(client, forge):
    resp = await client.simulate_get("/auth/wiki")
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    resp = await client.simulate_get(
        "/auth/wiki", headers={"Cf-Access-Jwt-Assertion": forge.valid(aud=["x"])}
    )
    assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert resp.headers["X-Authd-Reason"] == "bad_audience"


async def test_policy_refusal_is_403_and_names_the_user_in_the_log(client, forge):
    with capture_logs() as logs:
        resp = await client.simulate_get(
            "/auth/wiki",
            headers={"Cf-Access-Jwt-Assertion": forge.valid(email="eve@evil.org")},
        )
        resp2 = await client.simulate_get(
            "/auth/de_only",
            headers={"Cf-Access-Jwt-Assertion": forge.valid()},
        )
    assert (resp.status_code, resp.headers["X-Authd-Reason"]) == (403, "not_allowed")
    assert (resp2.status_code, resp2.headers["X-Authd-Reason"]) == (403, "requirement_failed")
    assert "WWW-Authenticate" not in resp.headers
    assert "X-Authd-Email" not in resp.headers
    first, second = decisions(logs)
    assert (first["user"], first["reason"]) == ("eve@evil.org", "not_allowed")
    assert second["reason"] == "requirement_failed"


@pytest.mark.parametrize("path", ["/auth/nope", "/auth/", "/auth/wiki/extra", "/auth/WIKI"])
async def test_unknown_policy_is_403_and_an_error_in_the_log(client, forge, path):
    with capture_logs() as logs:
        resp = await client.simulate_get(path, headers={"Cf-Access-Jwt-Assertion": forge.valid()})
    assert (resp.status_code, resp.headers["X-Authd-Reason"]) == (403, "unknown_policy")
    (line,) = decisions(logs)
    assert line["log_level"] == "error"


@pytest.mark.parametrize(
    "method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "MKCOL"]
)
async def test_every_method_gets_the_same_decision(client, forge, method):
    ok = await client.simulate_request(
        method,
        "/auth/wiki",
        headers={"Cf-Access-Jwt-Assertion": forge.valid()},
        body=b"x" * 1000,
    )
    no = await client.simulate_request(method, "/auth/wiki", body=b"x" * 1000)
    assert (ok.status_code, no.status_code) == (200, 401)


@pytest.mark.parametrize(
    "facts",
    [
        {"X-Original-URI": "/healthz"},
        {"X-Original-URI": "/../../admin\r\n"},
        {"X-Original-URI": "http://evil/" + "a" * 5000},
        {"X-Original-Method": "OPTIONS"},
        {"User-Agent": "kube-probe/1.29"},
        {"User-Agent": "ELB-HealthChecker/2.0"},
        {"X-Forwarded-For": "127.0.0.1"},
        {"X-Forwarded-Host": "localhost"},
        {"X-Real-IP": "127.0.0.1"},
        {"Host": "localhost"},
    ],
)
async def test_request_facts_never_change_the_decision(client, forge, facts):
    assert (await client.simulate_get("/auth/wiki", headers=facts)).status_code == 401
    expired = forge.valid(exp=1_800_000_000 - 3600, iat=1_799_990_000, nbf=1_799_990_000)
    resp = await client.simulate_get(
        "/auth/wiki", headers={**facts, "Cf-Access-Jwt-Assertion": expired}
    )
    assert (resp.status_code, resp.headers["X-Authd-Reason"]) == (401, "expired")
    resp = await client.simulate_get(
        "/auth/wiki", headers={**facts, "Cf-Access-Jwt-Assertion": forge.valid()}
    )
    assert resp.status_code == 200


async def test_keys_unavailable_is_503_but_no_token_stays_401(config, clock, forge, source):
    source.error = "connection refused"
    keys = IssuerKeys(issuer_config(), source, clock)
    store = KeyStore([keys])
    app = create_app(service=make_service(config, store, clock), auditor=Auditor())
    async with falcon.testing.ASGIConductor(app) as client:
        assert (await client.simulate_get("/readyz")).status_code == 503
        resp = await client.simulate_get(
            "/auth/wiki", headers={"Cf-Access-Jwt-Assertion": forge.valid()}
        )
        assert (resp.status_code, resp.headers["X-Authd-Reason"]) == (503, "keys_unavailable")
        assert (await client.simulate_get("/auth/wiki")).status_code == 401
        # The endpoint comes back: the next refresh makes authd ready, without a restart.
        source.error = None
        await keys.refresh()
        ready = await client.simulate_get("/readyz")
        assert ready.status_code == 200
        assert ready.json["issuers"]["team"]["usable"] is True
        resp = await client.simulate_get(
            "/auth/wiki", headers={"Cf-Access-Jwt-Assertion": forge.valid()}
        )
        assert resp.status_code == 200


class Exploding:
    async def verify_with_keys(self, _token, _audience, **_where):
        raise RuntimeError("a bug somewhere deep")


async def test_an_unexpected_exception_is_500_never_200(config, store, clock, forge):
    service = make_service(config, store, clock)
    service.current.authorizer.verifier = Exploding()
    app = create_app(service=service, auditor=Auditor())
    token = forge.valid()
    async with falcon.testing.ASGIConductor(app) as client:
        with capture_logs() as logs:
            resp = await client.simulate_get(
                "/auth/wiki", headers={"Cf-Access-Jwt-Assertion": token}
            )
    assert resp.status_code == 500
    assert resp.content == b""
    assert resp.headers["X-Authd-Reason"] == "internal_error"
    assert "X-Authd-Email" not in resp.headers
    (line,) = decisions(logs)
    assert (line["decision"], line["log_level"]) == ("error", "error")
    assert line["exc_info"][0] is RuntimeError
    assert token not in repr(logs)


async def test_health_and_readiness(client):
    health = await client.simulate_get("/healthz")
    assert (health.status_code, health.json) == (200, {"status": "ok"})
    ready = await client.simulate_get("/readyz")
    assert ready.status_code == 200
    assert ready.json["ready"] is True
    assert ready.json["issuers"]["team"]["kids"] == 1


def sample(text: str, line_prefix: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix)
    )


async def test_metrics_count_decisions_by_policy_decision_and_reason(client, forge):
    allow = 'authd_decisions_total{decision="allow",policy="wiki",reason=""}'
    no_token = 'authd_decisions_total{decision="deny",policy="wiki",reason="no_token"}'
    unknown = 'authd_decisions_total{decision="deny",policy="(unknown)",reason="unknown_policy"}'
    before = (await client.simulate_get("/metrics")).text

    await client.simulate_get("/auth/wiki", headers={"Cf-Access-Jwt-Assertion": forge.valid()})
    await client.simulate_get("/auth/wiki")
    await client.simulate_get("/auth/wiki")
    await client.simulate_get("/auth/no-such-policy-" + "x" * 40)

    resp = await client.simulate_get("/metrics")
    assert resp.headers["content-type"].startswith("text/plain; version=")
    after = resp.text
    assert sample(after, allow) - sample(before, allow) == 1
    assert sample(after, no_token) - sample(before, no_token) == 2
    assert sample(after, unknown) - sample(before, unknown) == 1  # one label for any unknown name
    assert "no-such-policy" not in after
    count = "authd_decision_duration_seconds_count"
    assert sample(after, count) - sample(before, count) == 4


class RecordingClient:
    """A verifier that notes whose budget a key fetch would count against, and refuses."""

    def __init__(self) -> None:
        self.clients: list[str] = []

    async def verify_with_keys(self, _token, _audience, **where):
        self.clients.append(where["client"])
        raise Denied(Reason.UNKNOWN_KID, "recorded")


async def test_the_address_nginx_saw_is_the_client_a_key_fetch_counts_against(
    config, store, clock, forge
):
    service = make_service(config, store, clock)
    recording = RecordingClient()
    service.current.authorizer.verifier = recording  # type: ignore[assignment]
    app = create_app(service=service, auditor=Auditor())
    token = forge.valid()
    async with falcon.testing.ASGIConductor(app) as client:
        for real_ip in ("203.0.113.9", "", "x" * 100):
            headers = {"Cf-Access-Jwt-Assertion": token}
            if real_ip:
                headers["X-Real-IP"] = real_ip
            resp = await client.simulate_get("/auth/wiki", headers=headers)
            assert resp.status_code == 401
    assert recording.clients == ["203.0.113.9", "", "x" * 64]
