import os
import textwrap
from pathlib import Path

import pytest

from authd import config
from authd.errors import ConfigError

AUD = "a" * 64


def parse_problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as ex:
        config.parse(raw)
    return ex.value.problems


def minimal(**top: object) -> dict:
    return {
        "issuers": [{"name": "cf", "team": "myteam"}],
        "policies": {"wiki": {"audience": [AUD]}},
    } | top


def test_minimal_config_gets_documented_defaults():
    cfg = config.parse(minimal())
    assert str(cfg.listen) == "127.0.0.1:9180"
    assert cfg.leeway_seconds == 30
    assert [str(s) for s in cfg.token_sources] == [
        "header:Cf-Access-Jwt-Assertion",
        "cookie:CF_Authorization",
    ]
    (issuer,) = cfg.issuers
    assert issuer.issuer == "https://myteam.cloudflareaccess.com"
    assert issuer.jwks_url == "https://myteam.cloudflareaccess.com/cdn-cgi/access/certs"
    assert issuer.algorithms == ("RS256",)
    assert issuer.groups_claim == "custom.groups"
    assert (issuer.refresh_seconds, issuer.refetch_cooldown_seconds) == (3600, 60)
    assert (issuer.max_stale_seconds, issuer.fetch_timeout_seconds) == (86400, 10)
    assert cfg.policies["wiki"].audience == (AUD,)
    assert cfg.policies["wiki"].admits_any
    assert (cfg.workers, cfg.audit_file) == (len(os.sched_getaffinity(0)), None)
    assert cfg.cache == config.CacheSettings(
        enabled=True, max_entries=100_000, max_megabytes=256, max_seconds=300
    )
    assert cfg.nginx_cache_seconds == 0
    assert cfg.configured


def test_workers_and_audit_file():
    cfg = config.parse(minimal(workers=4, audit_file="/var/log/authd/audit.log"))
    assert (cfg.workers, str(cfg.audit_file)) == (4, "/var/log/authd/audit.log")
    assert parse_problems(minimal(workers=0)) == ["workers: must be between 1 and 64"]
    assert config.parse(minimal(workers="auto")).workers == len(os.sched_getaffinity(0))
    for wrong in (2.5, True, "4", "all"):
        assert parse_problems(minimal(workers=wrong)) == ['workers: expected an integer or "auto"']
    assert parse_problems(minimal(audit_file="audit.log")) == [
        "audit_file: must be an absolute path",
    ]


def test_cache_settings():
    cfg = config.parse(
        minimal(
            nginx_cache_seconds=30,
            cache={"enabled": False, "max_entries": 10, "max_megabytes": 2, "max_seconds": 60},
        )
    )
    assert cfg.cache == config.CacheSettings(
        enabled=False, max_entries=10, max_megabytes=2, max_seconds=60
    )
    assert cfg.nginx_cache_seconds == 30
    assert any(w.startswith("nginx_cache_seconds: nginx may answer") for w in cfg.warnings())
    assert parse_problems(
        minimal(
            nginx_cache_seconds=301,
            cache={"enabled": "yes", "max_entries": 0, "max_seconds": 0, "size": 1},
        )
    ) == [
        "cache.enabled: expected true or false",
        "cache.max_entries: must be between 1 and 10000000",
        "cache.max_seconds: must be between 1 and 86400",
        "cache.size: unknown key",
        "nginx_cache_seconds: must be between 0 and 300",
    ]
    assert parse_problems(minimal(cache=5)) == ["cache: expected a table"]


def test_every_problem_is_reported_at_once_with_its_path():
    raw = {
        "listen": "nowhere",
        "leeway_seconds": "30",
        "colour": "blue",
        "issuers": [{"name": "cf", "issuer": "http://x.example", "jwks_url": "http://x.example/c"}],
        "policies": {
            "wiki": {"allow_emails": ["not-an-email"], "surprise": 1},
            "bad name!": {"audience": [AUD]},
        },
    }
    problems = parse_problems(raw)
    joined = "\n".join(problems)
    for expected in (
        "listen: expected HOST:PORT",
        "leeway_seconds: expected a number",
        "colour: unknown key",
        "issuers[0].issuer: must be an https:// URL",
        "issuers[0].jwks_url: must be https",
        "policies.wiki.audience: required",
        "policies.wiki.allow_emails: 'not-an-email' is not an email address",
        "policies.wiki.surprise: unknown key",
        "policies.bad name!: policy names",
    ):
        assert expected in joined, f"missing {expected!r} in:\n{joined}"
    assert len(problems) == 9


