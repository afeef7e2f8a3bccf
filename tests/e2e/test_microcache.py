"""Micro-cache mode through the real nginx: nginx reuses allows, and only allows, only for the
token and policy they were made for, and never past the token's ``exp``.

The module's stack runs the micro-cache snippets (``authd-http-microcache.conf`` rendered with
its cache and log in the work directory, the shipped ``authd-server-microcache.conf``) and authd
with ``nginx_cache_seconds = 30`` and no leeway, so that "after exp" means exactly that. A request
nginx answers from its cache never reaches authd: it shows in the micro-cache access log as a HIT,
with the user it was let in as, and writes no audit line.
"""

from __future__ import annotations

import stat
import time
from typing import TYPE_CHECKING, Any

import pytest

from devtools.stack import make_config, running_stack, wait_for
from tests.e2e.conftest import POLICIES, _extra_locations

if TYPE_CHECKING:
    from collections.abc import Iterator

    from devtools.stack import Stack
    from tests.e2e.conftest import Visit, Visitor

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory, module_key_server) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("microcache")
    config = make_config(
        workdir,
        jwks_url=module_key_server.url,
        policies=POLICIES,
        leeway_seconds=0,
        nginx_cache_seconds=30,
    )
    with running_stack(workdir, config, extra_locations=_extra_locations, microcache=True) as s:
        yield s


def cache_status(stack: Stack, visit: Visit) -> str:
    """HIT or MISS: what the micro-cache access log says of this visit."""

    def logged() -> dict[str, Any] | None:
        lines = [line for line in stack.nginx.microcache_lines() if line["uri"] == visit.path]
        return lines[0] if lines else None

    line = wait_for(logged, what=f"the access log line of {visit.path}", timeout=5.0)
    return str(line["cache"])


def reused(visit: Visitor, location: str = "/wiki/", **sent: Any) -> Visit:
    """A visit that nginx must answer from its cache: no audit line."""
    answer = visit(location, audited=False, **sent)
    assert cache_status(visit.stack, answer) == "HIT"
    assert not [line for line in visit.stack.authd.audit_lines() if line["uri"] == answer.path]
    return answer


def test_every_user_gets_their_own_identity_from_the_cache(visit, make_token):
    users = [
        (make_token(), "alice@example.com"),
        (make_token(email="bob@example.com"), "bob@example.com"),
    ]
    for token, email in users:
        first = visit("/wiki/", token=token)
        assert (first.status, first.audit["email"]) == (200, email)
        assert cache_status(visit.stack, first) == "MISS"
    for _ in range(3):
        for token, email in users:
            answer = reused(visit, token=token)
            assert answer.status == 200
            assert answer.received is not None
            assert answer.received.get("X-Authd-Email") == email
            assert answer.received.get("X-Authd-User") == email
    lines = visit.stack.nginx.microcache_lines()
    assert {line["user"] for line in lines if line["cache"] == "HIT"} == {
        "alice@example.com",
        "bob@example.com",
    }


def test_denials_are_never_cached(visit, make_token):
    refused = make_token(email="mallory@evil.example")
    for _ in range(3):
        answer = visit("/wiki/", token=refused)
        assert (answer.status, answer.audit["reason"]) == (403, "not_allowed")
        assert cache_status(visit.stack, answer) == "MISS"
    for _ in range(2):
        answer = visit("/wiki/")
        assert (answer.status, answer.audit["reason"]) == (401, "no_token")


def test_an_allow_for_one_policy_is_not_reused_for_another(visit, make_token):
    token = make_token()  # the wiki's audience only
    assert visit("/wiki/", token=token).status == 200
    reused(visit, token=token)
    for _ in range(2):
        answer = visit("/ops/", token=token)
        assert (answer.status, answer.audit["reason"]) == (401, "bad_audience")


def test_a_second_token_beside_a_cached_one_is_still_ambiguous(visit, make_token):
    token = make_token()
    assert visit("/wiki/", token=token).status == 200
    reused(visit, token=token)
    answer = visit("/wiki/", token=token, cookie=make_token(email="bob@example.com"))
    assert (answer.status, answer.audit["reason"]) == (401, "ambiguous_token")


def test_no_allow_is_reused_after_the_token_expires(visit, make_token):
    token = make_token(ttl=4)
    exp = time.time() + 4
    first = visit("/wiki/", token=token)
    assert first.status == 200
    reused(visit, token=token)
    time.sleep(max(0.0, exp - time.time()))
    answer = visit("/wiki/", token=token)  # authd is asked again, and refuses
    assert (answer.status, answer.audit["reason"]) == (401, "expired")
    assert answer.received is None


def test_the_cache_directory_is_for_nginx_only(stack):
    mode = stack.nginx.microcache_dir.stat().st_mode
    assert stat.S_IMODE(mode) == 0o700
