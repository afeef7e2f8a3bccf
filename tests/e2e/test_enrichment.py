"""get-identity enrichment end to end: real nginx, real authd, get-identity on loopback.

The module's stack has one Cloudflare issuer with ``get_identity = true`` whose
``get_identity_url`` points at a `GetIdentityServer` on 127.0.0.1, and policies that read what
only get-identity knows: the full group list (``allow_groups`` by name or id), device posture
(``require_posture`` by rule id or name), ``require_idp_types``, ``require_amr``, and headers
filled from the answer (``posture_headers``, ``identity_headers``, ``X-Authd-Groups``,
``X-Authd-Posture``). nginx includes the location snippet that ``authd nginx-snippet`` renders
for this configuration, as operators must for custom headers, so the upstream sees exactly what
nginx copies.

Every user signs in with a fresh ``identity_nonce``: get-identity is asked about each one on its
first request only. A test that breaks the stand-in (down, slow, garbage, an error status)
breaks it for its own tokens; the next test starts with a stand-in that answers again.
"""

from __future__ import annotations

import concurrent.futures
import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from devtools.stack import (
    DEFAULT_ISSUER,
    SERVICE_TOKEN_ID,
    WIKI_AUD,
    running_stack,
    wait_for,
    write_config,
)
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

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    from devtools.stack import Stack
    from tests.e2e.conftest import Visit

pytestmark = pytest.mark.e2e

ISSUER = "cf"  # the issuer's name: the audit line's `issuer`, X-Authd-Issuer
GET_IDENTITY_TIMEOUT = 3  # below the snippet's 5 s proxy_read_timeout, as authd requires
SLOWER_THAN_THE_TIMEOUT = 10.0
TOKEN_GROUPS = ["sre"]  # what the token's custom.groups holds: Cloudflare trims that list
TOKEN_GROUPS_HEADER = ",".join(TOKEN_GROUPS)
(SRE_ID, _), (OPS_ID, _), (EVERYONE_ID, _) = DEFAULT_GROUPS  # get-identity's full list
ALL_GROUP_NAMES = ",".join(name for _, name in DEFAULT_GROUPS)
EMAILS = ["example.com"]
STATUS_PATH = "/nginx-status"  # nginx's stub_status: how many requests it is working on

POLICIES: Mapping[str, Mapping[str, Any]] = {
    # allow_groups over get-identity's full list: "ops" is not in the token's custom.groups.
    "groups": {"audience": [WIKI_AUD], "allow_groups": ["ops"]},
    "groups-by-id": {"audience": [WIKI_AUD], "allow_groups": [OPS_ID]},
    # The same rule without enrichment sees only the token's groups.
    "token-groups": {"audience": [WIKI_AUD], "allow_groups": ["ops"], "get_identity": False},
    # One posture rule by id, the other by name.
    "posture": {
        "audience": [WIKI_AUD],
        "allow_email_domains": EMAILS,
        "require_posture": [DISK_ENCRYPTION_RULE_ID, FIREWALL_RULE_NAME],
    },
    "mfa": {
        "audience": [WIKI_AUD],
        "allow_email_domains": EMAILS,
        "require_idp_types": ["azureAD", "okta"],
        "require_amr": ["mfa", "hwk"],
    },
    # Nothing depends on get-identity: its failure lets the user in without the enriched headers.
    "lenient": {
        "audience": [WIKI_AUD],
        "allow_email_domains": EMAILS,
        "allow_service_tokens": [SERVICE_TOKEN_ID],
        "on_enrichment_failure": "allow",
        # The Worker tutorial's headers, each from its own rule (its code set both from the
        # firewall check): the disk one by name, the firewall one by id.
        "posture_headers": {
            "X-Authd-Disk-Encrypted": DISK_ENCRYPTION_RULE_NAME,
            "X-Authd-Firewall-Activated": FIREWALL_RULE_ID,
        },
        "identity_headers": {"X-Authd-Idp-Type": "idp.type", "X-Authd-Device-Id": "device_id"},
    },
}
ENRICHED_HEADERS = (
    "x-authd-posture",
    "x-authd-disk-encrypted",
    "x-authd-firewall-activated",
    "x-authd-idp-type",
    "x-authd-device-id",
)