@pytest.mark.parametrize(
    ("issuer", "message"),
    [
        ({"name": "cf"}, "issuers[0]: needs issuer (or team)"),
        ({"name": "cf", "team": "t", "issuer": "https://t.cloudflareaccess.com"}, "not both"),
        ({"name": "cf", "team": "bad team"}, "issuers[0].team"),
        ({"name": "cf", "team": "t", "jwks_file": "/k", "jwks_url": "https://t/c"}, "exactly one"),
        ({"name": "cf", "issuer": "https://t.example"}, "exactly one of jwks_url and jwks_file"),
        ({"name": "cf", "team": "t", "algorithms": ["HS256"]}, "symmetric"),
        ({"name": "cf", "team": "t", "algorithms": ["none"]}, "unknown algorithm 'none'"),
        ({"name": "cf", "team": "t", "algorithms": []}, "algorithms: must not be empty"),
        ({"name": "cf", "team": "t", "provider": "okta"}, "unknown provider"),
        (
            {"name": "cf", "issuer": "https://t.example/", "jwks_file": "/k"},
            "must not end with '/'",
        ),
        ({"name": "cf", "team": "t", "refresh_seconds": 5}, "between 60 and"),
        ({"name": "cf", "team": "t", "refetch_cooldown_seconds": 0}, "between 1 and"),
        ({"name": "cf", "team": "t", "fetch_timeout_seconds": True}, "expected a number"),
        ({"name": "cf", "team": "t", "jwks_url": "ftp://x/c"}, "must be an https:// URL"),
        ({"name": "cf", "team": "t", "jwks_url": "http://10.0.0.1/c"}, "only for loopback"),
        ({"team": "t"}, "issuers[0]: needs name"),
        ({"name": "-x", "team": "t"}, "issuers[0].name"),
    ],
)
def test_issuer_problems(issuer, message):
    problems = parse_problems(minimal(issuers=[issuer]))
    assert any(message in p for p in problems), problems


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/c", "http://localhost/c", "http://[::1]/c"])
def test_plain_http_key_url_is_allowed_for_loopback_only(url):
    cfg = config.parse(minimal(issuers=[{"name": "cf", "team": "t", "jwks_url": url}]))
    assert cfg.issuers[0].jwks_url == url


def test_issuer_names_and_urls_must_be_unique():
    twice = [{"name": "a", "team": "t"}, {"name": "a", "team": "t"}]
    problems = parse_problems(minimal(issuers=twice))
    assert "issuers: name 'a' is used twice" in problems
    assert any("a and a both read header:Cf-Access-Jwt-Assertion" in p for p in problems)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"audience": []}, "audience: must not be empty"),
        ({"audience": [""]}, "audience: expected a list of non-empty strings"),
        ({"audience": [AUD], "allow_email_domains": ["@example.com"]}, "is not a domain"),
        ({"audience": [AUD], "allow_email_domains": ["example..com"]}, "is not a domain"),
        ({"audience": [AUD], "allow_groups": "sre"}, "allow_groups: expected a list"),
        ({"audience": [AUD], "require_claims": {"country": []}}, "require_claims.country"),
        ({"audience": [AUD], "require_claims": {"x": [1.5]}}, "require_claims.x"),
        ({"audience": [AUD], "require_claims": ["country"]}, "require_claims: expected a table"),
        ({"audience": [AUD], "headers": {"X-Department": "custom.d"}}, "start with X-Authd-"),
        ({"audience": [AUD], "headers": {"X-Authd-Email": "custom.d"}}, "authd's own headers"),
        ({"audience": [AUD], "headers": {"X-Authd-Bad Name": "c"}}, "start with X-Authd-"),
        ({"audience": [AUD], "headers": {"X-Authd-Dept": 5}}, "the value is the claim"),
        (
            {"audience": [AUD], "headers": {"X-Authd-Dept": "a", "x-authd-dept": "b"}},
            "given twice",
        ),
    ],
)
def test_policy_problems(policy, message):
    problems = parse_problems(minimal(policies={"wiki": policy}))
    assert any(message in p and p.startswith("policies.wiki") for p in problems), problems


