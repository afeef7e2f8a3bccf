import pytest

from authd.decision import Authorizer
from authd.errors import Reason
from tests.conftest import AUD, make_config


@pytest.fixture
def authorizer(store, clock):
    cfg = make_config(wiki={"audience": [AUD], "allow_emails": ["alice@example.com"]})
    return Authorizer.from_config(cfg, store, clock)


async def test_allow_carries_claims_rule_and_headers(authorizer, forge):
    d = await authorizer.decide("wiki", lambda _: forge.valid())
    assert (d.decision, d.status, d.rule) == ("allow", 200, "allow_emails")
    assert d.claims is not None
    assert d.claims.email == "alice@example.com"
    assert ("X-Authd-Email", "alice@example.com") in d.headers
    assert d.token_id is not None


async def test_a_refusal_keeps_who_it_was_for_the_log(authorizer, forge):
    d = await authorizer.decide("wiki", lambda _: forge.valid(email="bob@example.com"))
    assert (d.decision, d.status, d.reason) == ("deny", 403, Reason.NOT_ALLOWED)
    assert d.claims is not None
    assert d.claims.email == "bob@example.com"
    assert d.headers == ()


async def test_an_invalid_token_has_a_fingerprint_but_no_claims(authorizer):
    d = await authorizer.decide("wiki", lambda _: "a.b.c")
    assert (d.status, d.reason, d.claims) == (401, Reason.MALFORMED, None)
    assert d.token_id is not None


async def test_the_policy_is_checked_before_the_token(authorizer):
    def never(_sources: object) -> str:
        raise AssertionError("the token must not be read for an unknown policy")

    d = await authorizer.decide("nope", never)
    assert (d.status, d.reason) == (403, Reason.UNKNOWN_POLICY)


@pytest.mark.parametrize(
    "error", [RuntimeError("bug"), KeyError("x"), RecursionError(), MemoryError()]
)
async def test_decide_never_raises_and_never_allows_on_a_failure(authorizer, error):
    def explode(_sources: object) -> str:
        raise error

    d = await authorizer.decide("wiki", explode)
    assert (d.decision, d.status, d.reason) == ("error", 500, Reason.INTERNAL_ERROR)
    assert d.exc_info is not None
    assert d.exc_info[1] is error
    assert d.headers == ()