# --- the stack ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def get_identity() -> Iterator[GetIdentityServer]:
    with GetIdentityServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _standin_answers_again(get_identity) -> Iterator[None]:
    """Every test starts with a stand-in that listens, forgets earlier answers and requests,
    and holds nothing."""
    get_identity.start()
    get_identity.reset()
    yield
    get_identity.release()
    get_identity.start()


def _status_location(upstream_url: str) -> list[str]:  # noqa: ARG001 -- running_stack's signature
    return [f"location = {STATUS_PATH} {{\n    stub_status;\n}}\n"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, module_key_server, get_identity) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("enrichment")
    issuer = {
        "name": ISSUER,
        "issuer": DEFAULT_ISSUER,
        "jwks_url": module_key_server.url,
        "get_identity": True,
        "get_identity_url": get_identity.url,
        "get_identity_timeout_seconds": GET_IDENTITY_TIMEOUT,
    }
    config = write_config(workdir, issuers=[issuer], policies=POLICIES)
    with running_stack(workdir, config, extra_locations=_status_location) as running:
        yield running


@dataclass(frozen=True)
class User:
    """A user who just signed in: their token, its claims, and what get-identity knows."""

    token: str = field(repr=False)  # never in a test report
    claims: dict[str, Any]

    def identity(self, **changes: Any) -> dict[str, Any]:
        """get-identity's documented answer about this user, with `changes`."""
        about = {"email": self.claims["email"], "user_uuid": self.claims["sub"]}
        return documented_identity(**{**about, **changes})


@pytest.fixture
def sign_in(dev_key, make_claims, get_identity) -> Callable[..., User]:
    """`sign_in(**claims)`: a user token whose custom.groups holds `TOKEN_GROUPS` only, and
    get-identity answering the documented identity for it (replace with `get_identity.answer`)."""

    def sign_in(**claims: Any) -> User:
        claims.setdefault("custom", {"groups": TOKEN_GROUPS})
        signed = make_claims(**claims)
        user = User(dev_key.sign(signed), signed)
        get_identity.answer(user.token, user.identity())
        return user

    return sign_in


def fetches(stack: Stack, result: str) -> float:
    return stack.authd.metric("authd_enrichment_fetches_total", result=result)


def cache_hits(stack: Stack) -> float:
    return stack.authd.metric("authd_enrichment_cache_hits_total")


def assert_not_logged(stack: Stack, token: str) -> None:
    """Neither the token nor its signature is in anything authd or nginx wrote."""
    signature = token.rsplit(".", 1)[1]
    for where, text in (("authd", stack.authd.all_output()), ("nginx", stack.nginx.all_output())):
        assert token not in text, f"the token is in {where}'s output"
        assert signature not in text, f"the token's signature is in {where}'s output"


def received(seen: Visit) -> dict[str, list[str]]:
    """The identity headers the upstream received, lower-cased names to values."""
    assert seen.received is not None, f"the upstream was not called ({seen.status})"
    names = {n for n in seen.received.names() if n.startswith("x-authd-")}
    return {n: seen.received.values(n) for n in sorted(names)}


# --- what the upstream receives -------------------------------------------------------------------


def test_the_upstream_receives_the_full_groups_and_the_passed_posture_checks(
    stack, visit, sign_in, get_identity
):
    user = sign_in()
    before = fetches(stack, "ok")

    seen = visit("/groups/", token=user.token)

    assert seen.status == 200
    headers = received(seen)
    assert headers["x-authd-groups"] == [ALL_GROUP_NAMES]
    assert headers["x-authd-posture"] == [f"{DISK_ENCRYPTION_RULE_NAME},{FIREWALL_RULE_NAME}"]
    assert headers["x-authd-issuer"] == [ISSUER]
    assert headers["x-authd-email"] == [user.claims["email"]]
    assert seen.audit["rule"] == "allow_groups"
    assert seen.audit["issuer"] == ISSUER
    assert seen.audit["enrichment"] == "fresh"
    # get-identity was asked once, with the token as the CF_Authorization cookie and nothing else.
    assert [r.cookie for r in get_identity.requests] == [f"CF_Authorization={user.token}"]
    assert not [n for n, _ in get_identity.requests[0].headers if n.lower() == "authorization"]
    assert fetches(stack, "ok") == before + 1
    assert_not_logged(stack, user.token)