def test_policy_values_are_normalised():
    cfg = config.parse(
        minimal(
            policies={
                "wiki": {
                    "audience": AUD,  # a single string is accepted as a one-element list
                    "allow_emails": ["Alice@Example.COM"],
                    "allow_email_domains": [".Example.com"],
                    "require_claims": {"country": "DE", "custom.level": [3, True]},
                    "headers": {"X-Authd-Department": "custom.department"},
                },
            },
        ),
    )
    wiki = cfg.policies["wiki"]
    assert wiki.audience == (AUD,)
    assert wiki.allow_emails == frozenset({"alice@example.com"})
    assert wiki.allow_email_domains == (".example.com",)
    assert wiki.require_claims == (("country", ("DE",)), ("custom.level", (3, True)))
    assert wiki.headers == (("X-Authd-Department", "custom.department"),)
    assert not wiki.admits_any


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/run/authd/authd.sock", "unix:/run/authd/authd.sock"),
        ("0.0.0.0:80", "0.0.0.0:80"),
        ("[::1]:9180", "[::1]:9180"),
    ],
)
def test_listen_forms(text, expected):
    assert str(config.parse(minimal(listen=text)).listen) == expected


@pytest.mark.parametrize("text", ["unix:relative.sock", "host", "host:0", "host:99999", ":80"])
def test_bad_listen(text):
    assert any(p.startswith("listen:") for p in parse_problems(minimal(listen=text)))


def test_token_sources():
    cfg = config.parse(minimal(token_sources=["bearer", "cookie:session", "header:X-Token"]))
    assert [str(s) for s in cfg.token_sources] == ["bearer", "cookie:session", "header:X-Token"]
    problems = parse_problems(minimal(token_sources=["query:token", "header:", "bearer", "bearer"]))
    assert "token_sources[0]: expected header:NAME, cookie:NAME or bearer, got 'query:token'" in (
        problems
    )
    assert any(p.startswith("token_sources[1]") for p in problems)
    assert "token_sources: lists the same source twice" in problems
    assert parse_problems(minimal(token_sources=[])) == ["token_sources: must not be empty"]


def test_empty_configuration_is_valid_but_warns():
    cfg = config.parse({})
    assert cfg.issuers == ()
    assert not cfg.configured
    assert len(cfg.warnings()) == 2


