"""The decision cache: what a hit serves, and everything that must end one.

Through ``Authorizer.decide`` (what the app calls), with the fake clock and key source of
conftest: a hit is the same answer the verifier gave, marked ``cached``, and never outlives
the token's time claims, the configured age, the key set that verified it, or a reload.
"""

from __future__ import annotations

import gc
import tracemalloc
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authd import config as config_mod
from authd import verify
from authd.cache import DecisionCache
from authd.config import CacheSettings, TokenSource
from authd.decision import Authorizer
from authd.errors import Denied, Reason
from authd.headers import Found, token_digest
from authd.keys import IssuerKeys, KeyStore
from tests.conftest import AUD, ISSUER, NOW, OTHER_AUD, make_config

WIKI = {"audience": [AUD], "allow_email_domains": ["example.com"]}
OPS = {"audience": [AUD], "allow_emails": ["bob@example.com"]}


def authorizer_for(store, clock, **cache: object) -> Authorizer:
    cfg = make_config(wiki=WIKI, ops=OPS)
    cfg = replace(cfg, cache=replace(cfg.cache, **cache))
    return Authorizer.from_config(cfg, store, clock)


@pytest.fixture
def authorizer(store, clock):
    return authorizer_for(store, clock)


@pytest.fixture
def signatures(monkeypatch):
    """How many signatures were checked: a hit checks none."""
    checked = []
    original = verify.check_signature

    def counting(*args, **kwargs):
        checked.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(verify, "check_signature", counting)
    return checked


async def test_the_second_request_is_a_hit_with_the_same_answer(authorizer, forge, signatures):
    token = forge.valid()
    first = await authorizer.decide("wiki", lambda _: token)
    second = await authorizer.decide("wiki", lambda _: token)
    assert (first.status, first.cached, second.status, second.cached) == (200, False, 200, True)
    assert second.headers == first.headers
    assert (second.rule, second.token_id, second.policy) == (first.rule, first.token_id, "wiki")
    assert second.claims is not None
    assert (second.claims.email, second.claims.iss) == ("alice@example.com", first.claims.iss)
    assert len(signatures) == 1


async def test_a_hit_holds_no_token_payload(authorizer, forge):
    token = forge.valid()
    await authorizer.decide("wiki", lambda _: token)
    hit = await authorizer.decide("wiki", lambda _: token)
    assert hit.claims is not None
    assert dict(hit.claims.payload) == {}


async def test_denials_are_never_cached(authorizer, forge, signatures):
    refused = forge.valid(email="mallory@evil.example")
    for _ in range(2):
        d = await authorizer.decide("wiki", lambda _: refused)
        assert (d.status, d.reason, d.cached) == (403, Reason.NOT_ALLOWED, False)
    assert len(signatures) == 2
    assert len(authorizer.cache) == 0


async def test_an_allow_for_one_policy_is_not_an_allow_for_another(authorizer, forge):
    token = forge.valid()
    assert (await authorizer.decide("wiki", lambda _: token)).status == 200
    d = await authorizer.decide("ops", lambda _: token)
    assert (d.status, d.reason, d.cached) == (403, Reason.NOT_ALLOWED, False)


async def test_another_token_of_the_same_user_is_verified_on_its_own(authorizer, forge):
    await authorizer.decide("wiki", forge.valid)
    other = await authorizer.decide("wiki", lambda _: forge.valid(identity_nonce="nonce-2"))
    assert (other.status, other.cached) == (200, False)


async def test_a_token_tampered_after_its_allow_is_refused(authorizer, forge):
    token = forge.valid()
    await authorizer.decide("wiki", lambda _: token)
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BA")
    d = await authorizer.decide("wiki", lambda _: tampered)
    assert (d.status, d.reason) == (401, Reason.BAD_SIGNATURE)


async def test_a_hit_ends_when_the_token_expires(authorizer, forge, clock):
    token = forge.valid(exp=int(NOW) + 60)
    await authorizer.decide("wiki", lambda _: token)
    clock.advance(60 + 30 - 1)  # exp + leeway (30 s), less a second: still valid
    assert (await authorizer.decide("wiki", lambda _: token)).cached
    clock.advance(1)
    d = await authorizer.decide("wiki", lambda _: token)
    assert (d.status, d.reason, d.cached) == (401, Reason.EXPIRED, False)


async def test_a_hit_ends_when_the_clock_goes_back_before_nbf(authorizer, forge, clock):
    token = forge.valid(nbf=int(NOW), iat=int(NOW))
    await authorizer.decide("wiki", lambda _: token)
    clock.now -= 31  # before nbf - leeway: the token is not valid yet at this time
    d = await authorizer.decide("wiki", lambda _: token)
    assert (d.status, d.reason, d.cached) == (401, Reason.NOT_YET_VALID, False)