def test_allow_groups_matches_groups_only_get_identity_knows_by_name_or_id(
    visit, sign_in, get_identity
):
    user = sign_in()

    # Without enrichment the same rule sees the token's custom.groups, which lack "ops".
    token_only = visit("/token-groups/", token=user.token)
    assert token_only.status == 403
    assert token_only.audit["reason"] == "not_allowed"
    assert "enrichment" not in token_only.audit
    assert get_identity.request_count == 0

    by_name = visit("/groups/", token=user.token)
    by_id = visit("/groups-by-id/", token=user.token)

    assert (by_name.status, by_name.audit["rule"]) == (200, "allow_groups")
    assert (by_id.status, by_id.audit["rule"]) == (200, "allow_groups")
    assert get_identity.request_count == 1


def test_a_user_outside_the_allowed_groups_is_403_even_with_get_identity(
    visit, sign_in, get_identity
):
    user = sign_in()
    get_identity.answer(user.token, user.identity(groups=[(SRE_ID, "sre"), (EVERYONE_ID, "all")]))

    seen = visit("/groups/", token=user.token)

    assert seen.status == 403
    assert seen.received is None
    assert seen.audit["reason"] == "not_allowed"
    assert seen.audit["enrichment"] == "fresh"


@pytest.mark.parametrize(
    ("disk", "firewall"),
    [(True, False), (False, True), (True, True), (False, False)],
    ids=["disk-only", "firewall-only", "both", "neither"],
)
def test_each_posture_header_comes_from_its_own_rule(visit, sign_in, get_identity, disk, firewall):
    user = sign_in()
    get_identity.answer(user.token, user.identity(disk_encrypted=disk, firewall_on=firewall))

    seen = visit("/lenient/", token=user.token)

    assert seen.status == 200
    headers = received(seen)
    assert headers["x-authd-disk-encrypted"] == [str(disk).lower()]
    assert headers["x-authd-firewall-activated"] == [str(firewall).lower()]
    checks = ((DISK_ENCRYPTION_RULE_NAME, disk), (FIREWALL_RULE_NAME, firewall))
    passed = ",".join(name for name, ok in checks if ok)
    if passed:
        assert headers["x-authd-posture"] == [passed]
    else:
        assert "x-authd-posture" not in headers  # an empty list is no header at all


def test_identity_headers_carry_get_identity_fields(visit, sign_in):
    user = sign_in()

    seen = visit("/lenient/", token=user.token)

    assert seen.status == 200
    headers = received(seen)
    assert headers["x-authd-idp-type"] == [user.identity()["idp"]["type"]]
    assert headers["x-authd-device-id"] == [user.identity()["device_id"]]
    assert headers["x-authd-groups"] == [ALL_GROUP_NAMES]


def test_group_names_are_encoded_for_the_header(visit, sign_in, get_identity):
    user = sign_in()
    groups = [(SRE_ID, "R&D, Europe"), (OPS_ID, "José"), (EVERYONE_ID, "")]
    get_identity.answer(user.token, user.identity(groups=groups))

    seen = visit("/lenient/", token=user.token)

    assert seen.status == 200
    # "," inside a name is %2C, so the list splits back into the names; no name: the id.
    assert received(seen)["x-authd-groups"] == [f"R&D%2C Europe,Jos%C3%A9,{EVERYONE_ID}"]