def test_load_reports_toml_syntax_and_missing_files(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text("listen = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        config.load(broken)


def test_load_reads_the_documented_example(tmp_path):
    path = tmp_path / "authd.toml"
    path.write_text(
        textwrap.dedent(f"""\
        listen = "127.0.0.1:9180"
        leeway_seconds = 30
        token_sources = ["header:Cf-Access-Jwt-Assertion", "cookie:CF_Authorization"]

        [[issuers]]
        name = "cloudflare"
        provider = "cloudflare"
        issuer = "https://myteam.cloudflareaccess.com"
        jwks_url = "https://myteam.cloudflareaccess.com/cdn-cgi/access/certs"
        algorithms = ["RS256"]
        groups_claim = "custom.groups"
        refresh_seconds = 3600
        refetch_cooldown_seconds = 60
        max_stale_seconds = 86400
        fetch_timeout_seconds = 10

        [policies.wiki]
        audience = ["{AUD}"]
        allow_emails = ["alice@example.com"]
        allow_email_domains = ["example.com"]
        allow_groups = ["sre"]
        allow_service_tokens = ["e367826f93b8d71185e03fe518aff3b4.access"]
        require_claims = {{ "country" = ["DE", "NL"], "custom.department" = ["ops"] }}
        headers = {{ "X-Authd-Department" = "custom.department" }}
        """),
    )
    cfg = config.load(path)
    assert cfg.policies["wiki"].allow_groups == frozenset({"sre"})
    warning = (
        "policies.wiki: X-Authd-Department reach the application only through the "
        "rendered location snippet (`authd nginx-snippet`); with the shipped one, nginx neither "
        "copies them nor removes a client's forged copy"
    )
    assert cfg.warnings() == [warning]


def test_the_shipped_example_is_valid():
    example = Path(__file__).resolve().parents[2] / "examples" / "authd.toml"
    cfg = config.load(example)
    assert cfg.issuers[0].issuer == "https://myteam.cloudflareaccess.com"
    assert cfg.warnings() == []


# --- providers and issuers per policy (issue 6) ------------------------------------------------

ALB_ARN = "arn:aws:elasticloadbalancing:eu-west-1:1:loadbalancer/app/wiki/1"


def test_each_provider_reads_its_own_token_source_and_cloudflare_the_top_level_list():
    cfg = config.parse(
        minimal(
            token_sources=["header:X-Token"],
            issuers=[
                {"name": "cf", "team": "t"},
                {"name": "iap", "provider": "google-iap"},
                {
                    "name": "alb",
                    "provider": "aws-alb",
                    "region": "us-east-1",
                    "issuer": "https://i",
                },
                {"name": "okta", "provider": "oidc", "issuer": "https://o.example"},
                {
                    "name": "pomerium",
                    "provider": "oidc",
                    "issuer": "https://p.example",
                    "token_sources": ["header:X-Pomerium-Jwt-Assertion"],
                    "jwks_url": "https://p.example/.well-known/pomerium/jwks.json",
                },
            ],
        ),
    )
    sources = {i.name: [str(s) for s in i.token_sources] for i in cfg.issuers}
    assert sources == {
        "cf": ["header:X-Token"],
        "iap": ["header:x-goog-iap-jwt-assertion"],
        "alb": ["header:x-amzn-oidc-data"],
        "okta": ["bearer"],
        "pomerium": ["header:X-Pomerium-Jwt-Assertion"],
    }
    pomerium = cfg.issuers[-1]
    assert (pomerium.discovery_url, pomerium.key_source) == (
        None,
        "https://p.example/.well-known/pomerium/jwks.json",
    )
    assert [str(s) for s in cfg.token_sources_in_use()] == [
        "header:X-Token",
        "header:x-goog-iap-jwt-assertion",
        "header:x-amzn-oidc-data",
        "bearer",
        "header:X-Pomerium-Jwt-Assertion",
    ]


@pytest.mark.parametrize(
    ("issuer", "message"),
    [
        ({"provider": "aws-alb", "issuer": "https://i"}, "needs exactly one of region and"),
        ({"provider": "aws-alb", "issuer": "https://i", "region": "Mars"}, "an AWS region"),
        (
            {
                "provider": "aws-alb",
                "issuer": "https://i",
                "region": "eu-west-1",
                "jwks_url": "https://k",
            },
            "not a key set",
        ),
        (
            {
                "provider": "aws-alb",
                "issuer": "https://i",
                "region": "eu-west-1",
                "algorithms": ["ES384"],
            },
            "ES256 only",
        ),
        ({"provider": "aws-alb", "region": "eu-west-1"}, "needs issuer"),
        (
            {"provider": "aws-alb", "issuer": "https://i", "alb_keys_url": "http://10.1.1.1"},
            "only for loopback",
        ),
        ({"provider": "oidc"}, "needs issuer"),
        ({"provider": "oidc", "issuer": "https://o", "discovery_url": "ftp://o/x"}, "https"),
        (
            {
                "provider": "oidc",
                "issuer": "https://o",
                "discovery_url": "https://o/d",
                "jwks_url": "https://o/k",
            },
            "not both",
        ),
        ({"provider": "google-iap", "team": "t"}, "team: only for provider = 'cloudflare'"),
        ({"provider": "oidc", "issuer": "https://o", "get_identity": True}, "only for provider"),
        ({"provider": "cloudflare", "team": "t", "region": "eu-west-1"}, "only for provider"),
        ({"team": "t", "get_identity_url": "http://10.0.0.1/x"}, "only for loopback"),
        ({"team": "t", "get_identity_timeout_seconds": 30}, "between 0.1 and 4"),
        ({"team": "t", "token_sources": []}, "must not be empty"),
        ({"team": "t", "token_sources": ["query:t"]}, "expected header:NAME"),
        ({"provider": "google-iap", "token_sources": ["bearer", "BEARER"]}, "same source twice"),
    ],
)
def test_provider_problems(issuer, message):
    problems = parse_problems(minimal(issuers=[{"name": "x", **issuer}]))
    assert any(message in p for p in problems), problems


def test_an_oidc_issuer_may_end_with_a_slash_and_keeps_it():
    auth0 = {"name": "auth0", "provider": "oidc", "issuer": "https://acme.eu.auth0.com/"}
    (issuer,) = config.parse(minimal(issuers=[auth0])).issuers
    assert issuer.issuer == "https://acme.eu.auth0.com/"  # compared exactly with iss
    assert issuer.discovery_url == "https://acme.eu.auth0.com/.well-known/openid-configuration"


def test_plain_http_issuers_are_for_loopback_stand_ins_only():
    ok = {"name": "o", "provider": "oidc", "issuer": "http://127.0.0.1:8080"}
    cfg = config.parse(minimal(issuers=[ok]))
    assert cfg.issuers[0].discovery_url == "http://127.0.0.1:8080/.well-known/openid-configuration"
    bad = {"name": "o", "provider": "oidc", "issuer": "http://idp.example"}
    assert any("must be an https:// URL" in p for p in parse_problems(minimal(issuers=[bad])))


def policy_problems(**policy: object) -> list[str]:
    issuers = [
        {"name": "cf", "team": "t"},
        {"name": "iap", "provider": "google-iap"},
    ]
    return parse_problems(
        minimal(issuers=issuers, policies={"wiki": {"audience": [AUD], **policy}})
    )


def enriched_policy(**policy: object) -> config.PolicyConfig:
    issuers = [{"name": "cf", "team": "t"}, {"name": "iap", "provider": "google-iap"}]
    cfg = config.parse(minimal(issuers=issuers, policies={"wiki": {"audience": [AUD], **policy}}))
    return cfg.policies["wiki"]


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"issuers": ["nope"]}, "policies.wiki.issuers: no issuer is named 'nope'"),
        ({"issuers": ["iap"], "get_identity": True}, "only Cloudflare issuers have get-identity"),
        ({"require_posture": ["disk"]}, "require_posture need get-identity"),
        ({"require_amr": ["mfa"], "issuers": ["iap"]}, "require_amr need get-identity"),
        (
            {"posture_headers": {"X-Authd-Disk": "disk"}, "get_identity": False},
            "posture_headers need get-identity",
        ),
        (
            {"require_posture": ["disk"], "get_identity": True, "on_enrichment_failure": "allow"},
            '"allow" cannot apply',
        ),
        ({"get_identity": True, "on_enrichment_failure": "maybe"}, '"deny" or "allow"'),
        ({"get_identity": "yes"}, "expected true or false"),
        (
            {
                "headers": {"X-Authd-Dept": "dept"},
                "identity_headers": {"x-authd-dept": "name"},
                "get_identity": True,
            },
            "given twice",
        ),
        ({"identity_headers": {"X-Authd-Groups": "groups"}, "get_identity": True}, "authd's own"),
        ({"posture_headers": {"Cf-Access-Disk-Encrypted": "d"}, "get_identity": True}, "X-Authd-"),
    ],
)
def test_policy_enrichment_problems(policy, message):
    problems = policy_problems(**policy)
    assert any(message in p for p in problems), problems


