from pathlib import Path

import pytest

from authd import cli, snippets
from authd.config import Config, parse

SHIPPED = Path(__file__).resolve().parents[2] / "nginx"
AUD = "a" * 64


@pytest.mark.parametrize("context", snippets.CONTEXTS)
def test_shipped_snippets_are_the_rendering_of_the_defaults(context):
    shipped = (SHIPPED / snippets.file_name(context)).read_text()
    assert shipped == snippets.render(context, Config()), (
        f"nginx/{snippets.file_name(context)} is out of date: regenerate it with "
        f"`authd nginx-snippet --context {context}` (see Makefile: make snippets)"
    )


def custom() -> Config:
    return parse(
        {
            "listen": "unix:/run/authd/authd.sock",
            "issuers": [{"name": "cf", "team": "t"}],
            "policies": {
                "a": {"audience": [AUD], "headers": {"X-Authd-Department": "custom.department"}},
                "b": {
                    "audience": [AUD],
                    "headers": {"x-authd-department": "d", "X-Authd-Tier": "t"},
                },
            },
        },
    )


def test_location_snippet_copies_and_overwrites_every_identity_header():
    text = snippets.render("location", custom())
    for header, var in [
        ("X-Authd-Email", "authd_email"),
        ("X-Authd-Service-Token", "authd_service_token"),
        ("X-Authd-Department", "authd_department"),
        ("X-Authd-Tier", "authd_tier"),
    ]:
        upstream = "$upstream_http_" + header.lower().replace("-", "_")
        assert f"auth_request_set ${var} {upstream};" in text
        assert f"proxy_set_header {header} ${var};" in text
    assert text.count("X-Authd-Department $") == 1  # case-insensitive duplicates merge
    assert "proxy_set_header Cf-Access-Authenticated-User-Email $authd_email;" in text
    # The policy header comes from nginx's own variable, not authd's answer.
    assert "auth_request_set $authd_policy" not in text
    assert "proxy_set_header X-Authd-Policy $authd_policy;" in text
    assert text.count("auth_request /_authd;") == 1


@pytest.mark.parametrize(
    ("context", "directive"),
    [("location-fastcgi", "fastcgi_param"), ("location-uwsgi", "uwsgi_param")],
)
def test_cgi_variants_use_http_params(context, directive):
    text = snippets.render(context, custom())
    assert f"{directive} HTTP_X_AUTHD_EMAIL $authd_email;" in text
    assert f"{directive} HTTP_X_AUTHD_TIER $authd_tier;" in text
    assert f"{directive} HTTP_CF_ACCESS_AUTHENTICATED_USER_EMAIL $authd_email;" in text
    assert "proxy_set_header" not in text.split("auth_request /_authd;")[1]


def test_http_snippet_points_at_the_listen_address():
    assert "server unix:/run/authd/authd.sock;" in snippets.render("http", custom())
    assert "server 127.0.0.1:9180;" in snippets.render("http", Config())
    assert "keepalive 64;" in snippets.render("http", Config())


def test_server_snippet_is_internal_bodiless_and_fails_closed_quickly():
    text = snippets.render("server", Config())
    for line in [
        "location = /_authd {",
        "internal;",
        "proxy_pass http://authd/auth/$authd_policy;",
        "proxy_pass_request_body off;",
        'proxy_set_header Content-Length "";',
        "proxy_set_header X-Original-URI $request_uri;",
        'proxy_set_header Connection "";',
        "proxy_read_timeout 5s;",
    ]:
        assert line in text
    # An operator's proxy_cache at the http or server level must not reach the auth answers.
    assert "proxy_cache off;" in text


def test_micro_cache_keys_on_the_policy_and_every_token_source_whole():
    cfg = parse(
        {
            "nginx_cache_seconds": 20,
            "token_sources": ["header:X-Goog-Iap-Jwt-Assertion", "cookie:session", "bearer"],
        }
    )
    text = snippets.render("server-microcache", cfg)
    key = "$authd_policy|$http_x_goog_iap_jwt_assertion|$http_cookie|$http_authorization"
    assert f'proxy_cache_key "{key}";' in text
    assert "proxy_cache off;" not in text
    for line in [
        "proxy_cache authd_microcache;",
        "proxy_ignore_headers Cache-Control Expires Set-Cookie Vary;",
        "proxy_no_cache $upstream_http_x_authd_reason;",
        "proxy_cache_use_stale off;",
    ]:
        assert line in text
    # The rest of the auth location is the plain one's.
    plain = snippets.render("server", cfg)
    assert (
        text.split("proxy_read_timeout 5s;")[0].split("{", 1)[1]
        == plain.split("proxy_read_timeout 5s;")[0].split("{", 1)[1]
    )


def test_micro_cache_http_snippet_keeps_the_cache_private_and_logs_every_request():
    text = snippets.render("http-microcache", parse({"nginx_cache_seconds": 20}))
    assert "proxy_cache_path /run/nginx-authd-cache levels=1:2 keys_zone=authd_microcache" in text
    assert "nginx_cache_seconds = 20" in text
    assert "access_log /var/log/nginx/authd-access.log authd if=$authd_policy;" in text
    log_format = text.split("log_format", 1)[1].split(";", 1)[0]
    assert "$uri" in log_format
    assert "$request" not in log_format.replace("$request_method", "").replace("$request_id", "")
    assert "authd lets nginx cache nothing" in snippets.render("http-microcache", Config())


def test_every_snippet_into_a_directory(tmp_path):
    config = tmp_path / "authd.toml"
    config.write_text('listen = "unix:/run/authd/authd.sock"\n')
    assert cli.main(["nginx-snippet", "--config", str(config), "--directory", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.glob("authd-*.conf"))
    assert written == sorted(snippets.file_name(c) for c in snippets.CONTEXTS)
    assert "server unix:/run/authd/authd.sock;" in (tmp_path / "authd-http.conf").read_text()