def test_a_user_in_many_groups_is_still_let_in(visit, sign_in, get_identity):
    """Cloudflare trims the token's group list; get-identity's is whole, and enterprise users
    are in hundreds of groups. Their names do not fit authd's identity headers (3072 bytes in
    all): the user must still be let in where the policy's rules admit them, and the upstream
    must never receive a partial list as if it were the whole one."""
    user = sign_in()
    many = [(str(uuid.UUID(int=n)), f"team-{n:03d}-platform-engineering") for n in range(150)]
    names = ",".join(name for _, name in many)
    assert len(names) > 3072
    get_identity.answer(user.token, user.identity(groups=[*many, (OPS_ID, "ops")]))

    for location in ("/posture/", "/groups/"):
        seen = visit(location, token=user.token)

        assert seen.status == 200, seen.audit
        groups = received(seen).get("x-authd-groups")
        assert groups is None or groups == [f"{names},ops"], groups


def test_a_token_from_the_cookie_is_enriched_too(visit, sign_in, get_identity):
    user = sign_in()

    seen = visit("/groups/", cookie=user.token)

    assert seen.status == 200
    assert seen.audit["enrichment"] == "fresh"
    assert get_identity.tokens == [user.token]


def test_a_client_cannot_forge_the_enriched_headers(visit, sign_in, get_identity):
    """With get-identity failing, authd leaves the enriched headers out; nginx must still drop
    the client's copies, not pass them on."""
    user = sign_in()
    get_identity.answer(user.token, IdentityReply.error(500))
    forged = [
        ("X-Authd-Disk-Encrypted", "true"),
        ("X-Authd-Firewall-Activated", "true"),
        ("X-Authd-Posture", "Disk Encryption,Firewall"),
        ("X-Authd-Idp-Type", "azureAD"),
        ("X-Authd-Groups", "admins"),
    ]

    seen = visit("/lenient/", token=user.token, headers=forged)

    assert seen.status == 200
    headers = received(seen)
    assert not [n for n in ENRICHED_HEADERS if n in headers]
    assert headers["x-authd-groups"] == [TOKEN_GROUPS_HEADER]  # the token's, not the client's


# --- rules over the enriched identity -------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "allowed"),
    [
        pytest.param({}, True, id="both-pass"),
        pytest.param({"disk_encrypted": False}, False, id="disk-not-encrypted-by-id"),
        pytest.param({"firewall_on": False}, False, id="firewall-off-by-name"),
    ],
)
def test_require_posture_admits_only_devices_that_pass_every_check(
    visit, sign_in, get_identity, changes, allowed
):
    user = sign_in()
    get_identity.answer(user.token, user.identity(**changes))

    seen = visit("/posture/", token=user.token)

    if allowed:
        assert seen.status == 200
        assert seen.audit["rule"] == "allow_email_domains"
    else:
        assert seen.status == 403
        assert seen.received is None
        assert seen.audit["reason"] == "requirement_failed"


def test_a_posture_check_passes_only_with_json_true(visit, sign_in, get_identity):
    user = sign_in()
    identity = user.identity()
    identity["devicePosture"][FIREWALL_RULE_ID]["success"] = "true"  # a string, not true
    get_identity.answer(user.token, identity)

    seen = visit("/posture/", token=user.token)

    assert seen.status == 403
    assert seen.audit["reason"] == "requirement_failed"


def test_a_posture_rule_missing_from_the_answer_has_not_passed(visit, sign_in, get_identity):
    user = sign_in()
    identity = user.identity()
    del identity["devicePosture"][DISK_ENCRYPTION_RULE_ID]
    get_identity.answer(user.token, identity)

    seen = visit("/posture/", token=user.token)

    assert seen.status == 403
    assert seen.audit["reason"] == "requirement_failed"


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        pytest.param({}, 200, id="azureAD-with-mfa"),
        pytest.param({"idp_type": "okta", "amr": ["hwk"]}, 200, id="okta-with-hardware-key"),
        pytest.param({"idp_type": "google"}, 403, id="another-identity-provider"),
        pytest.param({"amr": ["pwd"]}, 403, id="password-only"),
        pytest.param({"amr": []}, 403, id="no-amr"),
    ],
)
def test_require_idp_types_and_amr(visit, sign_in, get_identity, changes, status):
    user = sign_in()
    get_identity.answer(user.token, user.identity(**changes))

    seen = visit("/mfa/", token=user.token)

    assert seen.status == status
    if status == 403:
        assert seen.audit["reason"] == "requirement_failed"