async def test_an_entry_lives_at_most_max_seconds(store, forge, clock, signatures):
    authorizer = authorizer_for(store, clock, max_seconds=10)
    token = forge.valid()
    await authorizer.decide("wiki", lambda _: token)
    clock.mono += 9.9
    assert (await authorizer.decide("wiki", lambda _: token)).cached
    clock.mono += 0.1
    d = await authorizer.decide("wiki", lambda _: token)
    assert (d.status, d.cached) == (200, False)
    assert len(signatures) == 2


async def test_a_changed_key_set_ends_every_hit(authorizer, forge, issuer_keys, source, rsa_key):
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415

    token = forge.valid()
    await authorizer.decide("wiki", lambda _: token)
    source.serve(rsa_key, rsa.generate_private_key(public_exponent=65537, key_size=2048))
    await issuer_keys.refresh()  # a key added: the set changed
    d = await authorizer.decide("wiki", lambda _: token)
    assert (d.status, d.cached) == (200, False)
    assert (await authorizer.decide("wiki", lambda _: token)).cached


async def test_a_key_removed_from_the_set_refuses_its_cached_tokens(
    authorizer, forge, issuer_keys, source, foreign_key
):
    token = forge.valid()
    await authorizer.decide("wiki", lambda _: token)
    source.serve(foreign_key)  # the signing key is withdrawn (rotated out, or compromised)
    await issuer_keys.refresh()
    d = await authorizer.decide("wiki", lambda _: token)
    assert (d.status, d.reason) == (401, Reason.UNKNOWN_KID)


async def test_an_unchanged_refetch_keeps_the_hits(authorizer, forge, issuer_keys):
    token = forge.valid()
    await authorizer.decide("wiki", lambda _: token)
    await issuer_keys.refresh()  # the same set again
    assert (await authorizer.decide("wiki", lambda _: token)).cached


async def test_no_hit_once_the_keys_are_unusable(authorizer, forge, issuer_keys, clock, source):
    token = forge.valid()
    await authorizer.decide("wiki", lambda _: token)
    source.error = "down"
    clock.mono += issuer_keys.config.refresh_seconds + issuer_keys.config.max_stale_seconds + 1
    d = await authorizer.decide("wiki", lambda _: token)
    assert (d.status, d.reason) == (503, Reason.KEYS_UNAVAILABLE)


async def test_a_new_configuration_starts_with_an_empty_cache(store, forge, clock):
    token = forge.valid()
    before = authorizer_for(store, clock)
    await before.decide("wiki", lambda _: token)
    cfg = make_config(wiki={"audience": [OTHER_AUD]})  # the application's audience changed
    after = Authorizer.from_config(cfg, store, clock)
    d = await after.decide("wiki", lambda _: token)
    assert (d.status, d.reason, d.cached) == (401, Reason.BAD_AUDIENCE, False)


async def test_the_cache_can_be_turned_off(store, forge, clock, signatures):
    authorizer = authorizer_for(store, clock, enabled=False)
    token = forge.valid()
    for _ in range(3):
        d = await authorizer.decide("wiki", lambda _: token)
        assert (d.status, d.cached) == (200, False)
    assert authorizer.cache is None
    assert len(signatures) == 3


async def test_the_least_recently_used_entry_goes_first(store, forge, clock):
    authorizer = authorizer_for(store, clock, max_entries=2)
    a, b, c = (forge.valid(identity_nonce=n) for n in "abc")
    await authorizer.decide("wiki", lambda _: a)
    await authorizer.decide("wiki", lambda _: b)
    assert (await authorizer.decide("wiki", lambda _: a)).cached  # a is now the most recent
    await authorizer.decide("wiki", lambda _: c)  # evicts b
    assert len(authorizer.cache) == 2
    assert (await authorizer.decide("wiki", lambda _: a)).cached
    assert (await authorizer.decide("wiki", lambda _: c)).cached
    assert not (await authorizer.decide("wiki", lambda _: b)).cached


