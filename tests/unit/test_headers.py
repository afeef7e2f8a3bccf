import pytest

from authd.claims import Claims
from authd.config import TokenSource, parse
from authd.errors import Denied, Reason
from authd.headers import (
    MAX_IDENTITY_BYTES,
    HeaderPlan,
    RequestFacts,
    encode_value,
    extract_token,
    redact_uri,
    token_digest,
    token_id,
)
from authd.policy import Policy
from authd.verify import MAX_TOKEN_BYTES
from tests.conftest import verified_claims

AUD = "a" * 64
TOK = "aaaa.bbbb.cccc"
OTHER = "dddd.eeee.ffff"
DEFAULT_SOURCES = (
    TokenSource("header", "Cf-Access-Jwt-Assertion"),
    TokenSource("cookie", "CF_Authorization"),
)


class Req:
    """Headers as Falcon presents them: case-insensitive, repeated ones joined by ","."""

    def __init__(self, *pairs: tuple[str, str]) -> None:
        self.headers: dict[str, str] = {}
        for name, value in pairs:
            key = name.lower()
            self.headers[key] = f"{self.headers[key]},{value}" if key in self.headers else value

    def get_header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def extract(*pairs: tuple[str, str], sources=DEFAULT_SOURCES) -> str:
    return extract_token(sources, Req(*pairs))


def refused(*pairs: tuple[str, str], sources=DEFAULT_SOURCES) -> Reason:
    with pytest.raises(Denied) as ex:
        extract(*pairs, sources=sources)
    return ex.value.reason


@pytest.mark.parametrize(
    "pairs",
    [
        [("Cf-Access-Jwt-Assertion", TOK)],
        [("cf-access-jwt-assertion", TOK)],
        [("Cookie", f"CF_Authorization={TOK}")],
        [("Cookie", f"a=1; CF_Authorization={TOK}; b=2")],
        [("Cookie", f'CF_Authorization="{TOK}"')],
        [("Cookie", f'CF_Authorization=" {TOK}\t"')],  # found by the fuzzer: no blank at an end
        [("Cf-Access-Jwt-Assertion", TOK), ("Cookie", f"CF_Authorization={TOK}")],  # same twice
        [("Cf-Access-Jwt-Assertion", TOK), ("Cf-Access-Jwt-Assertion", TOK)],
        [("Cf-Access-Jwt-Assertion", f"  {TOK}  ")],
        [("Cf-Access-Jwt-Assertion", ""), ("Cookie", f"CF_Authorization={TOK}")],  # empty = absent
    ],
)
def test_the_one_token_is_found(pairs):
    assert extract(*pairs) == TOK


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([], Reason.NO_TOKEN),
        ([("Cf-Access-Jwt-Assertion", "")], Reason.NO_TOKEN),
        ([("Cookie", "CF_Authorization=")], Reason.NO_TOKEN),
        ([("Cookie", "cf_authorization=" + TOK)], Reason.NO_TOKEN),  # cookie names are exact
        ([("Cookie", "XCF_Authorization=" + TOK)], Reason.NO_TOKEN),
        ([("Authorization", "Bearer " + TOK)], Reason.NO_TOKEN),  # bearer is not a default source
        ([("Cf-Access-Jwt-Assertion-X", TOK)], Reason.NO_TOKEN),
        ([("X-Cf-Access-Jwt-Assertion", TOK)], Reason.NO_TOKEN),
        (
            [("Cf-Access-Jwt-Assertion", TOK), ("Cookie", f"CF_Authorization={OTHER}")],
            Reason.AMBIGUOUS_TOKEN,
        ),
        (
            [("Cf-Access-Jwt-Assertion", TOK), ("Cf-Access-Jwt-Assertion", OTHER)],
            Reason.AMBIGUOUS_TOKEN,
        ),
        ([("Cf-Access-Jwt-Assertion", f"{TOK}, {OTHER}")], Reason.AMBIGUOUS_TOKEN),
        ([("Cookie", f"CF_Authorization={TOK}; CF_Authorization={OTHER}")], Reason.AMBIGUOUS_TOKEN),
        (
            [("Cookie", f"CF_Authorization={TOK}"), ("Cookie", f"CF_Authorization={OTHER}")],
            Reason.AMBIGUOUS_TOKEN,
        ),
        ([("Cf-Access-Jwt-Assertion", "x" * (MAX_TOKEN_BYTES + 1))], Reason.TOKEN_TOO_LARGE),
        ([("Cookie", "CF_Authorization=" + "x" * 100_000)], Reason.TOKEN_TOO_LARGE),
        (
            [("Cf-Access-Jwt-Assertion", TOK), ("Cookie", "CF_Authorization=" + "x" * 9000)],
            Reason.TOKEN_TOO_LARGE,
        ),
    ],
)
def test_no_single_token(pairs, expected):
    assert refused(*pairs) is expected


