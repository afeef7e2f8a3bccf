from pathlib import Path

import pytest

from authd import snippets
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
    assert "keepalive 16;" in snippets.render("http", Config())


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
