"""The nginx snippets, rendered from the configuration.

The files shipped in ``nginx/`` are this module's output for the default
configuration (a test keeps them equal); ``authd nginx-snippet`` renders the
same text for the operator's configuration, custom identity headers included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypeAlias, get_args

from authd.config import DEFAULT_HEADER_NAMES, DEFAULT_TOKEN_SOURCES, Config, TokenSource

if TYPE_CHECKING:
    from authd.config import Listen

Context: TypeAlias = Literal[
    "http",
    "server",
    "location",
    "location-fastcgi",
    "location-uwsgi",
    "http-microcache",
    "server-microcache",
]
CONTEXTS: tuple[Context, ...] = get_args(Context)
AUTH_LOCATION = "/_authd"
POLICY_VARIABLE = "authd_policy"  # set by the operator in each protected location
UPSTREAM = "authd"
# Cloudflare's unsigned convenience header: anyone reaching the origin can set it, so
# the protected location overwrites it with the verified email.
CLOUDFLARE_EMAIL_HEADER = "Cf-Access-Authenticated-User-Email"
# Micro-cache mode: nginx keeps allows here. /run is a tmpfs on Debian and RHEL; nginx
# creates the directory itself, mode 0700, owned by its worker user.
MICROCACHE_PATH = "/run/nginx-authd-cache"
MICROCACHE_ZONE = "authd_microcache"
ACCESS_LOG_FORMAT = "authd"
MICROCACHE_LOG = "/var/log/nginx/authd-access.log"


def file_name(context: Context) -> str:
    return f"authd-{context}.conf"


def render(context: Context, config: Config) -> str:
    if context == "http":
        return render_http(config.listen)
    if context == "server":
        return render_server()
    if context == "http-microcache":
        return render_http_microcache(config)
    if context == "server-microcache":
        return render_server(microcache=config)
    return render_location(header_names(config), context)


def header_names(config: Config) -> list[str]:
    """authd's own identity headers, then every custom header of every policy."""
    names = {n.lower(): n for n in DEFAULT_HEADER_NAMES}
    for policy in config.policies.values():
        for name, _ in policy.all_headers:
            names.setdefault(name.lower(), name)
    return list(names.values())


def variable(header: str) -> str:
    """The nginx variable that carries an identity header: X-Authd-Email -> authd_email."""
    return "authd_" + header[len("X-Authd-") :].lower().replace("-", "_")


def render_http(listen: Listen) -> str:
    server = f"unix:{listen.path}" if listen.kind == "unix" else str(listen)
    return f"""\
# authd, http context: the upstream that the auth subrequests go to.
# Include once, inside http {{ }}, e.g. from /etc/nginx/conf.d/.
# Rendered for listen = "{listen}" by `authd nginx-snippet --context http`.
upstream {UPSTREAM} {{
    server {server};
    # Reuse connections: an auth subrequest per request must not cost a connect. The idle
    # connections kept per nginx worker: as many as auth subrequests may be in flight at once
    # (with 16, 32 busy clients made every other subrequest a new connection: 20% slower).
    keepalive 64;
    # nginx closes an idle connection before authd would (authd keeps them 75 s).
    keepalive_timeout 60s;
}}
"""


def render_server(microcache: Config | None = None) -> str:
    """The internal auth location; with ``microcache``, nginx may reuse allows (see README)."""
    if microcache is None:
        intro = "the internal location that asks authd for a decision."
        caching = """\
    # Never cache an auth answer, even if proxy_cache is set at the http or server level:
    # its default key does not hold the token.
    proxy_cache off;"""
    else:
        intro = """the internal location that asks authd for a decision,
# in micro-cache mode: nginx reuses an allow for as long as authd's X-Accel-Expires says
# (never past the token's exp, at most nginx_cache_seconds), and never a denial. Use it
# instead of authd-server.conf, with authd-http-microcache.conf in the http context and
# nginx_cache_seconds set in authd.toml."""
        caching = f"""\
    # The key is the policy and every place a token may come from, whole: an entry is
    # found only by presenting the same token for the same policy.
    proxy_cache {MICROCACHE_ZONE};
    proxy_cache_key "{cache_key(microcache)}";
    # Only authd's X-Accel-Expires decides (Cache-Control: no-store would come after it,
    # which Debian 12's nginx 1.22 reads as "do not cache"); X-Accel-Expires: 0 on every
    # denial, and a reason code, keep those out of the cache twice over.
    proxy_ignore_headers Cache-Control Expires Set-Cookie Vary;
    proxy_no_cache $upstream_http_x_authd_reason;
    proxy_cache_use_stale off;
    proxy_cache_revalidate off;
    proxy_cache_background_update off;"""
    return f"""\
# authd, server context: {intro}
# Include once in every server {{ }} that has a protected location.
location = {AUTH_LOCATION} {{
    internal;
    # $authd_policy is set in the protected location (see authd-location.conf).
    proxy_pass http://{UPSTREAM}/auth/${POLICY_VARIABLE};

    # The decision never depends on the body: do not send it.
    proxy_pass_request_body off;
    proxy_set_header Content-Length "";

    # Facts about the original request, for the audit log only.
    proxy_set_header Host $host;
    proxy_set_header X-Original-URI $request_uri;
    proxy_set_header X-Original-Method $request_method;
    proxy_set_header X-Real-IP $remote_addr;
    proxy_set_header X-Request-ID $request_id;

    # Keepalive to authd (with the upstream's keepalive in authd-http.conf).
    proxy_http_version 1.1;
    proxy_set_header Connection "";

    # A hung or absent authd fails closed: nginx answers 500, never lets the request in.
    proxy_connect_timeout 2s;
    proxy_send_timeout 5s;
    proxy_read_timeout 5s;

{caching}
}}
"""


