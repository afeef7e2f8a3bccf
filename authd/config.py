"""The configuration: frozen dataclasses, and a pure parser that reports every problem at once.

``parse(raw)`` never stops at the first problem: it walks the whole document, collects one
line per problem prefixed with its TOML path (``policies.wiki.audience: ...``), rejects
unknown keys, and raises :class:`ConfigError` with all of them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import types
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, TypeAlias, TypeVar, get_args, overload

from authd.errors import ConfigError

DEFAULT_PATH = Path("/etc/authd/authd.toml")
DEFAULT_LISTEN = "127.0.0.1:9180"
MAX_WORKERS = 64
MAX_NGINX_CACHE_SECONDS = 300
DEFAULT_TOKEN_SOURCES = ("header:Cf-Access-Jwt-Assertion", "cookie:CF_Authorization")

# Only asymmetric algorithms: an issuer publishes public keys, and accepting an HMAC
# algorithm would let anyone holding the public key sign tokens (RS256 -> HS256 confusion).
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"},
)
Provider: TypeAlias = Literal["cloudflare", "google-iap", "aws-alb", "oidc"]
PROVIDERS: tuple[Provider, ...] = get_args(Provider)

# What each provider's preset sets: where its tokens arrive, how they are signed.
PROVIDER_TOKEN_SOURCES: dict[Provider, tuple[str, ...]] = {
    "cloudflare": DEFAULT_TOKEN_SOURCES,  # the top-level token_sources, when given
    "google-iap": ("header:x-goog-iap-jwt-assertion",),
    "aws-alb": ("header:x-amzn-oidc-data",),
    "oidc": ("bearer",),
}
PROVIDER_ALGORITHMS: dict[Provider, tuple[str, ...]] = {
    "cloudflare": ("RS256",),
    "google-iap": ("ES256",),
    "aws-alb": ("ES256",),
    "oidc": ("RS256",),
}
PROVIDER_GROUPS_CLAIMS: dict[Provider, str] = {
    "cloudflare": "custom.groups",
    "google-iap": "groups",
    "aws-alb": "groups",
    "oidc": "groups",
}
GOOGLE_IAP_ISSUER = "https://cloud.google.com/iap"
GOOGLE_IAP_JWKS_URL = "https://www.gstatic.com/iap/verify/public_key-jwk"
ALB_KEYS_URL = "https://public-keys.auth.elb.{region}.amazonaws.com"
OIDC_DISCOVERY_PATH = "/.well-known/openid-configuration"
GET_IDENTITY_PATH = "/cdn-cgi/access/get-identity"
# Well below the nginx snippet's proxy_read_timeout (5 s), like the unknown-kid wait.
DEFAULT_GET_IDENTITY_TIMEOUT = 2.0
MAX_GET_IDENTITY_TIMEOUT = 4.0

# The identity headers authd always owns; a policy's ``headers`` may add others.
DEFAULT_HEADER_NAMES = (
    "X-Authd-User",
    "X-Authd-Email",
    "X-Authd-Sub",
    "X-Authd-Groups",
    "X-Authd-Country",
    "X-Authd-Service-Token",
    "X-Authd-Policy",
    "X-Authd-Issuer",
    "X-Authd-Posture",
)
RESERVED_HEADER_NAMES = frozenset(n.lower() for n in (*DEFAULT_HEADER_NAMES, "X-Authd-Reason"))

# Policy names appear in the URL (/auth/<policy>), issuer names in headers and metrics.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-[0-9]{1,2}")
_TEAM = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_CUSTOM_HEADER = re.compile(r"X-Authd-[A-Za-z0-9][A-Za-z0-9-]{0,63}", re.IGNORECASE)
_HTTP_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")

Scalar: TypeAlias = str | int | bool

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """Lower-case A-Z only. ``str.lower`` maps other characters onto ASCII too (the Kelvin
    sign U+212A becomes "k"), which would let a different address match an allow-list entry."""
    return text.translate(_ASCII_LOWER)


_D = TypeVar("_D")


def default_workers() -> int:
    """``workers = "auto"``: one per CPU this process may run on."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))