def test_bearer_source():
    sources = (TokenSource("bearer"),)
    assert extract(("Authorization", f"Bearer {TOK}"), sources=sources) == TOK
    assert extract(("Authorization", f"bearer   {TOK}"), sources=sources) == TOK
    assert refused(("Authorization", f"Basic {TOK}"), sources=sources) is Reason.NO_TOKEN
    assert refused(("Authorization", "Bearer "), sources=sources) is Reason.NO_TOKEN
    assert (
        refused(
            ("Authorization", f"Bearer {TOK}"),
            ("Authorization", f"Bearer {OTHER}"),
            sources=sources,
        )
        is Reason.AMBIGUOUS_TOKEN
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alice@example.com", "alice@example.com"),
        ("Jos\u00e9", "Jos%C3%A9"),
        ("\u5c71\u7530", "%E5%B1%B1%E7%94%B0"),
        ("100%", "100%25"),
        ('a, b; c="d"', 'a, b; c="d"'),
        ("  padded ", "%20%20padded%20"),
        ("\U0001f600", "%F0%9F%98%80"),
        ("\u2028", "%E2%80%A8"),  # a Unicode line separator is encoded, never raw
        ("", ""),
    ],
)
def test_values_are_plain_ascii(value, expected):
    encoded = encode_value(value)
    assert encoded == expected
    assert encoded.isascii()
    assert encoded.isprintable()


def test_list_elements_encode_the_separator():
    assert encode_value("a,b", in_list=True) == "a%2Cb"
    assert encode_value("a,b") == "a,b"


@pytest.mark.parametrize(
    "value",
    [
        "a\r\nX-Authd-Email: evil",
        "a\nb",
        "a\rb",
        "a\x00b",
        "a\x7fb",
        "\x1b[31m",
        "a\tb",
        "a\x85b",
        "\ud800",
    ],
)
def test_control_characters_and_broken_unicode_deny(value):
    with pytest.raises(Denied) as ex:
        encode_value(value)
    assert ex.value.reason is Reason.UNSAFE_CLAIM_VALUE


def test_oversized_value_denies():
    with pytest.raises(Denied) as ex:
        encode_value("x" * 5000)
    assert ex.value.reason is Reason.UNSAFE_CLAIM_VALUE


def plan(**policy_rules: object) -> HeaderPlan:
    cfg = parse(
        {
            "issuers": [{"name": "cf", "team": "t"}],
            "policies": {"wiki": {"audience": [AUD], **policy_rules}},
        },
    )
    return HeaderPlan.for_policy(Policy(cfg.policies["wiki"], {"cf": "custom.groups"}))


def claims(payload: dict, email: str = "alice@example.com", service_token: str = "") -> Claims:
    return verified_claims(payload, email=email, service_token=service_token)


def test_default_identity_headers_for_a_user():
    payload = {"country": "DE", "custom": {"groups": ["sre", "a,b", "Jos\u00e9"]}}
    assert dict(plan().render(claims(payload))) == {
        "X-Authd-User": "alice@example.com",
        "X-Authd-Email": "alice@example.com",
        "X-Authd-Sub": "sub-1",
        "X-Authd-Groups": "sre,a%2Cb,Jos%C3%A9",
        "X-Authd-Country": "DE",
        "X-Authd-Policy": "wiki",
        "X-Authd-Issuer": "cf",
    }


def test_service_token_headers_leave_out_empty_values():
    headers = dict(plan().render(claims({}, email="", service_token="abc.access")))
    assert headers == {
        "X-Authd-User": "abc.access",
        "X-Authd-Service-Token": "abc.access",
        "X-Authd-Policy": "wiki",
        "X-Authd-Issuer": "cf",
    }


