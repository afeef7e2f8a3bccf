"""Decisions with get-identity enrichment: what the user and the operator of an application notice.

Through ``Authorizer.from_config`` (what the app builds) with authd's own HTTP client, against
devtools.standins.GetIdentityServer on 127.0.0.1 (one per module, reset per test): the full group
list, device posture, idp and amr rules, the enriched headers, every way get-identity can fail
and what each policy then answers, service tokens, policies and issuers that never ask, the
decision cache, the audit line, the metrics, and the token kept out of every log and error.
Tokens come from conftest's forge (so the leak check watches them too); time is its FakeClock.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from authd import config as config_mod
from authd.audit import Auditor
from authd.decision import Authorizer, Decision
from authd.enrich import FETCH_RESULTS
from authd.errors import Reason
from authd.fetch import make_http_client
from authd.headers import RequestFacts
from authd.keys import IssuerKeys, KeyStore
from devtools.standins import (
    DEFAULT_GROUPS,
    DISK_ENCRYPTION_RULE_ID,
    DISK_ENCRYPTION_RULE_NAME,
    FIREWALL_RULE_ID,
    FIREWALL_RULE_NAME,
    GetIdentityServer,
    IdentityReply,
    documented_identity,
)
from tests.conftest import AUD, DROP, ISSUER, NOW

GENEROUS = 10.0  # seconds: a bound on what should take milliseconds, never a measurement
TIMEOUT = 2.0  # get_identity_timeout_seconds where a test does not wait for it to pass
SHORT_TIMEOUT = 0.2  # where it does
OIDC_ISSUER = "https://idp.example.com"
SERVICE_TOKEN = "3b9f0e1c2d4a5b6c7d8e9f0a1b2c3d4e.access"
EVERYONE_ID, EVERYONE = DEFAULT_GROUPS[2]  # a group get-identity lists and the token does not
FULL_GROUPS = ",".join(name for _, name in DEFAULT_GROUPS)  # "sre,ops,everyone"
TOKEN_GROUPS = "sre,ops"  # conftest's custom.groups
FACTS = RequestFacts(
    method="GET",
    uri="/wiki/",
    host="wiki.example.com",
    client_ip="203.0.113.7",
    request_id="req-1",
)


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
def server(identity_server) -> GetIdentityServer:
    return identity_server  # tests/conftest.py: the stand-in, reset for each test


@pytest.fixture(scope="module")
def dead_url() -> str:
    """A get-identity URL on 127.0.0.1 that nothing listens on any more."""
    with GetIdentityServer() as gone:
        pass
    return gone.url


@pytest.fixture
async def client():
    c = make_http_client()
    yield c
    await c.aclose()


def configure(
    url: str,
    *,
    seconds: float = TIMEOUT,
    issuer_enriches: bool = True,
    **policies: dict[str, object],
) -> config_mod.Config:
    """A Cloudflare issuer "team" whose get-identity is ``url``, an OIDC issuer "idp", and
    ``policies`` (each with the test audience)."""
    raw: dict[str, object] = {
        "issuers": [
            {
                "name": "team",
                "issuer": ISSUER,
                "jwks_url": f"{ISSUER}/cdn-cgi/access/certs",
                "get_identity": issuer_enriches,
                "get_identity_url": url,
                "get_identity_timeout_seconds": seconds,
            },
            {
                "name": "idp",
                "provider": "oidc",
                "issuer": OIDC_ISSUER,
                "jwks_url": f"{OIDC_ISSUER}/k",
            },
        ],
        "policies": {name: {"audience": [AUD], **rules} for name, rules in policies.items()},
    }
    return config_mod.parse(raw)


@pytest.fixture
def make_authorizer(server, client, clock, source):
    """An Authorizer as the app builds it, with both issuers' keys loaded (conftest's key)."""

    async def make(
        url: str | None = None,
        *,
        seconds: float = TIMEOUT,
        issuer_enriches: bool = True,
        **policies: dict[str, object],
    ) -> Authorizer:
        cfg = configure(
            server.url if url is None else url,
            seconds=seconds,
            issuer_enriches=issuer_enriches,
            **policies,
        )
        keys = [IssuerKeys(i, source, clock) for i in cfg.issuers]
        for k in keys:
            assert await k.refresh()
        return Authorizer.from_config(cfg, KeyStore(keys), clock, client)

    return make


async def decide(authorizer: Authorizer, policy: str, token: str) -> Decision:
    async with asyncio.timeout(GENEROUS):
        return await authorizer.decide(policy, lambda _: token)


def headers(d: Decision) -> dict[str, str]:
    return dict(d.headers)


def service_token(forge) -> str:
    """A Cloudflare service token: common_name, an empty sub and no email."""
    return forge.valid(email=DROP, sub="", common_name=SERVICE_TOKEN)


def oidc_token(forge, **claims: object) -> str:
    return forge.valid(iss=OIDC_ISSUER, type=DROP, groups=["engineering"], **claims)


def fetches() -> dict[str, float]:
    return {
        r: REGISTRY.get_sample_value("authd_enrichment_fetches_total", {"result": r}) or 0.0
        for r in FETCH_RESULTS
    }


def identity_hits() -> float:
    return REGISTRY.get_sample_value("authd_enrichment_cache_hits_total") or 0.0


def grown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {r: after[r] - before[r] for r in before if after[r] != before[r]}


def audited(*decisions: Decision) -> list[dict[str, object]]:
    """The audit lines of ``decisions``, as the Auditor writes them."""
    with capture_logs() as logs:
        auditor = Auditor()
        for d in decisions:
            auditor.decision(d, FACTS, 1.0)
    return [entry for entry in logs if entry["event"] == "decision"]


# ---------------------------------------------------------------------------------------------
# The full group list


@pytest.mark.parametrize(
    "bad",
    [
        {"exp": int(NOW) - 60},
        {"aud": ["c" * 64]},
        {"type": "org"},
    ],
    ids=["expired", "other audience", "org token"],
)
async def test_only_a_verified_token_is_sent_to_get_identity(
    make_authorizer, server, forge, foreign_key, bad
):
    authorizer = await make_authorizer(wiki={"allow_groups": [EVERYONE]})
    server.answer_all(documented_identity())
    token = forge.valid(**bad)
    forged = forge.token(key=foreign_key)  # valid claims, signed by a key nobody published
    for t in (token, forged):
        d = await decide(authorizer, "wiki", t)
        assert (d.status, d.enrichment) == (401, None)
    assert server.request_count == 0


@pytest.mark.parametrize("ref", [EVERYONE, EVERYONE_ID], ids=["by name", "by id"])
async def test_allow_groups_admits_a_group_only_get_identity_knows(
    make_authorizer, server, forge, ref
):
    authorizer = await make_authorizer(wiki={"allow_groups": [ref]})
    token = forge.valid()
    assert EVERYONE not in forge.claims()["custom"]["groups"]  # type: ignore[index]
    server.answer(token, documented_identity())
    d = await decide(authorizer, "wiki", token)
    assert (d.status, d.rule, d.enrichment) == (200, "allow_groups", "fresh")
    assert headers(d)["X-Authd-Groups"] == FULL_GROUPS
    assert server.tokens == [token]  # asked once, with the token as the CF_Authorization cookie


async def test_the_tokens_own_groups_do_not_count_once_get_identity_answered(
    make_authorizer, server, forge
):
    authorizer = await make_authorizer(
        enriched={"allow_groups": ["sre"]},
        plain={"allow_groups": ["sre"], "get_identity": False},
    )
    token = forge.valid()  # custom.groups: sre, ops
    server.answer(token, documented_identity(groups=[(EVERYONE_ID, EVERYONE)]))
    d = await decide(authorizer, "enriched", token)
    assert (d.status, d.reason, d.enrichment) == (403, Reason.NOT_ALLOWED, "fresh")
    assert d.headers == ()
    plain = await decide(authorizer, "plain", token)  # the same token, without get-identity
    assert (plain.status, plain.rule, plain.enrichment) == (200, "allow_groups", None)
    assert headers(plain)["X-Authd-Groups"] == TOKEN_GROUPS


async def test_x_authd_groups_lists_every_group_by_name_or_by_id_when_it_has_none(
    make_authorizer, server, forge
):
    authorizer = await make_authorizer(wiki={"allow_groups": ["sre"]})
    token = forge.valid()
    groups = [("id-1", "sre"), ("id-2", "R&D, Berlin"), ("id-3", "")]
    server.answer(token, documented_identity(groups=groups))
    d = await decide(authorizer, "wiki", token)
    assert d.status == 200
    assert headers(d)["X-Authd-Groups"] == "sre,R&D%2C Berlin,id-3"


# ---------------------------------------------------------------------------------------------
# Device posture


@pytest.mark.parametrize(
    "ref",
    [DISK_ENCRYPTION_RULE_ID, DISK_ENCRYPTION_RULE_NAME, FIREWALL_RULE_ID, FIREWALL_RULE_NAME],
    ids=["disk by id", "disk by name", "firewall by id", "firewall by name"],
)
async def test_require_posture_admits_a_passed_check_by_rule_id_or_name(
    make_authorizer, server, forge, ref
):
    authorizer = await make_authorizer(wiki={"require_posture": [ref]})
    token = forge.valid()
    server.answer(token, documented_identity())
    d = await decide(authorizer, "wiki", token)
    assert (d.status, d.rule, d.enrichment) == (200, "any_valid_token", "fresh")
    assert headers(d)["X-Authd-Posture"] == f"{DISK_ENCRYPTION_RULE_NAME},{FIREWALL_RULE_NAME}"


@pytest.mark.parametrize(
    ("ref", "disk", "firewall"),
    [
        (DISK_ENCRYPTION_RULE_ID, False, True),
        (DISK_ENCRYPTION_RULE_NAME, False, True),
        (FIREWALL_RULE_ID, True, False),
        (FIREWALL_RULE_NAME, True, False),
    ],
    ids=["disk by id", "disk by name", "firewall by id", "firewall by name"],
)
async def test_require_posture_refuses_a_failed_check(  # noqa: PLR0917 -- fixtures, parameters
    make_authorizer, server, forge, ref, disk, firewall
):
    authorizer = await make_authorizer(wiki={"require_posture": [ref]})
    token = forge.valid()
    server.answer(token, documented_identity(disk_encrypted=disk, firewall_on=firewall))
    d = await decide(authorizer, "wiki", token)
    assert (d.status, d.reason, d.enrichment) == (403, Reason.REQUIREMENT_FAILED, "fresh")
    assert d.headers == ()


async def test_require_posture_refuses_a_check_the_answer_does_not_report(
    make_authorizer, server, forge
):
    authorizer = await make_authorizer(
        os={"require_posture": ["OS Version"]},
        firewall={"require_posture": [FIREWALL_RULE_NAME]},
    )
    token, bare = forge.valid(), forge.valid(identity_nonce="nonce-bare")
    server.answer(token, documented_identity())
    without_posture = documented_identity()
    del without_posture["devicePosture"]
    server.answer(bare, without_posture)
    for policy, t in (("os", token), ("firewall", bare)):
        d = await decide(authorizer, policy, t)
        assert (d.status, d.reason) == (403, Reason.REQUIREMENT_FAILED), policy


@pytest.mark.parametrize(
    ("disk", "firewall", "passed"),
    [
        (True, True, f"{DISK_ENCRYPTION_RULE_NAME},{FIREWALL_RULE_NAME}"),
        (True, False, DISK_ENCRYPTION_RULE_NAME),
        (False, True, FIREWALL_RULE_NAME),
        (False, False, None),
    ],
)
async def test_x_authd_posture_lists_the_checks_that_passed(  # noqa: PLR0917 -- as above
    make_authorizer, server, forge, disk, firewall, passed
):
    authorizer = await make_authorizer(wiki={})
    token = forge.valid()
    server.answer(token, documented_identity(disk_encrypted=disk, firewall_on=firewall))
    d = await decide(authorizer, "wiki", token)
    assert d.status == 200
    assert headers(d).get("X-Authd-Posture") == passed


@pytest.mark.parametrize(("disk", "firewall"), list(itertools.product([True, False], repeat=2)))
async def test_posture_headers_each_come_from_their_own_rule(
    make_authorizer, server, forge, disk, firewall
):
    """Cloudflare's Worker tutorial sets both of its headers from the firewall result;
    here each header says what its own rule said."""
    authorizer = await make_authorizer(
        wiki={
            "posture_headers": {
                "X-Authd-Disk-Encrypted": DISK_ENCRYPTION_RULE_NAME,
                "X-Authd-Firewall-Activated": FIREWALL_RULE_ID,
                "X-Authd-Os-Version": "OS Version",  # a rule the answer does not report
            }
        }
    )
    token = forge.valid()
    server.answer(token, documented_identity(disk_encrypted=disk, firewall_on=firewall))
    got = headers(await decide(authorizer, "wiki", token))
    assert got["X-Authd-Disk-Encrypted"] == ("true" if disk else "false")
    assert got["X-Authd-Firewall-Activated"] == ("true" if firewall else "false")
    assert got["X-Authd-Os-Version"] == "false"


async def test_identity_headers_copy_get_identity_fields(make_authorizer, server, forge):
    authorizer = await make_authorizer(
        wiki={
            "identity_headers": {
                "X-Authd-Idp": "idp.type",
                "X-Authd-Name": "name",
                "X-Authd-Geo-Country": "geo.country",
                "X-Authd-Nothing": "no.such.field",
            }
        }
    )
    token = forge.valid()
    doc = documented_identity(idp_type="okta", country="FR") | {"name": "José Example"}
    server.answer(token, doc)
    got = headers(await decide(authorizer, "wiki", token))
    assert got["X-Authd-Idp"] == "okta"
    assert got["X-Authd-Name"] == "Jos%C3%A9 Example"
    assert got["X-Authd-Geo-Country"] == "FR"
    assert "X-Authd-Nothing" not in got


# ---------------------------------------------------------------------------------------------
# The identity provider and the authentication methods


@pytest.mark.parametrize(
    ("allowed", "idp_type", "status"),
    [
        (["azureAD"], "azureAD", 200),
        (["okta", "azureAD"], "azureAD", 200),
        (["okta"], "azureAD", 403),
        (["azureAD"], "github", 403),
    ],
)
async def test_require_idp_types(  # noqa: PLR0917 -- as above
    make_authorizer, server, forge, allowed, idp_type, status
):
    authorizer = await make_authorizer(wiki={"require_idp_types": allowed})
    token = forge.valid()
    server.answer(token, documented_identity(idp_type=idp_type))
    d = await decide(authorizer, "wiki", token)
    assert d.status == status
    if status == 403:
        assert d.reason is Reason.REQUIREMENT_FAILED


@pytest.mark.parametrize(
    ("required", "amr", "status"),
    [
        (["mfa"], ["pwd", "mfa"], 200),
        (["hwk", "mfa"], ["pwd", "mfa"], 200),
        (["mfa"], ["pwd"], 403),
        (["hwk"], [], 403),
    ],
)
async def test_require_amr(  # noqa: PLR0917 -- as above
    make_authorizer, server, forge, required, amr, status
):
    authorizer = await make_authorizer(wiki={"require_amr": required})
    token = forge.valid()
    server.answer(token, documented_identity(amr=amr))
    d = await decide(authorizer, "wiki", token)
    assert d.status == status
    if status == 403:
        assert d.reason is Reason.REQUIREMENT_FAILED


# ---------------------------------------------------------------------------------------------
# When get-identity fails


@dataclass(frozen=True)
class Failure:
    result: str  # what authd_enrichment_fetches_total and the audit line call it
    reply: IdentityReply | None  # None: nothing listens at the URL
    seconds: float = TIMEOUT  # get_identity_timeout_seconds


FAILURES = {
    "down": Failure("transport", None),
    "slow": Failure("timeout", IdentityReply.document().held(), SHORT_TIMEOUT),
    "500": Failure("http_error", IdentityReply.error(500)),
    "503": Failure("http_error", IdentityReply.error(503)),
    "garbage": Failure("bad_response", IdentityReply.garbage()),
    "login page": Failure("bad_response", IdentityReply.login_page()),
    "login redirect": Failure(
        "http_error", IdentityReply.redirect(302, f"{ISSUER}/cdn-cgi/access/login/wiki")
    ),
    "another user": Failure(
        "mismatch", IdentityReply.document(documented_identity(email="mallory@example.com"))
    ),
}


@pytest.fixture(params=list(FAILURES))
def failure(request) -> Failure:
    return FAILURES[request.param]


@pytest.fixture
def make_failing(make_authorizer, server, dead_url, failure):
    """An Authorizer whose get-identity fails as ``failure`` says, for every token."""

    async def make(**policies: dict[str, object]) -> Authorizer:
        if failure.reply is None:
            return await make_authorizer(dead_url, seconds=failure.seconds, **policies)
        server.answer_all(failure.reply)
        return await make_authorizer(seconds=failure.seconds, **policies)

    return make


DEPENDENT = {
    "allow_groups": {"allow_groups": [EVERYONE]},
    "require_posture": {"require_posture": [FIREWALL_RULE_NAME]},
    "require_idp_types": {"require_idp_types": ["azureAD"]},
    "require_amr": {"require_amr": ["mfa"]},
    "explicit deny": {"allow_emails": ["alice@example.com"], "on_enrichment_failure": "deny"},
}


@pytest.mark.parametrize("rules", list(DEPENDENT.values()), ids=list(DEPENDENT))
async def test_a_policy_that_depends_on_get_identity_cannot_decide_without_it(
    make_failing, server, forge, failure, rules
):
    authorizer = await make_failing(wiki=rules)
    token = forge.valid()
    before = fetches()
    d = await decide(authorizer, "wiki", token)
    assert (d.status, d.decision, d.reason) == (503, "error", Reason.ENRICHMENT_UNAVAILABLE)
    assert d.enrichment == f"failed: {failure.result}"
    assert d.headers == ()
    assert grown(before, fetches()) == {failure.result: 1}
    # Nothing was kept: the next request asks again, and fails again.
    assert (len(authorizer.cache or ()), len(authorizer.identities or ())) == (0, 0)
    again = await decide(authorizer, "wiki", token)
    assert (again.status, again.cached) == (503, False)
    assert grown(before, fetches()) == {failure.result: 2}
    if failure.reply is not None:  # get-identity is back: the user gets in
        server.answer(token, documented_identity())
        ok = await decide(authorizer, "wiki", token)
        assert (ok.status, ok.enrichment) == (200, "fresh")
        assert server.request_count == 3


async def test_on_enrichment_failure_allow_admits_without_the_enriched_headers(
    make_failing, server, forge, failure
):
    authorizer = await make_failing(
        wiki={
            "allow_groups": ["sre"],
            "on_enrichment_failure": "allow",
            "identity_headers": {"X-Authd-Idp": "idp.type"},
            "posture_headers": {"X-Authd-Firewall-Activated": FIREWALL_RULE_NAME},
        }
    )
    token = forge.valid()
    d = await decide(authorizer, "wiki", token)
    assert (d.status, d.rule) == (200, "allow_groups")  # by the token's own groups
    assert d.enrichment is not None
    assert d.enrichment.startswith("failed")
    assert d.enrichment == f"failed: {failure.result}"
    got = headers(d)
    assert got["X-Authd-Groups"] == TOKEN_GROUPS
    assert {"X-Authd-Posture", "X-Authd-Idp", "X-Authd-Firewall-Activated"}.isdisjoint(got)
    # That allow lacked what it should have had: it is not kept, the next request asks again.
    assert len(authorizer.cache or ()) == 0
    again = await decide(authorizer, "wiki", token)
    assert (again.status, again.cached, again.enrichment) == (200, False, d.enrichment)
    if failure.reply is not None:
        assert server.request_count == 2
        server.answer(token, documented_identity())
        ok = await decide(authorizer, "wiki", token)
        assert (ok.status, ok.cached, ok.enrichment) == (200, False, "fresh")
        assert headers(ok)["X-Authd-Groups"] == FULL_GROUPS
        assert headers(ok)["X-Authd-Firewall-Activated"] == "true"
        assert server.request_count == 3


async def test_a_policy_that_only_copies_identity_headers_allows_by_default(
    make_failing, forge, failure
):
    authorizer = await make_failing(
        wiki={
            "allow_emails": ["alice@example.com"],
            "identity_headers": {"X-Authd-Idp": "idp.type"},
            "posture_headers": {"X-Authd-Disk-Encrypted": DISK_ENCRYPTION_RULE_ID},
        }
    )
    d = await decide(authorizer, "wiki", forge.valid())
    assert (d.status, d.rule, d.enrichment) == (200, "allow_emails", f"failed: {failure.result}")
    got = headers(d)
    assert got["X-Authd-Email"] == "alice@example.com"
    assert {"X-Authd-Posture", "X-Authd-Idp", "X-Authd-Disk-Encrypted"}.isdisjoint(got)


async def test_concurrent_requests_of_one_session_share_one_fetch(make_authorizer, server, forge):
    authorizer = await make_authorizer(wiki={"allow_groups": [EVERYONE]})
    token = forge.valid()
    server.answer(token, IdentityReply.document().held())
    requests = [asyncio.create_task(decide(authorizer, "wiki", token)) for _ in range(5)]
    assert await asyncio.to_thread(server.wait_in_flight, 1)
    server.release()
    decisions = await asyncio.gather(*requests)
    assert [d.status for d in decisions] == [200] * 5
    assert server.request_count == 1


# ---------------------------------------------------------------------------------------------
# Service tokens


async def test_service_tokens_are_not_sent_to_get_identity(make_authorizer, server, forge):
    authorizer = await make_authorizer(wiki={"allow_service_tokens": [SERVICE_TOKEN]})
    server.answer_all(documented_identity())
    d = await decide(authorizer, "wiki", service_token(forge))
    assert (d.status, d.rule) == (200, "allow_service_tokens")
    assert d.enrichment == "skipped: service token"
    got = headers(d)
    assert got["X-Authd-Service-Token"] == SERVICE_TOKEN
    assert "X-Authd-Posture" not in got
    assert server.request_count == 0


async def test_a_service_token_fails_require_posture(make_authorizer, server, forge):
    authorizer = await make_authorizer(
        wiki={"allow_service_tokens": [SERVICE_TOKEN], "require_posture": [FIREWALL_RULE_NAME]}
    )
    server.answer_all(documented_identity())
    d = await decide(authorizer, "wiki", service_token(forge))
    assert (d.status, d.reason) == (403, Reason.REQUIREMENT_FAILED)
    assert d.enrichment == "skipped: service token"
    assert server.request_count == 0


async def test_a_service_tokens_cached_allow_still_says_enrichment_was_skipped(
    make_authorizer, server, forge
):
    """On a decision-cache hit, "cached" would tell the operator that get-identity's answer
    came from a cache: for a service token there never was one."""
    authorizer = await make_authorizer(wiki={"allow_service_tokens": [SERVICE_TOKEN]})
    token = service_token(forge)
    await decide(authorizer, "wiki", token)
    hit = await decide(authorizer, "wiki", token)
    assert (hit.status, hit.cached) == (200, True)
    assert audited(hit)[0]["enrichment"] == "skipped: service token"
    assert server.request_count == 0


# ---------------------------------------------------------------------------------------------
# Policies and issuers that never ask


async def test_a_policy_with_get_identity_false_never_asks(make_authorizer, server, forge):
    authorizer = await make_authorizer(wiki={"allow_groups": ["sre"], "get_identity": False})
    server.answer_all(documented_identity())
    d = await decide(authorizer, "wiki", forge.valid())
    assert (d.status, d.rule, d.enrichment) == (200, "allow_groups", None)
    assert headers(d)["X-Authd-Groups"] == TOKEN_GROUPS
    assert "X-Authd-Posture" not in headers(d)
    assert "enrichment" not in audited(d)[0]
    assert server.request_count == 0


async def test_a_policy_of_a_non_cloudflare_issuer_never_asks(make_authorizer, server, forge):
    authorizer = await make_authorizer(
        oidc={"issuers": ["idp"], "allow_groups": ["engineering"]},
    )
    server.answer_all(documented_identity())
    d = await decide(authorizer, "oidc", oidc_token(forge))
    assert (d.status, d.rule, d.enrichment) == (200, "allow_groups", None)
    assert headers(d)["X-Authd-Issuer"] == "idp"
    assert headers(d)["X-Authd-Groups"] == "engineering"
    refused = await decide(authorizer, "oidc", forge.valid())  # a Cloudflare token
    assert (refused.status, refused.reason, refused.enrichment) == (401, Reason.BAD_ISSUER, None)
    assert server.request_count == 0


async def test_an_enriching_policy_asks_only_about_cloudflare_tokens(
    make_authorizer, server, forge
):
    authorizer = await make_authorizer(wiki={"allow_groups": [EVERYONE, "engineering"]})
    server.answer_all(documented_identity())
    d = await decide(authorizer, "wiki", oidc_token(forge))
    assert (d.status, d.enrichment) == (200, None)
    assert server.request_count == 0
    d = await decide(authorizer, "wiki", forge.valid())
    assert (d.status, d.enrichment) == (200, "fresh")
    assert server.request_count == 1


async def test_a_policy_may_opt_in_where_its_issuer_does_not(make_authorizer, server, forge):
    authorizer = await make_authorizer(
        issuer_enriches=False,
        enriched={"get_identity": True, "allow_groups": [EVERYONE]},
        plain={"allow_groups": [EVERYONE]},
    )
    token = forge.valid()
    server.answer(token, documented_identity())
    plain = await decide(authorizer, "plain", token)
    assert (plain.status, plain.reason, plain.enrichment) == (403, Reason.NOT_ALLOWED, None)
    assert server.request_count == 0
    enriched = await decide(authorizer, "enriched", token)
    assert (enriched.status, enriched.enrichment) == (200, "fresh")
    assert server.request_count == 1


# ---------------------------------------------------------------------------------------------
# The decision cache, the identity cache and the audit line

ENRICHED_WIKI = {
    "allow_groups": [EVERYONE],
    "identity_headers": {"X-Authd-Idp": "idp.type"},
    "posture_headers": {"X-Authd-Disk-Encrypted": DISK_ENCRYPTION_RULE_NAME},
}


async def test_a_decision_cache_hit_serves_the_same_enriched_headers_without_asking(
    make_authorizer, server, forge
):
    authorizer = await make_authorizer(wiki=ENRICHED_WIKI)
    token = forge.valid()
    server.answer(token, documented_identity(firewall_on=False))
    first = await decide(authorizer, "wiki", token)
    hit = await decide(authorizer, "wiki", token)
    assert (first.status, first.cached, first.enrichment) == (200, False, "fresh")
    assert (hit.status, hit.cached, hit.enrichment) == (200, True, "cached")
    assert hit.headers == first.headers
    got = headers(hit)
    assert (got["X-Authd-Groups"], got["X-Authd-Posture"]) == (FULL_GROUPS, "Disk Encryption")
    assert (got["X-Authd-Idp"], got["X-Authd-Disk-Encrypted"]) == ("azureAD", "true")
    assert server.request_count == 1


async def test_the_audit_line_says_how_the_identity_was_had_and_from_which_issuer(
    make_authorizer, server, forge
):
    authorizer = await make_authorizer(wiki=ENRICHED_WIKI)
    token, broken = forge.valid(), forge.valid(identity_nonce="nonce-2")
    server.answer(token, documented_identity())
    server.answer(broken, IdentityReply.error(502))
    lines = audited(
        await decide(authorizer, "wiki", token),
        await decide(authorizer, "wiki", token),
        await decide(authorizer, "wiki", broken),
    )
    shown = [(e["decision"], e["cached"], e["enrichment"], e["issuer"], e["reason"]) for e in lines]
    assert shown == [
        ("allow", False, "fresh", "team", None),
        ("allow", True, "cached", "team", None),
        ("error", False, "failed: http_error", "team", "enrichment_unavailable"),
    ]
    assert lines[2]["log_level"] == "error"
    assert lines[2]["user"] == "alice@example.com"


async def test_the_audit_line_of_an_allow_without_get_identity_says_it_failed(
    make_authorizer, server, forge
):
    authorizer = await make_authorizer(
        wiki={"allow_groups": ["sre"], "on_enrichment_failure": "allow"}
    )
    server.answer_all(IdentityReply.error(503))
    (line,) = audited(await decide(authorizer, "wiki", forge.valid()))
    shown = (line["log_level"], line["decision"], line["enrichment"], line["issuer"])
    assert shown == ("info", "allow", "failed: http_error", "team")


async def test_another_policy_reads_the_identity_get_identity_already_gave(
    make_authorizer, server, forge
):
    authorizer = await make_authorizer(wiki=ENRICHED_WIKI, ops={"require_posture": ["Firewall"]})
    token = forge.valid()
    server.answer(token, documented_identity())
    await decide(authorizer, "wiki", token)
    d = await decide(authorizer, "ops", token)
    assert (d.status, d.cached, d.enrichment) == (200, False, "cached")
    assert audited(d)[0]["enrichment"] == "cached"
    assert server.request_count == 1


async def test_another_token_of_the_same_session_reads_the_cached_identity(
    make_authorizer, server, forge
):
    authorizer = await make_authorizer(wiki=ENRICHED_WIKI)
    first, renewed = forge.valid(), forge.valid(iat=forge.claims()["iat"] + 1)  # type: ignore[operator]
    assert first != renewed
    server.answer(first, documented_identity())
    await decide(authorizer, "wiki", first)
    d = await decide(authorizer, "wiki", renewed)  # nonce-1 too: the same session
    assert (d.status, d.cached, d.enrichment) == (200, False, "cached")
    assert headers(d)["X-Authd-Groups"] == FULL_GROUPS
    assert server.tokens == [first]


# ---------------------------------------------------------------------------------------------
# Metrics


async def test_fetches_by_result_and_identity_cache_hits_are_counted(
    make_authorizer, server, forge
):
    authorizer = await make_authorizer(wiki=ENRICHED_WIKI, ops={"require_amr": ["mfa"]})
    token, broken = forge.valid(), forge.valid(identity_nonce="nonce-2")
    server.answer(token, documented_identity())
    server.answer(broken, IdentityReply.garbage())
    before, hits = fetches(), identity_hits()
    assert (await decide(authorizer, "wiki", token)).enrichment == "fresh"
    assert (await decide(authorizer, "wiki", token)).cached  # the decision cache: no lookup
    assert (await decide(authorizer, "ops", token)).enrichment == "cached"  # the identity cache
    assert (await decide(authorizer, "wiki", broken)).status == 503
    assert grown(before, fetches()) == {"ok": 1, "bad_response": 1}
    assert identity_hits() - hits == 1


# ---------------------------------------------------------------------------------------------
# The token is a credential


@pytest.mark.parametrize("on_failure", ["deny", "allow"])
async def test_no_failure_shows_the_token(make_failing, forge, failure, on_failure):
    authorizer = await make_failing(
        wiki={"allow_groups": ["sre"], "on_enrichment_failure": on_failure},
    )
    token = forge.valid()
    with capture_logs() as logs:
        d = await decide(authorizer, "wiki", token)
        Auditor().decision(d, FACTS, 1.0)
    assert d.status == (503 if on_failure == "deny" else 200)
    assert d.exc_info is None
    warned = [e for e in logs if e["event"] == "get_identity_failed"]
    assert [(e["result"], e["issuer"]) for e in warned] == [(failure.result, "team")]
    _, payload, signature = token.split(".")
    shown = f"{logs!r} {d!r} {d.detail} {d.enrichment}"
    for piece in (token, payload[:24], payload[-24:], signature[:24], signature[-24:]):
        assert piece not in shown


# ---------------------------------------------------------------------------------------------
# Freshness: an allow never outlives the get-identity answer it was made from


async def test_an_allow_made_from_a_cached_identity_expires_with_that_identity(
    make_authorizer, server, forge, clock
):
    # [cache] max_seconds (300) bounds both caches. The second policy's allow, made 200 s
    # after the fetch from the cached answer, must go when the answer does (at 300 s), not
    # 300 s after it was made: posture changes show within max_seconds.
    authorizer = await make_authorizer(wiki=ENRICHED_WIKI, ops={"require_posture": ["Firewall"]})
    token = forge.valid(exp=int(NOW) + 86400)
    server.answer(token, documented_identity())
    await decide(authorizer, "wiki", token)
    clock.advance(200)
    assert (await decide(authorizer, "ops", token)).enrichment == "cached"
    clock.advance(99)
    assert (await decide(authorizer, "ops", token)).cached is True
    clock.advance(1)
    again = await decide(authorizer, "ops", token)
    assert (again.cached, again.enrichment) == (False, "fresh")
    assert server.request_count == 2


async def test_nginx_may_not_reuse_an_allow_made_without_get_identitys_answer(
    make_authorizer, server, forge, clock
):
    from authd.app import nginx_ttl  # noqa: PLC0415 -- the wire form, tested with its input

    allow = {"allow_groups": ["sre"], "on_enrichment_failure": "allow"}
    authorizer = await make_authorizer(wiki=allow)
    token = forge.valid(custom={"groups": ["sre"]})
    server.answer(token, IdentityReply.error(500))
    d = await decide(authorizer, "wiki", token)
    assert (d.status, d.enrichment) == (200, "failed: http_error")
    assert nginx_ttl(d, 60, clock.time()) == 0
    server.answer(token, documented_identity())
    fresh = await decide(authorizer, "wiki", token)
    assert (fresh.status, fresh.enrichment) == (200, "fresh")
    assert nginx_ttl(fresh, 60, clock.time()) == 60


# ---------------------------------------------------------------------------------------------
# A group list too long for a header


async def test_a_user_in_many_groups_is_let_in_without_a_partial_group_header(
    make_authorizer, server, forge
):
    authorizer = await make_authorizer(wiki={"allow_groups": ["group-149"], "get_identity": True})
    token = forge.valid()
    many = [(f"id-{n}", f"group-{n:03d}-with-a-long-enough-name") for n in range(150)]
    many.append(("id-last", "group-149"))
    server.answer(token, documented_identity(groups=many))
    d = await decide(authorizer, "wiki", token)
    assert (d.status, d.rule) == (200, "allow_groups")  # decided on the full list
    assert "X-Authd-Groups" not in headers(d)  # never cut short
    assert headers(d)["X-Authd-Email"] == "alice@example.com"
    assert d.detail.startswith("X-Authd-Groups left out (151 groups): identity ")
    (line,) = audited(d)
    assert line["detail"] == d.detail
    hit = await decide(authorizer, "wiki", token)
    assert (hit.cached, "X-Authd-Groups" in headers(hit), hit.detail) == (True, False, d.detail)


async def test_a_control_character_in_a_group_name_leaves_the_header_out_not_the_user(
    make_authorizer, server, forge
):
    authorizer = await make_authorizer(wiki={"get_identity": True})
    token = forge.valid()
    server.answer(token, documented_identity(groups=[("id-1", "ops\r\nX-Evil: 1")]))
    d = await decide(authorizer, "wiki", token)
    assert d.status == 200
    assert "X-Authd-Groups" not in headers(d)
    assert not any("\n" in v for _, v in d.headers)