@dataclass(frozen=True, slots=True)
class Listen:
    """Where authd serves: a TCP host and port, or a unix socket path."""

    kind: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TokenSource:
    """One place a token may arrive: a request header, a cookie, or ``Authorization: Bearer``."""

    kind: Literal["header", "cookie", "bearer"]
    name: str = ""

    def __str__(self) -> str:
        return "bearer" if self.kind == "bearer" else f"{self.kind}:{self.name}"

    @property
    def key(self) -> str:
        """The same source, however it is spelled: header names are case-insensitive."""
        return str(self).lower() if self.kind == "header" else str(self)


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """One ``[[issuers]]`` entry, with its provider's preset filled in."""

    name: str
    issuer: str
    jwks_url: str | None
    jwks_file: Path | None
    provider: Provider = "cloudflare"
    discovery_url: str | None = None  # oidc: the jwks_uri is read from this document
    alb_keys_url: str | None = None  # aws-alb: one PEM public key per kid under this URL
    token_sources: tuple[TokenSource, ...] = ()  # where this issuer's tokens arrive
    algorithms: tuple[str, ...] = ("RS256",)
    groups_claim: str = "custom.groups"
    get_identity: bool = False  # cloudflare: enrich this issuer's tokens (policies may override)
    get_identity_url: str | None = None  # cloudflare: <team domain>/cdn-cgi/access/get-identity
    get_identity_timeout_seconds: float = DEFAULT_GET_IDENTITY_TIMEOUT
    # An email counts only with "email_verified": true: the default for oidc and aws-alb.
    # Cloudflare and Google vouch for the email themselves; a generic OpenID provider may let
    # anyone sign up with any address.
    require_email_verified: bool = False
    refresh_seconds: float = 3600
    refetch_cooldown_seconds: float = 60
    max_stale_seconds: float = 86400
    fetch_timeout_seconds: float = 10

    @property
    def key_source(self) -> str:
        """Where the keys come from, for logs and explanations."""
        for where in (self.jwks_url, self.jwks_file, self.discovery_url, self.alb_keys_url):
            if where is not None:
                return str(where)
        raise AssertionError("the parser gives every issuer a key source")

    def reads(self, source: TokenSource) -> bool:
        """Whether this issuer's tokens may arrive in ``source``."""
        return any(s.key == source.key for s in self.token_sources)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    name: str
    audience: tuple[str, ...]
    allow_emails: frozenset[str] = frozenset()  # lower-cased
    allow_email_domains: tuple[str, ...] = ()  # lower-cased; a leading dot admits subdomains
    allow_groups: frozenset[str] = frozenset()
    allow_service_tokens: frozenset[str] = frozenset()
    require_claims: tuple[tuple[str, tuple[Scalar, ...]], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()  # (header name, claim path)
    issuers: tuple[str, ...] = ()  # the names of the issuers it accepts; () accepts every one
    get_identity: bool | None = None  # enrichment for this policy; None: as its issuers say
    # What a failed get-identity ends in: "deny" (503 enrichment_unavailable) or "allow"
    # (without the enriched data); the parser resolves the default.
    on_enrichment_failure: Literal["deny", "allow"] = "allow"
    require_posture: tuple[str, ...] = ()  # device posture rules (id or name) that must pass
    require_idp_types: frozenset[str] = frozenset()  # get-identity idp.type: one of these
    require_amr: frozenset[str] = frozenset()  # get-identity amr: holds one of these
    identity_headers: tuple[tuple[str, str], ...] = ()  # (header name, get-identity field)
    posture_headers: tuple[tuple[str, str], ...] = ()  # (header name, posture rule id or name)

    @property
    def needs_identity(self) -> bool:
        """Rules that only get-identity's answer can satisfy."""
        return bool(self.require_posture or self.require_idp_types or self.require_amr)

    @property
    def all_headers(self) -> tuple[tuple[str, str], ...]:
        """Every custom header, whatever it is filled from."""
        return (*self.headers, *self.identity_headers, *self.posture_headers)

    @property
    def admits_any(self) -> bool:
        """A policy without any ``allow_*`` list admits every valid token for its audience."""
        return not (
            self.allow_emails
            or self.allow_email_domains
            or self.allow_groups
            or self.allow_service_tokens
        )


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """``[cache]``: authd's decision cache (see :mod:`authd.cache`)."""

    enabled: bool = True
    max_entries: int = 100_000
    max_megabytes: float = 256
    max_seconds: float = 300


@dataclass(frozen=True, slots=True)
class Config:
    listen: Listen = field(default_factory=lambda: _parse_listen_or_die(DEFAULT_LISTEN))
    workers: int = field(default_factory=default_workers)
    audit_file: Path | None = None  # decision lines go here instead of standard output
    leeway_seconds: float = 30
    cache: CacheSettings = CacheSettings()
    # How long nginx may reuse an allow (micro-cache mode, X-Accel-Expires); 0: never.
    nginx_cache_seconds: int = 0
    token_sources: tuple[TokenSource, ...] = ()
    issuers: tuple[IssuerConfig, ...] = ()
    policies: Mapping[str, PolicyConfig] = field(
        default_factory=lambda: types.MappingProxyType({}),
    )

    def accepted_issuers(self, policy: PolicyConfig) -> tuple[IssuerConfig, ...]:
        """The issuers whose tokens ``policy`` accepts (all of them unless it names some)."""
        if not policy.issuers:
            return self.issuers
        return tuple(i for i in self.issuers if i.name in policy.issuers)

    def token_sources_in_use(self) -> tuple[TokenSource, ...]:
        """Every place a token may arrive, over all issuers (the top-level list without any)."""
        found = {s.key: s for i in self.issuers for s in i.token_sources}
        return tuple(found.values()) or self.token_sources

    @property
    def configured(self) -> bool:
        """Whether authd can allow anything at all: an issuer and a policy exist."""
        return bool(self.issuers and self.policies)

    def warnings(self) -> list[str]:
        """Valid but probably not what the operator wants."""
        out = []
        if not self.issuers:
            out.append("issuers: none configured: every token is refused (401)")
        if not self.policies:
            out.append("policies: none configured: every request is refused (403 unknown_policy)")
        if self.nginx_cache_seconds:
            out.append(
                f"nginx_cache_seconds: nginx may answer a token's repeats from its own cache for "
                f"up to {self.nginx_cache_seconds} s (with authd-server-microcache.conf); those "
                "requests write no audit line in authd, only nginx's authd-access.log line",
            )
            # The shipped snippet keys on the default sources only (snippets.cache_key).
            if not {s.key for s in self.token_sources_in_use()} <= _DEFAULT_SOURCE_KEYS:
                out.append(
                    "nginx_cache_seconds: tokens may arrive in places the shipped "
                    "authd-server-microcache.conf does not key its cache on: use the one "
                    "`authd nginx-snippet --context server-microcache` renders, or nginx may "
                    "hand one user's allow to another",
                )
        for policy in self.policies.values():
            # For Cloudflare and IAP, a token for the audience has passed the proxy's own
            # access policy; for an OIDC client or an ALB it says only "signed in".
            open_to = [
                i.name
                for i in self.accepted_issuers(policy)
                if i.provider in {"oidc", "aws-alb"} and policy.admits_any
            ]
            if open_to:
                out.append(
                    f"policies.{policy.name}: no allow_* list, so every user who can sign in "
                    f"at the identity provider of {', '.join(open_to)} is let in (an OIDC or "
                    "ALB audience says only that they signed in); add allow_emails, "
                    "allow_email_domains or allow_groups, or restrict issuers",
                )
            if policy.all_headers:
                names = ", ".join(name for name, _ in policy.all_headers)
                out.append(
                    f"policies.{policy.name}: {names} reach the application only through "
                    "the rendered location snippet (`authd nginx-snippet`); with the shipped one, "
                    "nginx neither copies them nor removes a client's forged copy",
                )
        return out


_DEFAULT_SOURCE_KEYS = {"header:cf-access-jwt-assertion", "cookie:CF_Authorization"}
assert {s.lower() if s.startswith("header:") else s for s in DEFAULT_TOKEN_SOURCES} == (
    _DEFAULT_SOURCE_KEYS
)


def load(path: Path) -> Config:
    """Read and parse a TOML file; every problem is reported in one :class:`ConfigError`."""
    return read(path)[0]


def read(path: Path) -> tuple[Config, bytes]:
    """Like :func:`load`, and the bytes that were read: what a snapshot of it must hold."""
    try:
        data = path.read_bytes()
    except OSError as ex:
        raise ConfigError([f"{path}: cannot read: {ex.strerror}"]) from ex
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as ex:
        raise ConfigError([f"{path}: not UTF-8: {ex.reason} at byte {ex.start}"]) from ex
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as ex:
        raise ConfigError([f"{path}: invalid TOML: {ex}"]) from ex
    return parse(raw), data


def parse(raw: Mapping[str, object]) -> Config:
    """Build a :class:`Config` from a parsed TOML document, or raise with every problem."""
    problems: list[str] = []
    top = _Table(raw, "", problems)

    listen = _parse_listen(top.get_str("listen", DEFAULT_LISTEN), top.path("listen"), problems)
    workers = _parse_workers(top)
    audit_file = top.get_str("audit_file", None)
    if audit_file is not None and not Path(audit_file).is_absolute():
        problems.append("audit_file: must be an absolute path")
    leeway = top.get_number("leeway_seconds", 30, low=0, high=300)
    cache = _parse_cache(_Table(top.get_tables("cache"), "cache", problems))
    nginx_cache = top.get_int("nginx_cache_seconds", 0, low=0, high=MAX_NGINX_CACHE_SECONDS)
    sources = tuple(
        s
        for i, text in enumerate(
            top.get_str_list("token_sources", DEFAULT_TOKEN_SOURCES, allow_empty=False),
        )
        if (s := parse_token_source(text, f"token_sources[{i}]", problems)) is not None
    )
    if len({str(s).lower() for s in sources}) != len(sources):
        problems.append("token_sources: lists the same source twice")

    issuers = tuple(
        i
        for n, t in enumerate(top.get_table_list("issuers"))
        if (i := _parse_issuer(t, f"issuers[{n}]", sources, problems)) is not None
    )
    _unique([i.name for i in issuers], "issuers", "name", problems)
    _unique_per_source(issuers, problems)

    policies: dict[str, PolicyConfig] = {}
    for name, value in top.get_tables("policies").items():
        path = f"policies.{name}"
        if not _NAME.fullmatch(name):
            problems.append(
                f"{path}: policy names are 1-64 of A-Z a-z 0-9 _ . - (they appear in the URL "
                "/auth/<policy>), starting with a letter or digit",
            )
            continue
        policy = _parse_policy(_Table(value, path, problems), name, issuers)
        if policy is not None:
            policies[name] = policy

    top.reject_unknown()
    if problems:
        raise ConfigError(problems)
    return Config(
        listen=listen or _parse_listen_or_die(DEFAULT_LISTEN),
        workers=workers,
        audit_file=Path(audit_file) if audit_file is not None else None,
        leeway_seconds=leeway,
        cache=cache,
        nginx_cache_seconds=nginx_cache,
        token_sources=sources,
        issuers=issuers,
        policies=types.MappingProxyType(policies),
    )


def _parse_workers(top: _Table) -> int:
    value = top.raw.get("workers", "auto")
    if value == "auto":
        top.used.add("workers")
        return default_workers()
    if isinstance(value, bool) or not isinstance(value, int):
        top.used.add("workers")
        top.problems.append('workers: expected an integer or "auto"')
        return 1
    return top.get_int("workers", 1, low=1, high=MAX_WORKERS)


def _parse_cache(table: _Table) -> CacheSettings:
    d = CacheSettings()
    settings = CacheSettings(
        enabled=table.get_bool("enabled", d.enabled),
        max_entries=table.get_int("max_entries", d.max_entries, low=1, high=10_000_000),
        max_megabytes=table.get_number("max_megabytes", d.max_megabytes, low=1, high=65536),
        max_seconds=table.get_number("max_seconds", d.max_seconds, low=1, high=86400),
    )
    table.reject_unknown()
    return settings


def enriches(policy: PolicyConfig, issuer: IssuerConfig) -> bool:
    """Whether ``policy`` asks get-identity about tokens of ``issuer`` (Cloudflare only)."""
    return _enriches(policy.get_identity, issuer)


def _enriches(get_identity: bool | None, issuer: IssuerConfig) -> bool:
    if issuer.provider != "cloudflare":
        return False
    return issuer.get_identity if get_identity is None else get_identity


def _parse_issuer(
    table: _Table,
    path: str,
    default_sources: tuple[TokenSource, ...],
    problems: list[str],
) -> IssuerConfig | None:
    name = table.get_str("name", None)
    if name is not None and not _NAME.fullmatch(name):
        problems.append(f"{path}.name: 1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit")
    provider_text = table.get_str("provider", "cloudflare")
    provider: Provider = "cloudflare"
    if provider_text in PROVIDERS:
        provider = provider_text  # narrowed by the membership test
    else:
        problems.append(
            f"{path}.provider: unknown provider {provider_text!r}; known: {', '.join(PROVIDERS)}",
        )
    where = _IssuerWhere(table, path, provider)
    issuer = where.issuer()
    if issuer is not None and (problem := _issuer_problem(issuer, provider)) is not None:
        problems.append(f"{path}.issuer: {problem}")
    keys = where.keys(issuer)

    if "token_sources" in table.raw:
        texts = table.get_str_list("token_sources", (), allow_empty=False)
        token_sources = tuple(
            s
            for i, text in enumerate(texts)
            if (s := parse_token_source(text, f"{path}.token_sources[{i}]", problems)) is not None
        )
        if len({s.key for s in token_sources}) != len(token_sources):
            problems.append(f"{path}.token_sources: lists the same source twice")
    elif provider == "cloudflare":
        token_sources = default_sources
    else:
        token_sources = tuple(
            s
            for text in PROVIDER_TOKEN_SOURCES[provider]
            if (s := parse_token_source(text, f"{path}.token_sources", problems)) is not None
        )

    algorithms = table.get_str_list(
        "algorithms",
        PROVIDER_ALGORITHMS[provider],
        allow_empty=False,
    )
    for alg in algorithms:
        if alg.upper().startswith("HS"):
            problems.append(
                f"{path}.algorithms: {alg} is symmetric; an issuer's public key must never "
                "verify an HMAC (algorithm confusion)",
            )
        elif alg not in ASYMMETRIC_ALGORITHMS:
            problems.append(
                f"{path}.algorithms: unknown algorithm {alg!r}; "
                f"known: {', '.join(sorted(ASYMMETRIC_ALGORITHMS))}",
            )
    if provider == "aws-alb" and set(algorithms) - {"ES256"}:
        problems.append(f"{path}.algorithms: an ALB signs with ES256 only")
    groups_claim = table.get_str("groups_claim", PROVIDER_GROUPS_CLAIMS[provider])
    if not groups_claim:
        problems.append(f"{path}.groups_claim: must not be empty")
    get_identity, get_identity_url, get_identity_timeout = where.get_identity(issuer)
    require_email_verified = table.get_bool(
        "require_email_verified",
        default=provider in {"oidc", "aws-alb"},
    )
    refresh = table.get_number("refresh_seconds", 3600, low=60, high=7 * 86400)
    cooldown = table.get_number("refetch_cooldown_seconds", 60, low=1, high=86400)
    max_stale = table.get_number("max_stale_seconds", 86400, low=0, high=30 * 86400)
    timeout = table.get_number("fetch_timeout_seconds", 10, low=0.1, high=60)
    table.reject_unknown()
    if name is None:
        problems.append(f"{path}: needs name")
    if name is None or issuer is None or keys is None:
        return None
    jwks_url, jwks_file, discovery_url, alb_keys_url = keys
    return IssuerConfig(
        name=name,
        provider=provider,
        issuer=issuer,
        jwks_url=jwks_url,
        jwks_file=Path(jwks_file) if jwks_file is not None else None,
        discovery_url=discovery_url,
        alb_keys_url=alb_keys_url,
        token_sources=token_sources,
        algorithms=tuple(dict.fromkeys(algorithms)),
        groups_claim=groups_claim,
        get_identity=get_identity,
        get_identity_url=get_identity_url,
        get_identity_timeout_seconds=get_identity_timeout,
        require_email_verified=require_email_verified,
        refresh_seconds=refresh,
        refetch_cooldown_seconds=cooldown,
        max_stale_seconds=max_stale,
        fetch_timeout_seconds=timeout,
    )


class _IssuerWhere:
    """The parts of an issuer that its provider presets: the issuer URL, the key source
    and (Cloudflare) get-identity. A key that does not apply to the provider is a problem."""

    _ONLY: ClassVar[dict[str, tuple[Provider, ...]]] = {
        "team": ("cloudflare",),
        "get_identity": ("cloudflare",),
        "get_identity_url": ("cloudflare",),
        "get_identity_timeout_seconds": ("cloudflare",),
        "region": ("aws-alb",),
        "alb_keys_url": ("aws-alb",),
        "discovery_url": ("oidc",),
        "require_email_verified": ("oidc", "aws-alb"),
    }

    def __init__(self, table: _Table, path: str, provider: Provider) -> None:
        self.table, self.path, self.provider = table, path, provider
        self.problems = table.problems
        for key, only in self._ONLY.items():
            if key in table.raw and provider not in only:
                table.used.add(key)
                allowed = " or ".join(repr(p) for p in only)
                self.problems.append(f"{path}.{key}: only for provider = {allowed}")

    def issuer(self) -> str | None:
        table, path = self.table, self.path
        issuer = table.get_str("issuer", None)
        if self.provider == "google-iap":
            # The one issuer Google signs IAP tokens as; another one is for loopback stand-ins.
            return issuer or GOOGLE_IAP_ISSUER
        team = table.get_str("team", None) if self.provider == "cloudflare" else None
        if team is not None:
            if not _TEAM.fullmatch(team):
                self.problems.append(
                    f"{path}.team: the team name is the first label of <team>.cloudflareaccess.com",
                )
            if issuer is not None:
                self.problems.append(f"{path}: give either team or issuer, not both")
            return f"https://{team}.cloudflareaccess.com"
        if issuer is None:
            hint = " (or team)" if self.provider == "cloudflare" else ""
            self.problems.append(f"{path}: needs issuer{hint}")
        return issuer

    def keys(
        self,
        issuer: str | None,
    ) -> tuple[str | None, str | None, str | None, str | None] | None:
        """(jwks_url, jwks_file, discovery_url, alb_keys_url), exactly one set; None: a problem."""
        table, path = self.table, self.path
        jwks_url = table.get_str("jwks_url", None)
        jwks_file = table.get_str("jwks_file", None)
        given = jwks_url is not None or jwks_file is not None
        discovery = alb = None
        if self.provider == "aws-alb":
            if given:
                self.problems.append(
                    f"{path}: an ALB publishes one PEM key per kid, not a key set: give region "
                    "(or alb_keys_url), not jwks_url or jwks_file",
                )
                return None
            region = table.get_str("region", None)
            alb = table.get_str("alb_keys_url", None)
            if region is not None and not _REGION.fullmatch(region):
                self.problems.append(f"{path}.region: an AWS region such as eu-west-1")
            if (region is None) == (alb is None):
                self.problems.append(f"{path}: needs exactly one of region and alb_keys_url")
                return None
            if alb is None and region is not None:
                # The China regions' endpoints are under amazonaws.com.cn.
                cn = ".cn" if region.startswith("cn-") else ""
                alb = ALB_KEYS_URL.format(region=region) + cn
            assert alb is not None  # exactly one of the two, checked above
            alb = alb.rstrip("/")
            return self._checked(None, None, None, alb, "alb_keys_url")
        if jwks_url is None and jwks_file is None:
            team = self.provider == "cloudflare" and "team" in table.raw
            if team and issuer is not None:
                jwks_url = f"{issuer}/cdn-cgi/access/certs"
            elif self.provider == "google-iap":
                jwks_url = GOOGLE_IAP_JWKS_URL
            elif self.provider == "oidc" and issuer is not None:
                discovery = table.get_str("discovery_url", None)
                # OpenID Discovery 4: the issuer without a trailing "/", then the path.
                discovery = discovery or issuer.rstrip("/") + OIDC_DISCOVERY_PATH
                return self._checked(None, None, discovery, None, "discovery_url")
        elif self.provider == "oidc" and "discovery_url" in table.raw:
            table.used.add("discovery_url")
            self.problems.append(f"{path}: give discovery_url or a key set, not both")
        if (jwks_url is None) == (jwks_file is None):
            self.problems.append(f"{path}: needs exactly one of jwks_url and jwks_file")
            return None
        return self._checked(jwks_url, jwks_file, None, None, "jwks_url")

    def _checked(
        self,
        jwks_url: str | None,
        jwks_file: str | None,
        discovery: str | None,
        alb: str | None,
        key: str,
    ) -> tuple[str | None, str | None, str | None, str | None] | None:
        url = jwks_url or discovery or alb
        if url is not None and (problem := url_problem(url)) is not None:
            self.problems.append(f"{self.path}.{key}: {problem}")
            return None
        return jwks_url, jwks_file, discovery, alb

    def get_identity(self, issuer: str | None) -> tuple[bool, str | None, float]:
        table, path = self.table, self.path
        if self.provider != "cloudflare":
            return False, None, DEFAULT_GET_IDENTITY_TIMEOUT
        enabled = table.get_bool("get_identity", default=False)
        url = table.get_str("get_identity_url", None)
        if url is not None and (problem := url_problem(url)) is not None:
            self.problems.append(f"{path}.get_identity_url: {problem}")
        if url is None and issuer is not None:
            url = issuer + GET_IDENTITY_PATH  # on the team domain, as the issuer is
        seconds = table.get_number(
            "get_identity_timeout_seconds",
            DEFAULT_GET_IDENTITY_TIMEOUT,
            low=0.1,
            high=MAX_GET_IDENTITY_TIMEOUT,
        )
        return enabled, url, seconds


def _unique_per_source(issuers: tuple[IssuerConfig, ...], problems: list[str]) -> None:
    """Two issuers may share an ``iss`` (an ALB and the OIDC provider behind it) only when
    their tokens arrive in different places: the source and the ``iss`` choose the issuer."""
    for n, a in enumerate(issuers):
        for b in issuers[n + 1 :]:
            shared = [str(s) for s in a.token_sources if b.reads(s)]
            if a.issuer == b.issuer and shared:
                problems.append(
                    f"issuers: {a.name} and {b.name} both read {', '.join(shared)} with issuer "
                    f"{a.issuer!r}: a token there could not say which one it is for",
                )


def _parse_policy(  # noqa: PLR0915 -- one check per key, in the order of the docs
    table: _Table,
    name: str,
    issuers: tuple[IssuerConfig, ...],
) -> PolicyConfig | None:
    path, problems = table.prefix, table.problems
    audience = table.get_str_list("audience", None, allow_empty=False, allow_scalar=True)
    if audience is None:
        problems.append(
            f"{path}.audience: required: the AUD tag(s) of the Access application this "
            "policy protects (Zero Trust dashboard > Access > Applications > Overview); for "
            "Google IAP the backend's /projects/... audience, for OIDC the client id, for an "
            "AWS ALB its ARN",
        )
    emails = table.get_str_list("allow_emails", ())
    for e in emails:
        if e.count("@") != 1 or e.startswith("@") or e.endswith("@"):
            problems.append(f"{path}.allow_emails: {e!r} is not an email address")
    domains = table.get_str_list("allow_email_domains", ())
    for d in domains:
        if "@" in d or not d.strip(".") or d != d.strip() or ".." in d or d.endswith("."):
            problems.append(
                f"{path}.allow_email_domains: {d!r} is not a domain "
                "(write example.com, or .example.com to admit its subdomains too)",
            )
    groups = table.get_str_list("allow_groups", ())
    services = table.get_str_list("allow_service_tokens", ())
    require: list[tuple[str, tuple[Scalar, ...]]] = []
    for claim, allowed in table.get_tables_or_values("require_claims").items():
        values: list[object] = allowed if isinstance(allowed, list) else [allowed]
        scalars = [v for v in values if isinstance(v, str | int | bool)]
        if not values or len(scalars) != len(values):
            problems.append(
                f"{path}.require_claims.{_key(claim)}: a list of allowed values "
                "(strings, integers or booleans)",
            )
            continue
        if not claim:
            problems.append(f"{path}.require_claims: empty claim name")
            continue
        require.append((claim, tuple(scalars)))
    seen_headers: set[str] = set()
    headers = _parse_headers(
        table,
        "headers",
        seen_headers,
        'the claim to send, e.g. "custom.department"',
    )
    identity_headers = _parse_headers(
        table,
        "identity_headers",
        seen_headers,
        'the get-identity field to send, e.g. "idp.type"',
    )
    posture_headers = _parse_headers(
        table,
        "posture_headers",
        seen_headers,
        "the device posture rule (id or name) whose result to send as true or false",
    )

    known = {i.name: i for i in issuers}
    accepted_names = table.get_str_list("issuers", None, allow_empty=False)
    for issuer_name in accepted_names or ():
        if issuer_name not in known:
            problems.append(f"{path}.issuers: no issuer is named {issuer_name!r}")
    accepted = [known[n] for n in accepted_names or () if n in known] or list(issuers)
    get_identity = table.get_bool("get_identity", None)
    posture = table.get_str_list("require_posture", [])
    idp_types = table.get_str_list("require_idp_types", [])
    amr = table.get_str_list("require_amr", [])
    failure = table.get_str("on_enrichment_failure", None)
    if failure not in {None, "deny", "allow"}:
        problems.append(f'{path}.on_enrichment_failure: "deny" or "allow"')
        failure = None

    enriched = [i.name for i in accepted if _enriches(get_identity, i)]
    if get_identity and not any(i.provider == "cloudflare" for i in accepted):
        problems.append(
            f"{path}.get_identity: only Cloudflare issuers have get-identity, "
            "and this policy accepts none",
        )
    needs_identity = bool(posture or idp_types or amr)
    wants = [k for k in ("require_posture", "require_idp_types", "require_amr") if k in table.raw]
    wants += [k for k in ("identity_headers", "posture_headers") if table.raw.get(k)]
    if wants and not enriched and issuers:
        problems.append(
            f"{path}: {', '.join(wants)} need get-identity: set get_identity = true on this "
            "policy or on a Cloudflare issuer it accepts",
        )
    if failure is not None and not enriched and issuers:
        problems.append(f"{path}.on_enrichment_failure: the policy does not use get-identity")
    if failure == "allow" and needs_identity:
        problems.append(
            f'{path}.on_enrichment_failure: "allow" cannot apply to require_posture, '
            "require_idp_types or require_amr: only get-identity's answer can satisfy them",
        )
    # Fail closed by default where the rules need the answer: the require_* rules always,
    # allow_groups when it is matched against get-identity's groups.
    depends = needs_identity or bool(groups and enriched)
    table.reject_unknown()
    if audience is None:
        return None
    return PolicyConfig(
        name=name,
        audience=tuple(audience),
        allow_emails=frozenset(ascii_lower(e) for e in emails),
        allow_email_domains=tuple(ascii_lower(d) for d in domains),
        allow_groups=frozenset(groups),
        allow_service_tokens=frozenset(services),
        require_claims=tuple(require),
        headers=headers,
        issuers=tuple(dict.fromkeys(accepted_names or ())),
        get_identity=get_identity,
        on_enrichment_failure="deny" if failure == "deny" or (not failure and depends) else "allow",
        require_posture=tuple(dict.fromkeys(posture)),
        require_idp_types=frozenset(idp_types),
        require_amr=frozenset(amr),
        identity_headers=identity_headers,
        posture_headers=posture_headers,
    )


def _parse_headers(
    table: _Table,
    key: str,
    seen: set[str],
    what: str,
) -> tuple[tuple[str, str], ...]:
    """A ``{header = value}`` table of a policy; header names are unique across all of them."""
    out: list[tuple[str, str]] = []
    for header, value in table.get_tables_or_values(key).items():
        hpath = f"{table.prefix}.{key}.{_key(header)}"
        if not _CUSTOM_HEADER.fullmatch(header):
            table.problems.append(
                f"{hpath}: custom header names start with X-Authd- and use A-Z a-z 0-9 - "
                "(so the nginx snippet can overwrite them against spoofing)",
            )
        elif header.lower() in RESERVED_HEADER_NAMES:
            table.problems.append(f"{hpath}: {header} is one of authd's own headers")
        elif header.lower() in seen:
            table.problems.append(f"{hpath}: given twice (header names are case-insensitive)")
        if not isinstance(value, str) or not value:
            table.problems.append(f"{hpath}: the value is {what}")
            continue
        seen.add(header.lower())
        out.append((header, value))
    return tuple(out)


def _issuer_problem(issuer: str, provider: Provider) -> str | None:
    url = urllib.parse.urlsplit(issuer)
    loopback = url.scheme == "http" and _is_loopback(url.hostname or "")
    if not (url.scheme == "https" or loopback) or not url.hostname:
        return "must be an https:// URL, exactly as the token's iss claim says"
    # Some OpenID providers' issuers end with "/" (Auth0's do); theirs is compared as written,
    # as is an ALB's, which is its OpenID provider's.
    if issuer.endswith("/") and provider not in {"oidc", "aws-alb"}:
        return "must not end with '/': tokens carry the issuer without one, compared exactly"
    return None


def url_problem(jwks_url: str) -> str | None:
    """Why authd must not fetch from this URL (https, or plain http to loopback only)."""
    try:
        url = urllib.parse.urlsplit(jwks_url)
        host = url.hostname
        url.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as ex:
        return f"not a URL: {ex}"
    if not host or url.scheme not in {"https", "http"}:
        return "must be an https:// URL"
    if url.scheme == "http" and not _is_loopback(host):
        return "must be https (plain http is allowed only for loopback hosts)"
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_listen(text: str, path: str, problems: list[str]) -> Listen | None:
    if text.startswith("unix:"):
        sock = text.removeprefix("unix:")
        if not sock.startswith("/"):
            problems.append(f"{path}: unix socket path must be absolute: {text!r}")
            return None
        return Listen(kind="unix", path=sock)
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        problems.append(f"{path}: expected HOST:PORT or unix:/path/to.sock, got {text!r}")
        return None
    return Listen(kind="tcp", host=host, port=int(port))


def _parse_listen_or_die(text: str) -> Listen:
    listen = _parse_listen(text, "listen", [])
    assert listen is not None  # only called with the known-good default
    return listen


def parse_token_source(text: str, path: str, problems: list[str]) -> TokenSource | None:
    """``header:NAME``, ``cookie:NAME`` or ``bearer``; None (and a problem) for anything else."""
    if text.lower() == "bearer":
        return TokenSource(kind="bearer")
    kind, _, name = text.partition(":")
    if kind in {"header", "cookie"} and _HTTP_TOKEN.fullmatch(name):
        return TokenSource(kind=kind, name=name)  # type: ignore[arg-type]  # narrowed above
    problems.append(f"{path}: expected header:NAME, cookie:NAME or bearer, got {text!r}")
    return None


def _unique(values: list[str], path: str, key: str, problems: list[str]) -> None:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            problems.append(f"{path}: {key} {v!r} is used twice")
        seen.add(v)


def _key(k: str) -> str:
    """A TOML key as it would be written in a path."""
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else f'"{k}"'


class _Table:
    """Typed access to one TOML table that records problems instead of raising."""

    def __init__(self, raw: object, prefix: str, problems: list[str]) -> None:
        self.prefix = prefix
        self.problems = problems
        if not isinstance(raw, Mapping):
            problems.append(f"{prefix or '<top>'}: expected a table")
            raw = {}
        self.raw: Mapping[str, object] = raw
        self.used: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.prefix}.{_key(key)}" if self.prefix else _key(key)

    def _take(self, key: str) -> object:
        self.used.add(key)
        return self.raw.get(key)

    @overload
    def get_str(self, key: str, default: str) -> str: ...
    @overload
    def get_str(self, key: str, default: None) -> str | None: ...
    def get_str(self, key: str, default: str | None) -> str | None:
        value = self._take(key)
        if value is None:
            return default
        if not isinstance(value, str):
            self.problems.append(f"{self.path(key)}: expected a string")
            return default
        return value

    @overload
    def get_bool(self, key: str, default: bool) -> bool: ...
    @overload
    def get_bool(self, key: str, default: None) -> bool | None: ...
    def get_bool(self, key: str, default: bool | None) -> bool | None:
        value = self._take(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problems.append(f"{self.path(key)}: expected true or false")
            return default
        return value

    def get_int(self, key: str, default: int, *, low: int, high: int) -> int:
        value = self._take(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.problems.append(f"{self.path(key)}: expected an integer")
            return default
        if not low <= value <= high:
            self.problems.append(f"{self.path(key)}: must be between {low} and {high}")
            return default
        return value

    def get_number(self, key: str, default: float, *, low: float, high: float) -> float:
        value = self._take(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problems.append(f"{self.path(key)}: expected a number of seconds")
            return default
        if not low <= value <= high:
            self.problems.append(f"{self.path(key)}: must be between {low:g} and {high:g}")
            return default
        return value

    def get_str_list(
        self,
        key: str,
        default: _D,
        *,
        allow_empty: bool = True,
        allow_scalar: bool = False,
    ) -> list[str] | _D:
        value = self._take(key)
        if value is None:
            return default
        if allow_scalar and isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.problems.append(f"{self.path(key)}: expected a list of non-empty strings")
            return default
        if not value and not allow_empty:
            self.problems.append(f"{self.path(key)}: must not be empty")
            return default
        return value

    def get_table_list(self, key: str) -> list[_Table]:
        value = self._take(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.problems.append(f"{self.path(key)}: expected an array of tables ([[{key}]])")
            return []
        return [_Table(v, f"{self.path(key)}[{i}]", self.problems) for i, v in enumerate(value)]

    def get_tables(self, key: str) -> dict[str, object]:
        value = self._take(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.problems.append(f"{self.path(key)}: expected a table")
            return {}
        return dict(value)

    get_tables_or_values = get_tables

    def reject_unknown(self) -> None:
        for key in self.raw:
            if key not in self.used:
                self.problems.append(f"{self.path(key)}: unknown key")