def cache_key(config: Config) -> str:
    """The micro-cache key: the policy, then the whole value of every issuer's token source."""
    parts = [f"${POLICY_VARIABLE}"]
    for source in config.token_sources_in_use() or _default_sources():
        if source.kind == "cookie":
            parts.append("$http_cookie")  # every cookie: the same name may come twice
        elif source.kind == "bearer":
            parts.append("$http_authorization")
        else:
            parts.append("$http_" + source.name.lower().replace("-", "_"))
    return "|".join(dict.fromkeys(parts))


def _default_sources() -> tuple[TokenSource, ...]:
    return tuple(
        TokenSource(kind=kind, name=name)  # type: ignore[arg-type]  # from the known defaults
        for kind, name in (text.split(":", 1) for text in DEFAULT_TOKEN_SOURCES)
    )


def render_http_microcache(config: Config) -> str:
    seconds = config.nginx_cache_seconds
    state = (
        f"nginx_cache_seconds = {seconds} in this configuration"
        if seconds
        else "nginx_cache_seconds is 0 in this configuration: authd lets nginx cache nothing"
    )
    return f"""\
# authd, http context, micro-cache mode: where nginx keeps the allows it may reuse, and the
# access log format that records who each request was let in as. Include once inside
# http {{ }}, beside authd-http.conf; use authd-server-microcache.conf instead of
# authd-server.conf. authd says how long an allow may be reused ({state}).
#
# The cache files hold the cache key, which holds the token, and authd's identity headers:
# the directory is on a tmpfs (/run), created by nginx, mode 0700, for its worker user only.
proxy_cache_path {MICROCACHE_PATH} levels=1:2 keys_zone={MICROCACHE_ZONE}:10m max_size=64m
                 inactive=10m use_temp_path=off;

# A request answered from the cache writes no audit line in authd: this log is its record,
# one JSON line per request to a protected location, with who it was let in as ($authd_cache
# is HIT when nginx reused an allow). No $request or $request_uri: a token may be in the URL.
# It applies to every server that has no access_log of its own; a server that has one needs
# this line too.
log_format {ACCESS_LOG_FORMAT} escape=json '{{"time":"$time_iso8601","client_ip":"$remote_addr",'
    '"method":"$request_method","uri":"$uri","status":$status,"policy":"$authd_policy",'
    '"user":"$authd_user","cache":"$authd_cache","request_id":"$request_id"}}';
access_log {MICROCACHE_LOG} {ACCESS_LOG_FORMAT} if=$authd_policy;
"""


def render_location(names: list[str], context: Context) -> str:
    flavour = context.removeprefix("location").removeprefix("-") or "proxy"
    lines = [
        f"auth_request_set ${variable(n)} $upstream_http_{n.lower().replace('-', '_')};"
        for n in names
        # X-Authd-Policy is the location's own $authd_policy: nginx has it already.
        if variable(n) != POLICY_VARIABLE
    ]
    # HIT when the answer came from nginx's micro-cache (empty without it): for the access log.
    lines.append("auth_request_set $authd_cache $upstream_cache_status;")
    if flavour == "proxy":
        sets = [f"proxy_set_header {n} ${variable(n)};" for n in names]
        sets.append(f"proxy_set_header {CLOUDFLARE_EMAIL_HEADER} $authd_email;")
    else:
        directive = f"{flavour}_param"
        sets = [f"{directive} {_cgi_name(n)} ${variable(n)};" for n in names]
        sets.append(f"{directive} {_cgi_name(CLOUDFLARE_EMAIL_HEADER)} $authd_email;")
    upstream = {"proxy": "proxy_pass", "fastcgi": "fastcgi_pass", "uwsgi": "uwsgi_pass"}[flavour]
    sets_doc = {
        "proxy": """\
# proxy_set_header is inherited from the server or http level only by a location that
# declares none of its own, and this snippet declares its own: repeat any of those
# (Host, X-Forwarded-For, ...) inside the protected location. Your own proxy_set_header
# lines beside this include are fine.""",
        "fastcgi": """\
# A fastcgi_param named HTTP_* replaces the client's header of that name, so the
# application never sees a client-sent X-Authd-* value. fastcgi_param, like
# proxy_set_header, is inherited only by a location that declares none of its own:
# include fastcgi_params (or your usual params) in the location too.""",
        "uwsgi": """\
# A uwsgi_param named HTTP_* replaces the client's header of that name, so the
# application never sees a client-sent X-Authd-* value. uwsgi_param, like
# proxy_set_header, is inherited only by a location that declares none of its own:
# include uwsgi_params in the location too.""",
    }[flavour]
    return f"""\
# authd, location context: protect this location ({upstream} upstreams).
# After authd-http.conf and authd-server.conf are included, two lines protect a location:
#
#     location /wiki/ {{
#         set ${POLICY_VARIABLE} wiki;    # the [policies.wiki] table of authd.toml
#         include {file_name(context)};
#         {upstream} ...;
#     }}
#
# Every identity header is set from authd's answer, overwriting whatever the client
# sent (a header authd leaves out is removed). {CLOUDFLARE_EMAIL_HEADER}, which
# Cloudflare does not sign, is overwritten with the verified email.
{sets_doc}
# Rendered by `authd nginx-snippet --context {context}`; a configuration with custom
# headers in a policy needs its own rendering.
auth_request {AUTH_LOCATION};
{chr(10).join(lines)}
{chr(10).join(sets)}
"""


def _cgi_name(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")
