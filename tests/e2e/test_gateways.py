"""FastCGI and uwsgi applications behind the shipped gateway snippets.

A PHP or Python application reads identity from `HTTP_X_AUTHD_*` params, so a header the client
sends under that name (or one that maps to the same param) must never arrive there.
"""

from __future__ import annotations

import pytest

from devtools.stack import NGINX_SNIPPETS, FastCGIApp, UwsgiApp

pytestmark = pytest.mark.e2e

FORGED = "mallory@evil.example"
GATEWAYS = ["/php/", "/py/"]


@pytest.fixture(scope="module")
def fastcgi_app():
    with FastCGIApp() as app:
        yield app


@pytest.fixture(scope="module")
def uwsgi_app():
    with UwsgiApp() as app:
        yield app


@pytest.fixture(scope="module")
def extra_locations(fastcgi_app, uwsgi_app):
    # As an operator writes them: Debian's parameter files, then the authd snippet.
    php = f"""
location /php/ {{
    set $authd_policy wiki;
    include /etc/nginx/fastcgi_params;
    include {NGINX_SNIPPETS / "authd-location-fastcgi.conf"};
    fastcgi_pass 127.0.0.1:{fastcgi_app.port};
}}
"""
    py = f"""
location /py/ {{
    set $authd_policy wiki;
    include /etc/nginx/uwsgi_params;
    include {NGINX_SNIPPETS / "authd-location-uwsgi.conf"};
    uwsgi_pass 127.0.0.1:{uwsgi_app.port};
}}
"""
    return lambda _upstream_url: [php, py]


@pytest.fixture(scope="module")
def app_for(fastcgi_app, uwsgi_app):
    apps = {"/php/": fastcgi_app, "/py/": uwsgi_app}

    def received(location, path):
        requests = apps[location].requests_for(path)
        assert len(requests) <= 1
        return requests[0] if requests else None

    return received


@pytest.mark.parametrize("location", GATEWAYS)
def test_an_allowed_user_reaches_the_application_with_their_identity(
    visit, app_for, make_token, location
):
    seen = visit(location, token=make_token(email="alice@example.com"))

    received = app_for(location, seen.path)
    assert seen.status == 200
    assert received is not None
    assert received.values("x-authd-email") == ["alice@example.com"]
    assert received.values("x-authd-user") == ["alice@example.com"]
    assert received.values("x-authd-policy") == ["wiki"]
    assert received.values("cf-access-authenticated-user-email") == ["alice@example.com"]


@pytest.mark.parametrize("location", GATEWAYS)
def test_no_token_never_reaches_the_application(visit, app_for, location):
    seen = visit(location)

    assert seen.status == 401
    assert app_for(location, seen.path) is None
    assert seen.audit["reason"] == "no_token"


@pytest.mark.parametrize("location", GATEWAYS)
def test_forged_identity_headers_never_reach_the_application(visit, app_for, make_token, location):
    forged = [
        ("X-Authd-Email", FORGED),
        ("X-Authd-User", FORGED),
        ("X_Authd_Email", FORGED),  # maps to the same HTTP_X_AUTHD_EMAIL param
        ("Cf-Access-Authenticated-User-Email", FORGED),
        ("Cf_Access_Authenticated_User_Email", FORGED),
    ]

    seen = visit(location, token=make_token(email="alice@example.com"), headers=forged)

    received = app_for(location, seen.path)
    assert seen.status == 200
    assert received is not None
    assert [(k, v) for k, v in received.headers if FORGED in v] == []
    assert received.values("x-authd-email") == ["alice@example.com"]


@pytest.mark.parametrize("location", GATEWAYS)
def test_an_identity_param_authd_leaves_empty_is_not_filled_by_the_client(
    visit, app_for, make_token, location
):
    # A user's token has no service token id: authd sends none, and neither may the client.
    forged = [("X-Authd-Service-Token", FORGED), ("X_Authd_Service_Token", FORGED)]

    seen = visit(location, token=make_token(email="alice@example.com"), headers=forged)

    received = app_for(location, seen.path)
    assert seen.status == 200
    assert received is not None
    assert received.values("x-authd-service-token") in ([], [""])
