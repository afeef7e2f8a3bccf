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
from typing import Literal, TypeAlias, TypeVar, overload

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
PROVIDERS = frozenset({"cloudflare"})

# The identity headers authd always owns; a policy's ``headers`` may add others.
DEFAULT_HEADER_NAMES = (
    "X-Authd-User",
    "X-Authd-Email",
    "X-Authd-Sub",
    "X-Authd-Groups",
    "X-Authd-Country",
    "X-Authd-Service-Token",
    "X-Authd-Policy",
)
RESERVED_HEADER_NAMES = frozenset(n.lower() for n in (*DEFAULT_HEADER_NAMES, "X-Authd-Reason"))

_POLICY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ISSUER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
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


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    name: str
    issuer: str
    jwks_url: str | None
    jwks_file: Path | None
    provider: str = "cloudflare"
    algorithms: tuple[str, ...] = ("RS256",)
    groups_claim: str = "custom.groups"
    refresh_seconds: float = 3600
    refetch_cooldown_seconds: float = 60
    max_stale_seconds: float = 86400
    fetch_timeout_seconds: float = 10

    @property
    def key_source(self) -> str:
        """Where the keys come from, for logs and explanations."""
        return self.jwks_url if self.jwks_url is not None else str(self.jwks_file)


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
        for policy in self.policies.values():
            if policy.headers:
                names = ", ".join(name for name, _ in policy.headers)
                out.append(
                    f"policies.{policy.name}.headers: {names} reach the application only through "
                    "the rendered location snippet (`authd nginx-snippet`); with the shipped one, "
                    "nginx neither copies them nor removes a client's forged copy",
                )
        return out


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
        if (s := _parse_token_source(text, f"token_sources[{i}]", problems)) is not None
    )
    if len({str(s).lower() for s in sources}) != len(sources):
        problems.append("token_sources: lists the same source twice")

    issuers = tuple(
        i
        for n, t in enumerate(top.get_table_list("issuers"))
        if (i := _parse_issuer(t, f"issuers[{n}]", problems)) is not None
    )
    _unique([i.name for i in issuers], "issuers", "name", problems)
    _unique([i.issuer for i in issuers], "issuers", "issuer", problems)

    policies: dict[str, PolicyConfig] = {}
    for name, value in top.get_tables("policies").items():
        path = f"policies.{name}"
        if not _POLICY_NAME.fullmatch(name):
            problems.append(
                f"{path}: policy names are 1-64 of A-Z a-z 0-9 _ . - (they appear in the URL "
                "/auth/<policy>), starting with a letter or digit",
            )
            continue
        policy = _parse_policy(_Table(value, path, problems), name)
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


def _parse_issuer(table: _Table, path: str, problems: list[str]) -> IssuerConfig | None:
    name = table.get_str("name", None)
    if name is not None and not _ISSUER_NAME.fullmatch(name):
        problems.append(f"{path}.name: 1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit")
    provider = table.get_str("provider", "cloudflare")
    if provider not in PROVIDERS:
        problems.append(f"{path}.provider: unknown provider {provider!r}; known: cloudflare")
    team = table.get_str("team", None)
    issuer = table.get_str("issuer", None)
    jwks_url = table.get_str("jwks_url", None)
    jwks_file = table.get_str("jwks_file", None)
    if team is not None:
        if not _TEAM.fullmatch(team):
            problems.append(
                f"{path}.team: the team name is the first label of <team>.cloudflareaccess.com",
            )
        if issuer is not None:
            problems.append(f"{path}: give either team or issuer, not both")
        issuer = f"https://{team}.cloudflareaccess.com"
        if jwks_url is None and jwks_file is None:
            jwks_url = f"{issuer}/cdn-cgi/access/certs"
    if issuer is None:
        problems.append(f"{path}: needs issuer (or team)")
    elif (problem := _issuer_problem(issuer)) is not None:
        problems.append(f"{path}.issuer: {problem}")
    if (jwks_url is None) == (jwks_file is None):
        problems.append(f"{path}: needs exactly one of jwks_url and jwks_file")
    if jwks_url is not None and (problem := _jwks_url_problem(jwks_url)) is not None:
        problems.append(f"{path}.jwks_url: {problem}")
    algorithms = table.get_str_list("algorithms", ("RS256",), allow_empty=False)
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
    groups_claim = table.get_str("groups_claim", "custom.groups")
    if not groups_claim:
        problems.append(f"{path}.groups_claim: must not be empty")
    refresh = table.get_number("refresh_seconds", 3600, low=60, high=7 * 86400)
    cooldown = table.get_number("refetch_cooldown_seconds", 60, low=1, high=86400)
    max_stale = table.get_number("max_stale_seconds", 86400, low=0, high=30 * 86400)
    timeout = table.get_number("fetch_timeout_seconds", 10, low=0.1, high=60)
    table.reject_unknown()
    if name is None:
        problems.append(f"{path}: needs name")
    if name is None or issuer is None:
        return None
    return IssuerConfig(
        name=name,
        provider=provider,
        issuer=issuer,
        jwks_url=jwks_url,
        jwks_file=Path(jwks_file) if jwks_file is not None else None,
        algorithms=tuple(dict.fromkeys(algorithms)),
        groups_claim=groups_claim,
        refresh_seconds=refresh,
        refetch_cooldown_seconds=cooldown,
        max_stale_seconds=max_stale,
        fetch_timeout_seconds=timeout,
    )


def _parse_policy(table: _Table, name: str) -> PolicyConfig | None:
    path, problems = table.prefix, table.problems
    audience = table.get_str_list("audience", None, allow_empty=False, allow_scalar=True)
    if audience is None:
        problems.append(
            f"{path}.audience: required: the AUD tag(s) of the Access application this "
            "policy protects (Zero Trust dashboard > Access > Applications > Overview)",
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
    headers: list[tuple[str, str]] = []
    seen_headers: set[str] = set()
    for header, value in table.get_tables_or_values("headers").items():
        hpath = f"{path}.headers.{_key(header)}"
        if not _CUSTOM_HEADER.fullmatch(header):
            problems.append(
                f"{hpath}: custom header names start with X-Authd- and use A-Z a-z 0-9 - "
                "(so the nginx snippet can overwrite them against spoofing)",
            )
        elif header.lower() in RESERVED_HEADER_NAMES:
            problems.append(f"{hpath}: {header} is one of authd's own headers")
        elif header.lower() in seen_headers:
            problems.append(f"{hpath}: given twice (header names are case-insensitive)")
        if not isinstance(value, str) or not value:
            problems.append(f'{hpath}: the value is the claim to send, e.g. "custom.department"')
            continue
        seen_headers.add(header.lower())
        headers.append((header, value))
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
        headers=tuple(headers),
    )


def _issuer_problem(issuer: str) -> str | None:
    url = urllib.parse.urlsplit(issuer)
    if url.scheme != "https" or not url.hostname:
        return "must be an https:// URL, exactly as the token's iss claim says"
    if issuer.endswith("/"):
        return "must not end with '/': tokens carry the issuer without one, compared exactly"
    return None


def _jwks_url_problem(jwks_url: str) -> str | None:
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


def _parse_token_source(text: str, path: str, problems: list[str]) -> TokenSource | None:
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

    def get_bool(self, key: str, default: bool) -> bool:
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
