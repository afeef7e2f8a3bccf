import pytest

from authd.claims import Claims
from authd.config import parse
from authd.errors import Denied, Reason
from authd.policy import Policy
from tests.conftest import verified_claims

AUD = "a" * 64


def policy(**rules: object) -> Policy:
    cfg = parse(
        {
            "issuers": [{"name": "cf", "team": "t"}],
            "policies": {"p": {"audience": [AUD], **rules}},
        },
    )
    return Policy(cfg.policies["p"], {"cf": cfg.issuers[0].groups_claim})


def user(email: str = "alice@example.com", **payload: object) -> Claims:
    return verified_claims({"email": email, **payload}, email=email)


def service(client_id: str = "abc.access") -> Claims:
    return verified_claims({"common_name": client_id}, service_token=client_id)


def reason(p: Policy, c: Claims) -> Reason:
    with pytest.raises(Denied) as ex:
        p.evaluate(c)
    return ex.value.reason


def test_no_allow_list_admits_any_valid_token():
    assert policy().evaluate(user()) == "any_valid_token"
    assert policy().evaluate(service()) == "any_valid_token"


@pytest.mark.parametrize(
    ("rules", "email", "rule"),
    [
        ({"allow_emails": ["alice@example.com"]}, "alice@example.com", "allow_emails"),
        ({"allow_emails": ["Alice@Example.com"]}, "ALICE@example.COM", "allow_emails"),
        ({"allow_email_domains": ["example.com"]}, "bob@example.com", "allow_email_domains"),
        ({"allow_email_domains": ["example.com"]}, "bob@EXAMPLE.com", "allow_email_domains"),
        ({"allow_email_domains": [".example.com"]}, "bob@example.com", "allow_email_domains"),
        ({"allow_email_domains": [".example.com"]}, "bob@eu.example.com", "allow_email_domains"),
        ({"allow_email_domains": [".example.com"]}, "bob@a.b.example.com", "allow_email_domains"),
    ],
)
def test_allow_lists_admit(rules, email, rule):
    assert policy(**rules).evaluate(user(email)) == rule


@pytest.mark.parametrize(
    ("rules", "email"),
    [
        ({"allow_emails": ["alice@example.com"]}, "alice@example.co"),
        ({"allow_emails": ["alice@example.com"]}, "alice@example.com.evil.net"),
        ({"allow_emails": ["alice@example.com"]}, "malice@example.com"),
        ({"allow_email_domains": ["example.com"]}, "bob@eu.example.com"),
        ({"allow_email_domains": ["example.com"]}, "bob@evilexample.com"),
        ({"allow_email_domains": ["example.com"]}, "bob@example.com.evil.net"),
        ({"allow_email_domains": [".example.com"]}, "bob@evilexample.com"),
        ({"allow_email_domains": ["example.com"]}, "example.com@evil.net"),
        ({"allow_email_domains": ["example.com"]}, "alice@evil.org@example.com"),
        ({"allow_email_domains": ["example.com"]}, "example.com"),
        ({"allow_email_domains": ["example.com"]}, "@example.com"),
        # str.lower() maps these onto ASCII: the Kelvin sign to "k", the Angstrom sign to "å".
        ({"allow_emails": ["kate@corp.com"]}, "\u212aate@corp.com"),
        ({"allow_email_domains": ["kubernetes.io"]}, "x@\u212aubernetes.io"),
        ({"allow_emails": ["\u00e5sa@corp.com"]}, "\u212bsa@corp.com"),
        ({"allow_groups": ["sre"]}, "bob@example.com"),
    ],
)
def test_allow_lists_refuse(rules, email):
    assert reason(policy(**rules), user(email)) is Reason.NOT_ALLOWED


def test_allow_lists_are_alternatives():
    p = policy(allow_emails=["carol@other.org"], allow_email_domains=["example.com"])
    assert p.evaluate(user("carol@other.org")) == "allow_emails"
    assert p.evaluate(user("dave@example.com")) == "allow_email_domains"
    assert reason(p, user("eve@evil.org")) is Reason.NOT_ALLOWED


def test_groups_come_from_the_issuers_groups_claim():
    p = policy(allow_groups=["sre"])
    assert p.evaluate(user(custom={"groups": ["dev", "sre"]})) == "allow_groups"
    assert p.evaluate(user(custom={"groups": "sre"})) == "allow_groups"
    assert reason(p, user(custom={"groups": ["SRE"]})) is Reason.NOT_ALLOWED
    assert reason(p, user(custom={"groups": [["sre"]]})) is Reason.NOT_ALLOWED
    assert reason(p, user(groups=["sre"])) is Reason.NOT_ALLOWED  # not where the issuer puts them


def test_service_tokens_are_admitted_only_by_their_own_list():
    p = policy(allow_service_tokens=["abc.access"], allow_email_domains=["example.com"])
    assert p.evaluate(service("abc.access")) == "allow_service_tokens"
    assert reason(p, service("xyz.access")) is Reason.NOT_ALLOWED
    assert reason(policy(allow_email_domains=["access"]), service("abc.access")) is (
        Reason.NOT_ALLOWED
    )


@pytest.mark.parametrize(
    ("required", "payload", "ok"),
    [
        ({"country": ["DE", "NL"]}, {"country": "NL"}, True),
        ({"country": ["DE", "NL"]}, {"country": "FR"}, False),
        ({"country": ["DE"]}, {}, False),
        ({"country": ["DE"]}, {"country": ["FR", "DE"]}, True),  # any element of a list
        ({"country": ["DE"]}, {"country": ["FR"]}, False),
        ({"custom.department": ["ops"]}, {"custom": {"department": "ops"}}, True),
        ({"custom.department": ["ops"]}, {"custom": {"department": "dev"}}, False),
        ({"custom.department": ["ops"]}, {"custom": "ops"}, False),
        # an exact claim name with dots wins over the walk
        ({"https://example.com/role": ["admin"]}, {"https://example.com/role": "admin"}, True),
        ({"a.b": ["x"]}, {"a.b": "x", "a": {"b": "y"}}, True),
        ({"a.b": ["y"]}, {"a.b": "x", "a": {"b": "y"}}, False),
        ({"level": [1]}, {"level": 1}, True),
        ({"level": [1]}, {"level": True}, False),  # true is not the number 1
        ({"admin": [True]}, {"admin": 1}, False),
        ({"admin": [True]}, {"admin": True}, True),
        ({"level": [1]}, {"level": "1"}, False),
        ({"country": ["DE"], "custom.department": ["ops"]}, {"country": "DE"}, False),  # all hold
    ],
)
def test_require_claims(required, payload, ok):
    p = policy(require_claims=required)
    if ok:
        assert p.evaluate(user(**payload)) == "any_valid_token"
    else:
        assert reason(p, user(**payload)) is Reason.REQUIREMENT_FAILED


def test_requirements_are_checked_before_allow_lists():
    p = policy(require_claims={"country": ["DE"]}, allow_emails=["alice@example.com"])
    assert reason(p, user(country="FR")) is Reason.REQUIREMENT_FAILED
    assert p.evaluate(user(country="DE")) == "allow_emails"