async def test_the_memory_bound_evicts_too(store, forge, clock):
    authorizer = authorizer_for(store, clock, max_megabytes=1)
    cache = authorizer.cache
    assert cache is not None
    token = forge.valid()
    verified = await authorizer.verifier.verify_with_keys(token, (AUD,))
    await authorizer.decide("wiki", lambda _: token)
    stored = await authorizer.decide("wiki", lambda _: token)
    count = 2000  # a megabyte holds about 550 ordinary entries
    for n in range(count):
        cache.put(token_digest(f"token-{n}"), "wiki", stored, verified)
    assert cache.bytes <= cache.max_bytes
    assert 400 < len(cache) < count
    assert cache.get(token_digest(f"token-{count - 1}"), "wiki") is stored
    assert cache.get(token_digest("token-0"), "wiki") is None  # the oldest went first


async def test_the_size_accounting_does_not_undercount(authorizer, forge, clock):
    """``max_megabytes`` bounds real memory: each entry costs at most what it is counted as."""
    token = forge.valid()
    verified = await authorizer.verifier.verify_with_keys(token, (AUD,))
    await authorizer.decide("wiki", lambda _: token)
    stored = await authorizer.decide("wiki", lambda _: token)  # an entry's decision, as kept
    assert stored.cached
    assert stored.claims is not None
    cache = DecisionCache(CacheSettings(max_entries=10**6, max_megabytes=1024), clock)
    count = 20_000
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for n in range(count):
        email = f"user-{n:06d}@example.com"  # every entry its own strings, as in real life
        decision = replace(
            stored,
            claims=replace(stored.claims, email=email, sub=f"{n:036d}"),
            headers=(("X-Authd-User", email), ("X-Authd-Email", email), *stored.headers[2:]),
            token_id=f"{n:016x}",
        )
        cache.put(token_digest(f"token-{n}"), "wiki", decision, verified)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(cache) == count
    assert used <= cache.bytes, f"{used / count:.0f} B per entry; ENTRY_OVERHEAD_BYTES is too low"


@given(
    exp=st.integers(0, 4 * 10**9),
    nbf=st.none() | st.integers(0, 4 * 10**9),
    iat=st.none() | st.integers(0, 4 * 10**9),
    now=st.integers(0, 4 * 10**9),
    later=st.integers(-(10**9), 10**9),
    leeway=st.integers(0, 300),
)
def test_the_window_is_exactly_where_the_time_checks_pass(exp, nbf, iat, now, later, leeway):  # noqa: PLR0917 -- hypothesis passes them so
    """A hit at ``now + later`` must be answered as a fresh verification would answer it."""
    payload = (
        {"exp": exp} | ({} if nbf is None else {"nbf": nbf}) | ({} if iat is None else {"iat": iat})
    )
    try:
        _, valid_from, valid_until = verify.check_times(payload, now, leeway)
    except Denied:
        return  # never stored
    then = now + later
    try:
        verify.check_times(payload, then, leeway)
        passes = True
    except Denied:
        passes = False
    assert passes == (valid_from <= then < valid_until)


# --- several issuers: a hit must go to the issuer a fresh check would choose -----------------


@pytest.fixture
async def shared_iss(source, clock):
    """Two OIDC issuers with one iss (the conftest's), told apart only by where tokens arrive."""
    cfg = config_mod.parse(
        {
            "issuers": [
                {
                    "name": name,
                    "provider": "oidc",
                    "issuer": ISSUER,
                    "jwks_url": f"{ISSUER}/keys-{name}",
                    "token_sources": [where],
                    "require_email_verified": False,  # conftest's tokens do not say
                }
                for name, where in (("a", "header:X-Token"), ("b", "bearer"))
            ],
            "policies": {"wiki": WIKI},
        },
    )
    keys = [IssuerKeys(i, source, clock) for i in cfg.issuers]
    for k in keys:
        assert await k.refresh()
    authorizer = Authorizer.from_config(cfg, KeyStore(keys), clock)
    header, bearer = TokenSource("header", "X-Token"), TokenSource("bearer")

    async def decide(token: str, *where: TokenSource):
        return await authorizer.decide("wiki", lambda _: Found(token, where))

    return decide, header, bearer


async def test_a_hit_is_no_way_around_a_token_that_fits_two_issuers(shared_iss, forge):
    decide, header, bearer = shared_iss
    token = forge.valid()
    both = await decide(token, header, bearer)
    assert (both.status, both.reason) == (401, Reason.BAD_ISSUER)  # it fits a and b
    alone = await decide(token, header)
    assert (alone.status, alone.claims.issuer_name) == (200, "a")
    assert (await decide(token, header)).cached
    again = await decide(token, header, bearer)  # the cached allow of "a" must not answer
    assert (again.status, again.reason, again.cached) == (401, Reason.BAD_ISSUER, False)
    other = await decide(token, bearer)  # b's to judge afresh, not a's cached allow
    assert (other.status, other.cached, other.claims.issuer_name) == (200, False, "b")