def test_a_service_token_is_not_enriched(visit, make_service_token, get_identity):
    token = make_service_token(aud=WIKI_AUD)

    allowed = visit("/lenient/", token=token)
    posture = visit("/posture/", token=token)

    assert allowed.status == 200
    assert allowed.audit["enrichment"] == "skipped: service token"
    assert not [n for n in ENRICHED_HEADERS if n in received(allowed)]
    # Only get-identity's answer can satisfy require_posture, and a service token has none.
    assert posture.status == 403
    assert posture.audit["reason"] == "requirement_failed"
    assert get_identity.request_count == 0


# --- caching --------------------------------------------------------------------------------------


def test_a_repeated_token_is_served_without_asking_get_identity_again(
    stack, visit, sign_in, get_identity
):
    user = sign_in()
    hits = cache_hits(stack)

    first = visit("/groups/", token=user.token)
    again = visit("/groups/", token=user.token)  # authd's decision cache
    other_policy = visit("/lenient/", token=user.token)  # get-identity's cache

    assert [first.status, again.status, other_policy.status] == [200, 200, 200]
    assert get_identity.request_count == 1
    assert (first.audit["cached"], first.audit["enrichment"]) == (False, "fresh")
    assert (again.audit["cached"], again.audit["enrichment"]) == (True, "cached")
    assert (other_policy.audit["cached"], other_policy.audit["enrichment"]) == (False, "cached")
    assert received(again)["x-authd-groups"] == [ALL_GROUP_NAMES]
    assert received(other_policy)["x-authd-disk-encrypted"] == ["true"]
    assert cache_hits(stack) == hits + 1


def test_a_new_token_of_the_same_session_reuses_the_identity(visit, sign_in, dev_key, get_identity):
    """Cloudflare keys get-identity's answer by the session's identity_nonce, which every
    application token of the session carries."""
    user = sign_in()
    reissued = dev_key.sign({**user.claims, "iat": user.claims["iat"] + 1})
    assert reissued != user.token

    first = visit("/groups/", token=user.token)
    second = visit("/groups/", token=reissued)

    assert (first.status, second.status) == (200, 200)
    assert second.audit["enrichment"] == "cached"
    assert second.audit["token_id"] != first.audit["token_id"]
    assert get_identity.tokens == [user.token]


def test_concurrent_first_requests_share_one_get_identity_call(stack, visit, sign_in, get_identity):
    user = sign_in()
    get_identity.answer(user.token, IdentityReply.document(user.identity()).held())
    concurrent_requests = 8

    def working() -> int:
        """Requests nginx is busy with right now (the status request itself is one)."""
        with httpx.Client(base_url=stack.url, timeout=5.0) as http:
            page = http.get(STATUS_PATH).text
        return int(re.search(r"Writing: (\d+)", page).group(1)) - 1

    with concurrent.futures.ThreadPoolExecutor(concurrent_requests) as pool:
        try:
            futures = [
                pool.submit(visit, "/groups/", token=user.token) for _ in range(concurrent_requests)
            ]
            wait_for(
                lambda: working() >= concurrent_requests and get_identity.in_flight == 1,
                what="every request to wait in nginx, and get-identity's answer to be held",
                timeout=GET_IDENTITY_TIMEOUT - 1,
            )
        finally:
            get_identity.release()
        visits = [f.result(timeout=30) for f in futures]

    assert [v.status for v in visits] == [200] * concurrent_requests
    assert get_identity.request_count == 1
    # Requests that waited for the shared fetch say "fresh"; any that came after it, "cached".
    shared = [v for v in visits if v.audit["enrichment"] == "fresh"]
    assert len(shared) >= 2, [v.audit for v in visits]