@pytest.mark.parametrize(
    ("claim_value", "header_value"),
    [
        ("ops", "ops"),
        (42, "42"),
        (True, "true"),
        (["a", "b,c"], "a,b%2Cc"),
        ({"k": "v"}, '{"k":"v"}'),
        ("M\u00fcller", "M%C3%BCller"),
        (None, None),
    ],
)
def test_custom_headers(claim_value, header_value):
    p = plan(headers={"X-Authd-Department": "custom.department"})
    headers = dict(p.render(claims({"custom": {"department": claim_value}})))
    assert headers.get("X-Authd-Department") == header_value


def test_a_control_character_in_any_identity_value_denies():
    with pytest.raises(Denied) as ex:
        plan().render(claims({"country": "DE\r\nX-Authd-Email: root@example.com"}))
    assert ex.value.reason is Reason.UNSAFE_CLAIM_VALUE


def test_identity_headers_are_capped_in_total():
    groups = [f"group-{i:04d}" for i in range(300)]
    with pytest.raises(Denied) as ex:
        plan().render(claims({"custom": {"groups": groups}}))
    assert ex.value.reason is Reason.UNSAFE_CLAIM_VALUE
    assert "over" in ex.value.detail
    fits = groups[: (MAX_IDENTITY_BYTES - 300) // 11]
    assert plan().render(claims({"custom": {"groups": fits}}))


@pytest.mark.parametrize(
    ("uri", "logged"),
    [
        ("/wiki/page", "/wiki/page"),
        ("/a?token=secret&x=1", "/a?token=[redacted]&x=[redacted]"),
        ("/a?justavalue", "/a?[redacted]"),
        ("/cb/eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl/x", "/cb/[redacted]/x"),
        # The dots percent-encoded, or the segments split by "/": the signature goes too.
        (
            "/cb/eyJhbGciOiJSUzI1NiJ9%2EeyJzdWIiOiIxIn0%2ec2lnbmF0dXJlc2lnbmF0dXJl/x",
            "/cb/[redacted]/x",
        ),
        (
            "/cb/eyJhbGciOiJSUzI1NiJ9/eyJzdWIiOiIxMjM0NTY3In0/c2lnbmF0dXJlc2lnbmF0dXJl/x",
            "/cb/[redacted]/x",
        ),
        ("/caf\u00e9\r\n", "/caf???"),
        ("", ""),
    ],
)
def test_uris_are_logged_without_query_values_or_tokens(uri, logged):
    assert redact_uri(uri) == logged


def test_request_facts_are_sanitised_and_capped():
    req = Req(
        ("X-Original-URI", "/x?a=b"),
        ("X-Original-Method", "GET\r\nInjected: 1"),
        ("Host", "h" * 1000),
        ("X-Real-IP", "203.0.113.9"),
        ("X-Request-ID", "abc\x00def"),
    )
    facts = RequestFacts.from_request(req, "POST")
    assert facts.method == "GET??Injected: 1"
    assert facts.uri == "/x?a=[redacted]"
    assert len(facts.host) == 256
    assert facts.client_ip == "203.0.113.9"
    assert facts.request_id == "abc?def"
    assert RequestFacts.from_request(Req(), "PUT").method == "PUT"


def test_token_id_is_a_short_fingerprint():
    assert len(token_id(token_digest(TOK))) == 16
    assert token_id(token_digest(TOK)) != token_id(token_digest(OTHER))
    assert TOK not in token_id(token_digest(TOK))


@pytest.mark.parametrize(
    "shape",
    [
        "{t}{t}",  # two tokens glued together
        "{t}.{t}",
        "{h}_%2e{t}",  # junk glued before, joined by an encoded dot
        "{t}%2E{s}.%2e",  # a copy of the signature glued after
        "x{t}x",
        "/{h}/{p}/{s}",
    ],
)
def test_no_piece_of_a_token_survives_glued_shapes(forge, shape):
    token = forge.valid()
    h, p, s = token.split(".")
    value = shape.format(t=token, h=h, p=p, s=s)
    facts = RequestFacts.from_request(Req(("X-Request-ID", value)), "GET")
    for redacted in (redact_uri("/wiki/" + value), facts.request_id):
        for segment in (h, p, s):
            assert not any(segment[i : i + 24] in redacted for i in range(len(segment) - 23)), (
                shape,
                redacted,
            )
