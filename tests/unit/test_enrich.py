"""authd.enrich: get-identity answers fetched, checked, cached and shared, against a real server.

Every fetch goes to devtools.standins.GetIdentityServer on 127.0.0.1 (one per module, reset per
test) through authd's own HTTP client; tokens are real signed tokens from conftest's forge, so
the leak check watches them too. Time is the FakeClock; no test waits on wall-clock time except
for a get-identity timeout, under generous bounds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from authd import fetch, metrics
from authd.claims import Claims
from authd.enrich import (
    BYTES_PER_BODY_BYTE,
    ENTRY_OVERHEAD_BYTES,
    FETCH_RESULTS,
    MAX_IDENTITY_BYTES,
    EnrichmentFailed,
    Group,
    IdentityCache,
    PostureCheck,
    parse_identity,
)
from authd.fetch import make_http_client
from devtools.standins import (
    DEFAULT_GROUPS,
    DISK_ENCRYPTION_RULE_ID,
    DISK_ENCRYPTION_RULE_NAME,
    FIREWALL_RULE_ID,
    FIREWALL_RULE_NAME,
    GET_IDENTITY_PATH,
    MOVED_PATH,
    GetIdentityServer,
    IdentityReply,
    documented_identity,
)
from tests.conftest import DROP, ISSUER, NOW

GENEROUS = 10.0  # seconds: a bound on what should take milliseconds, never a measurement
ALL = frozenset(range(1000))
BOB_UUID = "0b0b0b0b-61da-459d-899c-0a01c76a8e1f"


@dataclass(frozen=True)
class User:
    """A verified token as the decision code hands it to enrichment."""

    token: str
    claims: Claims
    digest: bytes


@pytest.fixture
def make_user(forge):
    def make(**overrides: object) -> User:
        payload = forge.claims(**overrides)
        token = forge.token(payload=payload)
        email, sub = payload.get("email", ""), payload.get("sub", "")
        claims = Claims(
            payload=payload,
            issuer_name="team",
            iss=ISSUER,
            kid=forge.kid,
            alg="RS256",
            exp=float(payload["exp"]),  # type: ignore[arg-type]
            valid_from=NOW - 10,
            valid_until=float(payload["exp"]),  # type: ignore[arg-type]
            email=email if isinstance(email, str) else "",
            sub=sub if isinstance(sub, str) else "",
            service_token="",
        )
        return User(token, claims, hashlib.sha256(token.encode()).digest())

    return make


@pytest.fixture
def alice(make_user) -> User:
    return make_user()


@pytest.fixture
def bob(make_user) -> User:
    return make_user(email="bob@example.com", sub=BOB_UUID, identity_nonce="nonce-bob")


BOB_IDENTITY = documented_identity(email="bob@example.com", user_uuid=BOB_UUID)


@pytest.fixture
def server(identity_server) -> GetIdentityServer:
    return identity_server  # tests/conftest.py: the stand-in, reset for each test


@pytest.fixture
async def client():
    c = make_http_client()
    yield c
    await c.aclose()


@dataclass
class Observed:
    fetches: list[str]
    hits: int = 0

    def hit(self) -> None:
        self.hits += 1


@pytest.fixture
def seen() -> Observed:
    return Observed([])


@pytest.fixture
def make_cache(client, clock, seen):
    def make(**bounds: float) -> IdentityCache:
        return IdentityCache(client, clock, on_fetch=seen.fetches.append, on_hit=seen.hit, **bounds)

    return make


@pytest.fixture
def cache(make_cache) -> IdentityCache:
    return make_cache()


async def ask(cache: IdentityCache, user: User, url: str, seconds: float = 5.0):
    async with asyncio.timeout(GENEROUS):
        return await cache.identity(url, seconds, user.token, user.claims, user.digest)


async def refused(cache: IdentityCache, user: User, url: str, seconds: float = 5.0) -> str:
    """The result code of a fetch that must fail."""
    with pytest.raises(EnrichmentFailed) as info:
        await ask(cache, user, url, seconds)
    return info.value.result


# ---------------------------------------------------------------------------------------------
# The documented shape, and the request authd makes


async def test_documented_answer_gives_groups_idp_amr_and_posture(server, cache, alice, seen):
    server.answer(alice.token, documented_identity())
    got = await ask(cache, alice, server.url)
    identity = got.identity
    assert got.cached is False
    assert identity.group_names() == ("sre", "ops", "everyone")
    assert identity.groups[0] == Group(DEFAULT_GROUPS[0][0], "sre")
    assert identity.group_refs() == {ref for group in DEFAULT_GROUPS for ref in group}
    assert identity.idp_type == "azureAD"
    assert identity.amr == ("pwd", "mfa")
    assert identity.posture_passed(DISK_ENCRYPTION_RULE_NAME)
    assert identity.posture_passed(DISK_ENCRYPTION_RULE_ID)
    assert identity.posture_passed(FIREWALL_RULE_NAME)
    assert identity.posture_passed(FIREWALL_RULE_ID)
    assert not identity.posture_passed("os_version")  # a rule the answer lacks has not passed
    assert identity.passed_posture_names() == (DISK_ENCRYPTION_RULE_NAME, FIREWALL_RULE_NAME)
    assert identity.posture[0] == PostureCheck(
        DISK_ENCRYPTION_RULE_ID, DISK_ENCRYPTION_RULE_NAME, "disk_encryption", success=True
    )
    assert identity.get("geo.country") == "DE"
    assert identity.get("email") == "alice@example.com"
    assert identity.get("is_warp") is True
    assert identity.get("nothing.here") is None
    assert seen.fetches == ["ok"]


async def test_disk_encryption_and_firewall_are_read_each_from_its_own_check(server, cache, alice):
    # Cloudflare's Worker tutorial sets both of its headers from the firewall result.
    server.answer(alice.token, documented_identity(disk_encrypted=False, firewall_on=True))
    identity = (await ask(cache, alice, server.url)).identity
    assert not identity.posture_passed(DISK_ENCRYPTION_RULE_NAME)
    assert identity.posture_passed(FIREWALL_RULE_NAME)
    assert identity.passed_posture_names() == (FIREWALL_RULE_NAME,)


async def test_the_token_travels_only_as_the_cf_authorization_cookie(server, cache, alice):
    server.answer(alice.token, documented_identity())
    await ask(cache, alice, server.url)
    (request,) = server.requests
    assert request.path == GET_IDENTITY_PATH
    assert request.cookie == f"CF_Authorization={alice.token}"
    headers = {name.lower(): value for name, value in request.headers}
    assert headers["user-agent"].startswith("authd/")
    assert "authorization" not in headers
    assert alice.token not in request.path


async def test_the_document_cannot_be_changed_by_a_reader(server, cache, alice):
    server.answer(alice.token, documented_identity())
    identity = (await ask(cache, alice, server.url)).identity
    with pytest.raises(TypeError):
        identity.document["email"] = "mallory@example.com"  # type: ignore[index]


async def test_cookies_the_endpoint_sets_never_ride_along_on_a_later_fetch(
    server, client, cache, alice, bob
):
    # httpx keeps a cookie jar per client, and authd shares one client (the key store fetches
    # from the same team domain): a Set-Cookie in one user's answer must not ride along with,
    # or replace, the next user's token, nor go out with a key fetch.
    planted = IdentityReply.document(documented_identity(), **{"Set-Cookie": "CF_Authorization=x"})
    server.answer(alice.token, planted)
    server.answer(bob.token, BOB_IDENTITY)
    await ask(cache, alice, server.url)
    got = await ask(cache, bob, server.url)
    assert got.identity.get("email") == "bob@example.com"
    await fetch.get(client, server.base_url + "/cdn-cgi/access/certs", 5, accept_status=ALL)
    assert server.cookies[1:] == [f"CF_Authorization={bob.token}", None]


# ---------------------------------------------------------------------------------------------
# The cache: per identity_nonce, else per token; never past exp; bounded


async def test_a_second_token_of_the_same_session_is_served_from_the_cache(
    server, cache, make_user, seen
):
    first, second = make_user(aud=["a" * 64]), make_user(aud=["c" * 64])  # two apps, one session
    server.answer_all(documented_identity())
    fetched = await ask(cache, first, server.url)
    hit = await ask(cache, second, server.url)
    assert (fetched.cached, hit.cached) == (False, True)
    assert hit.identity is fetched.identity
    assert server.request_count == 1
    assert (seen.fetches, seen.hits) == (["ok"], 1)


async def test_other_sessions_are_fetched_for_themselves(server, cache, alice, bob):
    server.answer(alice.token, documented_identity())
    server.answer(bob.token, BOB_IDENTITY)
    a, b = await ask(cache, alice, server.url), await ask(cache, bob, server.url)
    assert (a.identity.get("email"), b.identity.get("email")) == (
        "alice@example.com",
        "bob@example.com",
    )
    assert server.tokens == [alice.token, bob.token]


@pytest.mark.parametrize("nonce", [DROP, "", 42, None, ["nonce-1"]])
async def test_without_a_usable_nonce_the_cache_is_per_token(server, cache, make_user, nonce):
    one, other = make_user(identity_nonce=nonce), make_user(identity_nonce=nonce, iat=int(NOW))
    server.answer_all(documented_identity())
    assert (await ask(cache, one, server.url)).cached is False
    assert (await ask(cache, one, server.url)).cached is True
    assert (await ask(cache, other, server.url)).cached is False
    assert server.tokens == [one.token, other.token]


async def test_the_cache_is_per_get_identity_url(server, cache, alice):
    server.answer(alice.token, documented_identity())
    await ask(cache, alice, server.url)
    other_url = f"http://localhost:{server.port}{GET_IDENTITY_PATH}"
    assert (await ask(cache, alice, other_url)).cached is False
    assert server.request_count == 2


async def test_an_entry_ends_at_the_exp_of_the_token_that_fetched_it(
    server, cache, make_user, clock
):
    short = make_user(exp=int(NOW) + 60)
    later = make_user(exp=int(NOW) + 3600, iat=int(NOW) + 61)  # same session, a new token
    server.answer_all(documented_identity())
    await ask(cache, short, server.url)
    clock.advance(60)
    got = await ask(cache, later, server.url)
    assert got.cached is False
    assert server.tokens == [short.token, later.token]
    assert (await ask(cache, later, server.url)).cached is True


async def test_an_entry_lives_at_most_max_seconds_however_long_the_token_does(
    server, make_cache, make_user, clock
):
    # Device posture can change during a session: a day-long token is asked about again.
    cache = make_cache(max_seconds=300)
    user = make_user(exp=int(NOW) + 86400)
    server.answer_all(documented_identity())
    await ask(cache, user, server.url)
    clock.advance(299)
    assert (await ask(cache, user, server.url)).cached is True
    clock.advance(1)
    assert (await ask(cache, user, server.url)).cached is False
    assert server.request_count == 2


async def test_an_entry_is_never_served_past_the_readers_own_exp(server, cache, make_user, clock):
    long = make_user(exp=int(NOW) + 3600)
    short = make_user(exp=int(NOW) + 30, iat=int(NOW) - 5)
    server.answer_all(documented_identity())
    await ask(cache, long, server.url)
    assert (await ask(cache, short, server.url)).cached is True
    clock.advance(30)  # short's exp (the verifier's leeway may still let it through)
    assert (await ask(cache, short, server.url)).cached is False
    assert (await ask(cache, long, server.url)).cached is True
    assert server.tokens == [long.token, short.token]


async def test_an_answer_for_an_already_expired_token_is_not_kept(server, cache, make_user):
    user = make_user(exp=int(NOW))  # at exp: within the verifier's leeway at most
    server.answer_all(documented_identity())
    assert (await ask(cache, user, server.url)).cached is False
    assert (await ask(cache, user, server.url)).cached is False
    assert server.request_count == 2
    assert len(cache) == 0


async def test_the_cache_holds_at_most_max_entries_least_recently_used_first_out(
    server, make_cache, make_user
):
    cache = make_cache(max_entries=2)
    a, b, c = (make_user(identity_nonce=n) for n in ("na", "nb", "nc"))
    server.answer_all(documented_identity())
    await ask(cache, a, server.url)
    await ask(cache, b, server.url)
    assert (await ask(cache, a, server.url)).cached is True  # a is now the most recent
    await ask(cache, c, server.url)  # evicts b
    assert len(cache) == 2
    assert (await ask(cache, a, server.url)).cached is True
    assert (await ask(cache, c, server.url)).cached is True
    assert (await ask(cache, b, server.url)).cached is False
    assert server.tokens == [a.token, b.token, c.token, b.token]


async def test_the_cache_holds_at_most_max_bytes(server, make_cache, make_user):
    body = json.dumps(documented_identity()).encode()
    one_entry = ENTRY_OVERHEAD_BYTES + BYTES_PER_BODY_BYTE * len(body)
    cache = make_cache(max_bytes=one_entry + one_entry // 2)
    a, b = make_user(identity_nonce="na"), make_user(identity_nonce="nb")
    server.answer_all(IdentityReply.raw(body))
    await ask(cache, a, server.url)
    await ask(cache, b, server.url)
    assert (len(cache), cache.bytes) == (1, one_entry)
    assert (await ask(cache, b, server.url)).cached is True
    assert (await ask(cache, a, server.url)).cached is False


async def test_an_answer_bigger_than_the_whole_cache_is_used_but_not_kept(
    server, make_cache, alice
):
    cache = make_cache(max_bytes=ENTRY_OVERHEAD_BYTES)
    server.answer(alice.token, documented_identity())
    for _ in range(2):
        got = await ask(cache, alice, server.url)
        assert (got.cached, got.identity.group_names()) == (False, ("sre", "ops", "everyone"))
    assert (len(cache), cache.bytes, server.request_count) == (0, 0, 2)


# ---------------------------------------------------------------------------------------------
# Single flight


async def test_concurrent_requests_for_one_session_share_one_fetch(server, cache, make_user, seen):
    users = [make_user(aud=[f"{i:064x}"]) for i in range(20)]  # one session, twenty tokens
    server.answer_all(IdentityReply.document().held())
    calls = [asyncio.create_task(ask(cache, u, server.url)) for u in users]
    assert await asyncio.to_thread(server.wait_in_flight, 1)
    server.release()
    results = await asyncio.gather(*calls)
    assert server.request_count == 1
    assert {id(r.identity) for r in results} == {id(results[0].identity)}
    assert seen.fetches == ["ok"]
    assert (await ask(cache, users[0], server.url)).cached is True


async def test_a_waiter_that_gives_up_does_not_cancel_the_fetch_for_the_others(
    server, cache, alice
):
    server.answer(alice.token, IdentityReply.document().held())
    quitter = asyncio.create_task(ask(cache, alice, server.url))
    stayer = asyncio.create_task(ask(cache, alice, server.url))
    assert await asyncio.to_thread(server.wait_in_flight, 1)
    quitter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await quitter
    server.release()
    got = await stayer
    assert got.identity.get("email") == "alice@example.com"
    assert server.request_count == 1


async def test_a_failed_shared_fetch_fails_every_waiter_and_is_not_kept(server, cache, alice, seen):
    server.answer(alice.token, IdentityReply.error(503).held())
    calls = [asyncio.create_task(refused(cache, alice, server.url)) for _ in range(5)]
    assert await asyncio.to_thread(server.wait_in_flight, 1)
    server.release()
    assert await asyncio.gather(*calls) == ["http_error"] * 5
    assert seen.fetches == ["http_error"]
    server.answer(alice.token, documented_identity())
    assert (await ask(cache, alice, server.url)).cached is False
    assert server.request_count == 2


# ---------------------------------------------------------------------------------------------
# Failures: each with its result code, never cached


async def test_a_slow_endpoint_times_out(server, cache, alice, seen):
    server.answer(alice.token, IdentityReply.document().held())
    assert await refused(cache, alice, server.url, seconds=0.2) == "timeout"
    assert seen.fetches == ["timeout"]
    server.answer(alice.token, documented_identity())
    server.release()
    assert (await ask(cache, alice, server.url)).cached is False  # the failure was not kept


@pytest.mark.parametrize("status", [400, 401, 403, 404, 429, 500, 502, 503, 204])
async def test_any_status_but_200_is_an_http_error(server, cache, alice, seen, status):
    server.answer(alice.token, IdentityReply.error(status))
    assert await refused(cache, alice, server.url) == "http_error"
    assert await refused(cache, alice, server.url) == "http_error"
    assert server.request_count == 2  # not cached
    assert seen.fetches == ["http_error"] * 2


async def test_a_token_the_endpoint_does_not_know_is_an_http_error(server, cache, alice):
    assert await refused(cache, alice, server.url) == "http_error"  # the stand-in's 401


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirects_are_refused_not_followed(server, cache, alice, status):
    server.answer(alice.token, IdentityReply.redirect(status))
    assert await refused(cache, alice, server.url) == "http_error"
    assert [r.path for r in server.requests] == [GET_IDENTITY_PATH]
    assert MOVED_PATH not in [r.path for r in server.requests]


@pytest.mark.parametrize(
    "reply",
    [
        IdentityReply.garbage(),
        IdentityReply.login_page(),
        IdentityReply.raw(b""),
        IdentityReply.raw(b"[]"),
        IdentityReply.raw(b'"alice@example.com"'),
        IdentityReply.raw(b"null"),
        IdentityReply.raw(b'{"email": "alice@exa'),
        IdentityReply.raw(b"\xff\xfe{}"),
        IdentityReply.raw(b"[" * 100_000 + b"]" * 100_000),
        IdentityReply.raw(b'{"n": ' + b"9" * 5000 + b"}"),
    ],
    ids=[
        "garbage",
        "html",
        "empty",
        "array",
        "string",
        "null",
        "truncated",
        "not-utf8",
        "deep",
        "huge-int",
    ],
)
async def test_an_answer_that_is_not_a_json_object_is_a_bad_response(
    server, cache, alice, seen, reply
):
    server.answer(alice.token, reply)
    assert await refused(cache, alice, server.url) == "bad_response"
    assert seen.fetches == ["bad_response"]
    assert len(cache) == 0


@pytest.mark.parametrize("declare_length", [True, False])
async def test_an_answer_over_the_size_cap_is_too_large(server, cache, alice, declare_length):
    reply = IdentityReply.huge(MAX_IDENTITY_BYTES + 1, declare_length=declare_length)
    server.answer(alice.token, reply)
    assert await refused(cache, alice, server.url) == "too_large"


async def test_an_answer_at_the_size_cap_is_read(server, cache, alice):
    server.answer(alice.token, IdentityReply.huge(MAX_IDENTITY_BYTES))
    got = await ask(cache, alice, server.url)
    assert got.identity.posture_passed(FIREWALL_RULE_NAME)


async def test_an_endpoint_that_is_down_is_a_transport_failure(cache, alice, seen):
    with GetIdentityServer() as gone:
        url = gone.url
    assert await refused(cache, alice, url) == "transport"
    assert seen.fetches == ["transport"]


@pytest.mark.parametrize(
    "url",
    [
        "http://team.cloudflareaccess.com/cdn-cgi/access/get-identity",  # plain http, not loopback
        "ftp://127.0.0.1/cdn-cgi/access/get-identity",
        "/cdn-cgi/access/get-identity",
    ],
)
async def test_a_url_authd_must_not_fetch_is_refused_before_the_token_leaves(cache, alice, url):
    assert await refused(cache, alice, url) == "transport"


async def test_without_a_client_enrichment_fails_closed(server, clock, alice):
    cache = IdentityCache(None, clock)
    server.answer(alice.token, documented_identity())
    assert await refused(cache, alice, server.url) == "transport"
    assert server.request_count == 0


# ---------------------------------------------------------------------------------------------
# The answer must be about the token's user


@pytest.mark.parametrize(
    "doc",
    [
        documented_identity(email="mallory@example.com"),
        documented_identity(email="alice@example.com.evil"),
        documented_identity(user_uuid=BOB_UUID),
        documented_identity(email="mallory@example.com", user_uuid=""),
        documented_identity(email="", user_uuid=BOB_UUID),
    ],
    ids=["email", "email-suffix", "user_uuid", "email-only", "user_uuid-only"],
)
async def test_an_answer_about_another_user_is_refused(server, cache, alice, seen, doc):
    server.answer(alice.token, doc)
    assert await refused(cache, alice, server.url) == "mismatch"
    assert len(cache) == 0
    assert seen.fetches == ["mismatch"]


@pytest.mark.parametrize(
    "doc",
    [
        documented_identity(email="ALICE@Example.COM"),  # ASCII case does not matter
        {"groups": [{"id": "g", "name": "sre"}]},  # neither email nor user_uuid to compare
        documented_identity(email="", user_uuid=""),
    ],
    ids=["ascii-case", "no-subject", "empty-subject"],
)
async def test_an_answer_about_the_tokens_user_is_used(server, cache, alice, seen, doc):
    server.answer(alice.token, doc)
    assert (await ask(cache, alice, server.url)).identity.get("groups") == doc["groups"]
    assert seen.fetches == ["ok"]


async def test_only_ascii_case_is_ignored_in_the_email(server, cache, make_user):
    kim = make_user(email="kim@example.com")
    # str.lower() turns the Kelvin sign into "k": another address would pass for kim's.
    server.answer(kim.token, documented_identity(email="\u212aim@example.com"))
    assert await refused(cache, kim, server.url) == "mismatch"


async def test_a_cached_identity_is_checked_against_every_reader(server, cache, make_user):
    alice = make_user()
    mallory = make_user(email="mallory@example.com", sub="m-1")  # same nonce: a forged session
    server.answer_all(documented_identity())
    await ask(cache, alice, server.url)
    assert await refused(cache, mallory, server.url) == "mismatch"
    assert (await ask(cache, alice, server.url)).cached is True  # alice's entry stays


async def test_a_shared_fetch_is_checked_against_every_waiter(server, cache, make_user):
    alice, mallory = make_user(), make_user(email="mallory@example.com", sub="m-1")
    server.answer_all(IdentityReply.document().held())
    first = asyncio.create_task(ask(cache, alice, server.url))
    second = asyncio.create_task(refused(cache, mallory, server.url))
    assert await asyncio.to_thread(server.wait_in_flight, 1)
    server.release()
    assert (await first).identity.get("email") == "alice@example.com"
    assert await second == "mismatch"
    assert server.tokens == [alice.token]


# ---------------------------------------------------------------------------------------------
# Shapes: optional members of the wrong shape count as absent; doubt never passes a check


def _doc(**members: object) -> bytes:
    return json.dumps(documented_identity() | members).encode()


@pytest.mark.parametrize(
    "groups",
    [None, "sre", {"id": "g", "name": "sre"}, 42, [], ["sre", 1, None, [], {}]],
)
def test_groups_of_the_wrong_shape_are_no_groups(groups):
    identity = parse_identity(_doc(groups=groups))
    assert (identity.groups, identity.group_refs(), identity.group_names()) == ((), set(), ())


def test_a_group_with_only_an_id_is_named_by_its_id():
    groups = [{"id": "g-1"}, {"name": "ops", "id": 7}, {"id": "", "name": ""}, "sre"]
    identity = parse_identity(_doc(groups=groups))
    assert identity.groups == (Group("g-1", ""), Group("", "ops"))
    assert identity.group_names() == ("g-1", "ops")
    assert identity.group_refs() == {"g-1", "ops"}


@pytest.mark.parametrize("success", ["true", 1, None, "yes", [True], {"ok": True}])
def test_a_posture_check_passes_only_on_json_true(success):
    posture = {"r1": {"id": "r1", "rule_name": "Firewall", "type": "firewall", "success": success}}
    identity = parse_identity(_doc(devicePosture=posture))
    assert not identity.posture_passed("Firewall")
    assert not identity.posture_passed("r1")
    assert identity.passed_posture_names() == ()


def test_a_posture_entry_that_is_not_an_object_is_a_failed_check():
    posture = {"r1": True, "r2": {"rule_name": "Firewall", "success": True}}
    identity = parse_identity(_doc(devicePosture=posture))
    assert not identity.posture_passed("r1")
    assert identity.posture_passed("r2")
    assert identity.posture_passed("Firewall")


def test_a_posture_entry_whose_own_id_names_another_rule_passes_nothing():
    posture = {"r1": {"id": "r2", "rule_name": "Firewall", "success": True}}
    identity = parse_identity(_doc(devicePosture=posture))
    assert not identity.posture_passed("r1")
    assert not identity.posture_passed("r2")
    assert not identity.posture_passed("Firewall")


def test_every_check_that_shares_a_name_must_pass():
    posture = {
        "r1": {"rule_name": "Disk Encryption", "success": True},
        "r2": {"rule_name": "Disk Encryption", "success": False},
    }
    identity = parse_identity(_doc(devicePosture=posture))
    assert not identity.posture_passed("Disk Encryption")
    assert identity.posture_passed("r1")
    # X-Authd-Posture must agree with require_posture: the name has not passed, r1 has.
    assert identity.passed_posture_names() == ("r1",)


def test_a_passed_check_is_listed_only_by_a_reference_that_passed():
    # "fw" names one check and is the id of another, failed, one; r2's name and id both
    # stand for failed checks; an empty key is no reference.
    posture = {
        "fw": {"rule_name": "Firewall", "success": False},
        "r1": {"rule_name": "fw", "success": True},
        "r2": {"rule_name": "Firewall", "success": True},
        "": {"rule_name": "", "success": True},
    }
    identity = parse_identity(_doc(devicePosture=posture))
    assert not identity.posture_passed("fw")
    assert identity.passed_posture_names() == ("r1", "r2")
    assert all(identity.posture_passed(r) for r in identity.passed_posture_names())


@pytest.mark.parametrize("posture", [None, [], "x", [{"id": "r1", "success": True}]])
def test_device_posture_of_the_wrong_shape_is_no_posture(posture):
    identity = parse_identity(_doc(devicePosture=posture))
    assert identity.posture == ()
    assert not identity.posture_passed("r1")


def test_a_posture_ref_matches_exactly():
    identity = parse_identity(_doc())
    assert not identity.posture_passed("disk encryption")
    assert not identity.posture_passed("Disk")
    assert not identity.posture_passed("")


@pytest.mark.parametrize(
    ("idp", "amr", "idp_type", "amr_seen"),
    [
        ({"id": "x", "type": "okta"}, ["pwd"], "okta", ("pwd",)),
        ("okta", "pwd", None, ()),
        ({"type": 3}, [1, "otp", None, ""], None, ("otp",)),
        ({"type": ""}, None, None, ()),
        (None, {"0": "pwd"}, None, ()),
    ],
)
def test_idp_type_and_amr_of_the_wrong_shape_are_absent(idp, amr, idp_type, amr_seen):
    identity = parse_identity(_doc(idp=idp, amr=amr))
    assert (identity.idp_type, identity.amr) == (idp_type, amr_seen)


def test_a_document_without_any_optional_member_is_an_empty_identity():
    identity = parse_identity(b"{}")
    assert (identity.groups, identity.posture, identity.idp_type, identity.amr) == (
        (),
        (),
        None,
        (),
    )
    assert identity.get("email") is None


# ---------------------------------------------------------------------------------------------
# The token never leaves through a log line or an exception


@pytest.mark.parametrize(
    "reply",
    [
        IdentityReply.error(401),
        IdentityReply.redirect(),
        IdentityReply.garbage(),
        IdentityReply.huge(MAX_IDENTITY_BYTES + 1),
        IdentityReply.document(documented_identity(email="mallory@example.com")),
        IdentityReply.document().held(),
    ],
    ids=["401", "redirect", "garbage", "huge", "mismatch", "timeout"],
)
async def test_no_failure_shows_the_token(server, cache, alice, reply):
    server.answer(alice.token, reply)
    with capture_logs() as logs, pytest.raises(EnrichmentFailed) as info:
        await ask(cache, alice, server.url, seconds=0.5)
    shown = [str(info.value), repr(info.value), info.value.detail, repr(logs)]
    signature = alice.token.rsplit(".", 1)[1]
    assert not [s for s in shown if alice.token in s or signature[:24] in s]
    assert [entry["event"] for entry in logs] == ["get_identity_failed"]
    assert logs[0]["result"] == info.value.result


@pytest.mark.parametrize("bad", ["\r\nX-Evil: 1", "; other=1", " ", "\x00", "é"])
async def test_a_token_that_is_not_a_plain_cookie_value_is_never_sent(server, cache, alice, bad):
    user = User(alice.token + bad, alice.claims, alice.digest)
    with capture_logs() as logs, pytest.raises(EnrichmentFailed) as info:
        await ask(cache, user, server.url)
    assert info.value.result == "transport"
    assert alice.token not in f"{info.value} {info.value!r} {logs!r}"
    assert server.request_count == 0


# ---------------------------------------------------------------------------------------------
# Metrics


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_fetches_by_result_and_cache_hits_are_counted(server, client, clock, make_user):
    cache = IdentityCache(
        client, clock, on_fetch=metrics.enrichment_fetch, on_hit=metrics.enrichment_cache_hit
    )
    before = {r: _sample("authd_enrichment_fetches_total", result=r) for r in FETCH_RESULTS}
    hits = _sample("authd_enrichment_cache_hits_total")
    alice, other = make_user(), make_user(identity_nonce="n-2")
    server.answer(alice.token, documented_identity())
    server.answer(other.token, IdentityReply.error(503))
    await ask(cache, alice, server.url)
    await ask(cache, alice, server.url)
    await refused(cache, other, server.url)
    after = {r: _sample("authd_enrichment_fetches_total", result=r) for r in FETCH_RESULTS}
    assert {r: after[r] - before[r] for r in FETCH_RESULTS if after[r] != before[r]} == {
        "ok": 1,
        "http_error": 1,
    }
    assert _sample("authd_enrichment_cache_hits_total") - hits == 1
    text = metrics.render().decode()
    for result in FETCH_RESULTS:
        assert f'authd_enrichment_fetches_total{{result="{result}"}}' in text