def test_a_failed_enrichment_is_not_cached(visit, sign_in, get_identity):
    user = sign_in()
    get_identity.answer(user.token, IdentityReply.error(503))

    without = visit("/lenient/", token=user.token)
    get_identity.answer(user.token, user.identity())
    recovered = visit("/lenient/", token=user.token)

    assert (without.status, without.audit["enrichment"]) == (200, "failed: http_error")
    assert "x-authd-posture" not in received(without)
    assert (recovered.status, recovered.audit["enrichment"]) == (200, "fresh")
    assert recovered.audit["cached"] is False
    assert received(recovered)["x-authd-disk-encrypted"] == ["true"]
    assert get_identity.request_count == 2


# --- failures -------------------------------------------------------------------------------------


def _down(server: GetIdentityServer, user: User) -> None:  # noqa: ARG001 -- as the others
    server.stop()


def _answer(reply: Callable[[User], IdentityReply]) -> Callable[[GetIdentityServer, User], None]:
    return lambda server, user: server.answer(user.token, reply(user))


FAILURES = [
    pytest.param(_down, "transport", id="down"),
    pytest.param(
        _answer(lambda u: IdentityReply.document(u.identity()).slow(SLOWER_THAN_THE_TIMEOUT)),
        "timeout",
        id="slower-than-the-timeout",
    ),
    pytest.param(_answer(lambda _: IdentityReply.garbage()), "bad_response", id="garbage"),
    pytest.param(_answer(lambda _: IdentityReply.login_page()), "bad_response", id="html"),
    pytest.param(_answer(lambda _: IdentityReply.raw(b"[]")), "bad_response", id="json-array"),
    pytest.param(_answer(lambda _: IdentityReply.error(401)), "http_error", id="401"),
    pytest.param(_answer(lambda _: IdentityReply.error(403)), "http_error", id="403"),
    pytest.param(_answer(lambda _: IdentityReply.error(500)), "http_error", id="500"),
    pytest.param(_answer(lambda _: IdentityReply.redirect()), "http_error", id="redirect"),
    pytest.param(_answer(lambda _: IdentityReply.huge()), "too_large", id="huge"),
    pytest.param(
        _answer(lambda u: IdentityReply.document(u.identity(email="mallory@example.com"))),
        "mismatch",
        id="about-another-user",
    ),
]


@pytest.mark.parametrize(("fail", "result"), FAILURES)
def test_a_policy_that_depends_on_get_identity_fails_closed(
    visit, sign_in, get_identity, fail, result
):
    stack = visit.stack
    user = sign_in()
    fail(get_identity, user)
    before = fetches(stack, result)

    for location in ("/groups/", "/posture/"):
        seen = visit(location, token=user.token)

        assert seen.status == 500  # nginx's answer to authd's 503
        assert seen.received is None
        assert seen.audit["decision"] == "error"
        assert seen.audit["status"] == 503
        assert seen.audit["reason"] == "enrichment_unavailable"
        assert seen.audit["enrichment"] == f"failed: {result}"
        assert seen.audit["email"] == user.claims["email"]
    assert fetches(stack, result) == before + 2  # a failure is never cached
    assert_not_logged(stack, user.token)


@pytest.mark.parametrize(("fail", "result"), FAILURES)
def test_a_policy_that_allows_enrichment_failure_lets_the_user_in_without_it(
    visit, sign_in, get_identity, fail, result
):
    stack = visit.stack
    user = sign_in()
    fail(get_identity, user)
    before = fetches(stack, result)

    seen = visit("/lenient/", token=user.token)

    assert seen.status == 200
    headers = received(seen)
    assert not [n for n in ENRICHED_HEADERS if n in headers]
    assert headers["x-authd-groups"] == [TOKEN_GROUPS_HEADER]  # the token's own list
    assert headers["x-authd-email"] == [user.claims["email"]]
    assert seen.audit["decision"] == "allow"
    assert seen.audit["enrichment"] == f"failed: {result}"
    assert fetches(stack, result) == before + 1
    assert_not_logged(stack, user.token)