def test_enrichment_failure_defaults_to_deny_only_where_the_rules_depend_on_it():
    assert enriched_policy(get_identity=True).on_enrichment_failure == "allow"
    assert enriched_policy(get_identity=True, allow_groups=["eng"]).on_enrichment_failure == "deny"
    assert enriched_policy(allow_groups=["eng"]).on_enrichment_failure == "allow"  # not enriched
    posture = enriched_policy(get_identity=True, require_posture=["disk"])
    assert (posture.on_enrichment_failure, posture.needs_identity) == ("deny", True)
    chosen = enriched_policy(get_identity=True, allow_groups=["eng"], on_enrichment_failure="allow")
    assert chosen.on_enrichment_failure == "allow"


def test_enrichment_is_per_issuer_and_a_policy_may_override_it():
    issuers = [
        {"name": "cf", "team": "t", "get_identity": True},
        {"name": "cf2", "team": "u"},
        {"name": "iap", "provider": "google-iap"},
    ]
    policies = {
        "default": {"audience": [AUD]},
        "off": {"audience": [AUD], "get_identity": False},
        "on": {"audience": [AUD], "get_identity": True, "issuers": ["cf2", "iap"]},
    }
    cfg = config.parse(minimal(issuers=issuers, policies=policies))
    table = {
        name: [i.name for i in cfg.accepted_issuers(p) if config.enriches(p, i)]
        for name, p in cfg.policies.items()
    }
    assert table == {"default": ["cf"], "off": [], "on": ["cf2"]}
    assert [i.name for i in cfg.accepted_issuers(cfg.policies["on"])] == ["cf2", "iap"]


def test_micro_cache_mode_warns_when_tokens_arrive_where_the_shipped_snippet_does_not_look():
    plain = config.parse(minimal(nginx_cache_seconds=30))
    assert not any("does not key its cache on" in w for w in plain.warnings())
    iap = minimal(nginx_cache_seconds=30)
    iap["issuers"] = [*iap["issuers"], {"name": "iap", "provider": "google-iap"}]
    warnings = config.parse(iap).warnings()
    assert any("authd-server-microcache.conf does not key its cache on" in w for w in warnings)
    custom = config.parse(minimal(nginx_cache_seconds=30, token_sources=["bearer"]))
    assert any("does not key its cache on" in w for w in custom.warnings())


def test_every_kind_of_custom_header_needs_the_rendered_snippet():
    cfg = config.parse(
        minimal(
            issuers=[{"name": "cf", "team": "t", "get_identity": True}],
            policies={
                "wiki": {
                    "audience": [AUD],
                    "identity_headers": {"X-Authd-Idp": "idp.type"},
                    "posture_headers": {"X-Authd-Disk-Encrypted": "disk"},
                },
            },
        ),
    )
    (warning,) = cfg.warnings()
    assert warning.startswith("policies.wiki: X-Authd-Idp, X-Authd-Disk-Encrypted reach the")


def test_a_policy_open_to_anyone_who_signs_in_at_an_oidc_or_alb_provider_is_warned_about():
    issuers = [
        {"name": "cf", "team": "t"},
        {"name": "google", "provider": "oidc", "issuer": "https://accounts.google.com"},
    ]
    policies = {
        "open": {"audience": [AUD]},
        "cf-only": {"audience": [AUD], "issuers": ["cf"]},
        "listed": {"audience": [AUD], "allow_email_domains": ["example.com"]},
    }
    warnings = config.parse(minimal(issuers=issuers, policies=policies)).warnings()
    assert [w.split(":")[0] for w in warnings] == ["policies.open"]
    assert "every user who can sign in at the identity provider of google" in warnings[0]


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"issuers": []}, "policies.wiki.issuers: must not be empty"),
        ({"on_enrichment_failure": "deny"}, "the policy does not use get-identity"),
    ],
)
def test_policy_settings_that_would_be_silently_ignored_are_problems(policy, message):
    problems = parse_problems(minimal(policies={"wiki": {"audience": [AUD], **policy}}))
    assert any(message in p for p in problems), problems


def test_alb_issuers_may_end_with_a_slash_and_china_regions_have_their_own_key_endpoint():
    alb = {
        "name": "alb",
        "provider": "aws-alb",
        "issuer": "https://t.auth0.com/",
        "region": "cn-north-1",
    }
    (issuer,) = config.parse(minimal(issuers=[alb])).issuers
    assert issuer.issuer == "https://t.auth0.com/"
    assert issuer.alb_keys_url == "https://public-keys.auth.elb.cn-north-1.amazonaws.com.cn"


def test_micro_cache_mode_does_not_warn_for_a_subset_of_the_default_sources():
    cfg = config.parse(
        minimal(nginx_cache_seconds=30, token_sources=["header:Cf-Access-Jwt-Assertion"]),
    )
    assert not any("does not key its cache on" in w for w in cfg.warnings())
