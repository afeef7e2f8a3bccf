"""The command line, and the composition root: it builds the parts and owns the socket."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import stat
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

import structlog

from authd import __version__, audit, config, dev, logs, snippets, systemd
from authd.decision import Authorizer, Decision
from authd.errors import ConfigError, Denied, Reason
from authd.fetch import make_http_client
from authd.headers import Found
from authd.keys import KeyStore, SystemClock
from authd.verify import decode_json_segment, split

if TYPE_CHECKING:
    from authd.config import Config, Listen, TokenSource

EXIT_ALLOW, EXIT_DENY, EXIT_CANNOT_DECIDE = 0, 1, 2
EXIT_CONFIG = 2
LISTEN_BACKLOG = 2048

log = structlog.get_logger("authd")

_MAIN_HELP = """\
authd verifies the signed JWTs that identity-aware proxies (Cloudflare Access,
Google IAP, an AWS ALB, any OpenID Connect provider) forward to the origin, for
nginx's auth_request: 200 with identity headers, 401 without a valid token, 403
when the location's policy refuses the user. For Cloudflare it can also ask
get-identity for the full group list and device posture, and decide on those.

commands:
  serve          run the daemon
  reload         validate the configuration, then make a running authd reload it
  check-config   validate the configuration, listing every problem
  logs           show and follow the audit log (journald or audit_file)
  verify         explain what authd would answer for a token and a policy
  nginx-snippet  print the nginx snippets for this configuration
  dev            keys and tokens for local testing (keygen, mint)

files:
  /etc/authd/authd.toml   the configuration (or --config PATH, or $AUTHD_CONFIG)

Run 'authd COMMAND --help' for a command's options.
"""

_CONFIG_HELP = "configuration file (default: $AUTHD_CONFIG, else /etc/authd/authd.toml)"


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_CONFIG
    return int(args.func(args, env))


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="authd", description=_MAIN_HELP, formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"authd {__version__}")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    s = sub.add_parser(
        "serve",
        help="run the daemon",
        formatter_class=fmt,
        description=textwrap.dedent("""\
            Run the daemon: answer nginx's auth subrequests on the configured listen
            address (listen = "127.0.0.1:9180" or "unix:/run/authd/authd.sock"; a unix
            socket is created with mode 0660). Under systemd socket activation
            (authd.socket), authd serves the socket systemd passes and ignores listen.

            At startup authd fetches every issuer's keys once (each bounded by its
            fetch_timeout_seconds) and then refreshes them in the background. If a key
            endpoint is down, authd still starts: /readyz answers 503 and requests with
            a token get 503 (nginx: 500) until the keys arrive; it retries by itself.
            Until the configuration has an issuer and a policy, authd runs, says it is
            not configured, and denies every request.

            workers = N runs N serving processes on the one socket under a supervisor
            (default "auto": one per CPU; 1 serves in this process). Keys, cooldowns and
            the decision cache are per process: "one refetch per cooldown" holds per
            worker. /metrics adds up all workers.

            Policies that enrich ask the issuer's get-identity endpoint for the user's
            full identity (groups, device posture, identity provider), once per session
            and at most every [cache] max_seconds; when it cannot answer, a policy that
            depends on it gets 503 enrichment_unavailable (nginx: 500), others are
            allowed without the enriched headers.

            Every allow is kept in a decision cache ([cache]) and served again, audited,
            while the token is valid, at most max_seconds, until the issuer's keys change
            or a reload. With nginx_cache_seconds > 0, nginx may reuse allows itself
            (micro-cache mode, see `authd nginx-snippet --help`).

            Output: one JSON line per decision (event "decision") and per other event
            (startup, key fetches, errors) on standard output; decision lines go to
            audit_file instead when that is set.

            signals:
              SIGHUP    reload: validate the configuration file; if it is valid, switch
                        every worker to it (keys kept and refreshed, no connection
                        dropped); if not, log every problem (event "reload_failed")
                        and keep serving the old one. Reopens audit_file either way.
              SIGUSR1   reopen audit_file (logrotate), nothing else
              SIGTERM   stop: finish requests in flight (at most 10 s), close idle
              SIGINT    keepalive connections at once, exit

            systemd: Type=notify. READY=1 once the first key fetches have finished
            (success or not), with STATUS= saying whether keys are loaded; RELOADING=1
            and READY=1 around a reload; STOPPING=1; WATCHDOG=1 when WatchdogSec is set."""),
        epilog=textwrap.dedent("""\
            exit status: 0 after a clean shutdown (a single process re-raises the
            stop signal, as uvicorn does: 143 after SIGTERM), 1 when workers keep
            dying, 2 for an invalid configuration or a socket it cannot use."""),
    )
    s.add_argument("--config", type=Path, help=_CONFIG_HELP)
    s.set_defaults(func=_serve)

    r = sub.add_parser(
        "reload",
        help="validate the configuration, then tell a running authd to reload",
        formatter_class=fmt,
        description=textwrap.dedent("""\
            Validate the configuration file like check-config; if it is valid, send
            SIGHUP to the authd with process id PID, which then switches to it. If it
            is not, print every problem and signal nothing: the running authd keeps its
            configuration. The unit's ExecReload runs this, so 'systemctl reload authd'
            fails, with the problems in the journal, when the new file is broken."""),
        epilog="exit status: 0 signalled, 1 no such process (or not allowed), 2 invalid "
        "configuration.",
    )
    r.add_argument("--config", type=Path, help=_CONFIG_HELP)
    r.add_argument("--pid", type=int, required=True, help="the running authd (systemd: $MAINPID)")
    r.set_defaults(func=_reload)

    lg = sub.add_parser("logs", help=logs.HELP, formatter_class=fmt, description=logs.DESCRIPTION)
    logs.add_arguments(lg)
    lg.set_defaults(func=lambda args, _env: logs.run(args))

    c = sub.add_parser(
        "check-config",
        help="validate the configuration",
        formatter_class=fmt,
        description=textwrap.dedent("""\
            Validate the configuration without starting anything. Every problem is
            printed, one per line, prefixed with its TOML path, e.g.
              policies.wiki.audience: required: the AUD tag(s) of the Access application
            Unknown keys are errors. Warnings (valid, but probably unintended) are
            printed with a "warning:" prefix and do not fail the check."""),
        epilog="exit status: 0 valid, 2 invalid or unreadable.",
    )
    c.add_argument("--config", type=Path, help=_CONFIG_HELP)
    c.set_defaults(func=_check_config)

    v = sub.add_parser(
        "verify",
        help="explain the decision for a token",
        formatter_class=fmt,
        description=textwrap.dedent("""\
            Explain what authd would answer for TOKEN under policy NAME, using the
            configured issuers and their keys (fetched once, now): the decision, the
            status, the reason code and its detail; which issuer was chosen for the
            token and why; the rule that admitted or refused it; what get-identity
            answered (fresh, or why it failed) when the policy enriches; the verified
            claims; and the exact identity headers nginx would receive. When the token
            is refused, its unverified header and payload are shown, marked as such,
            to help find out why.

            The issuer is chosen by where the token arrived and by its iss. With
            --source, say where that was (as in token_sources: header:NAME,
            cookie:NAME or bearer); without it, any place one of the policy's issuers
            reads.

            TOKEN is read from standard input when it is "-" or absent; copy it from
            the browser's CF_Authorization cookie or the Cf-Access-Jwt-Assertion
            header (x-goog-iap-jwt-assertion for Google IAP, x-amzn-oidc-data for an
            AWS ALB)."""),
        epilog=textwrap.dedent("""\
            exit status: 0 allow, 1 deny (401/403), 2 cannot decide (keys unavailable,
            an error) or a usage/configuration error.

            example:
              authd verify --policy wiki "$(authd dev mint --key dev/private.pem)"
        """),
    )
    v.add_argument("--config", type=Path, help=_CONFIG_HELP)
    v.add_argument("--policy", required=True, metavar="NAME", help="a [policies.NAME] table")
    v.add_argument(
        "--source",
        metavar="SOURCE",
        help="where the token arrived: header:NAME, cookie:NAME or bearer (default: anywhere)",
    )
    v.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    v.add_argument("token", nargs="?", default="-", metavar="TOKEN", help="the token, or -")
    v.set_defaults(func=_verify)

    n = sub.add_parser(
        "nginx-snippet",
        help="print the nginx snippets",
        formatter_class=fmt,
        description=textwrap.dedent("""\
            Print an nginx snippet for this configuration:
              http              the upstream block pointing at authd's listen address
              server            the internal /_authd location (once per server)
              location          for a protected location with proxy_pass (default)
              location-fastcgi  the same for fastcgi_pass (PHP-FPM)
              location-uwsgi    the same for uwsgi_pass
              http-microcache   micro-cache mode: nginx's cache of allows, and an
                                access log of who each request was let in as
              server-microcache micro-cache mode: /_authd, reusing allows for as
                                long as authd says (use instead of server)
            The location snippets copy and overwrite authd's default identity headers
            and every header that a policy's headers, identity_headers or
            posture_headers add. The micro-cache key holds every issuer's token
            sources. Without a configuration file at the default path, the defaults
            are used.

            Micro-cache mode (nginx_cache_seconds > 0 in authd.toml) lets nginx answer
            repeated requests of a token without asking authd; such a request writes
            no audit line in authd, only the access log line. See the README."""),
    )
    n.add_argument("--config", type=Path, help=_CONFIG_HELP)
    n.add_argument("--context", choices=snippets.CONTEXTS, default="location")
    n.add_argument(
        "--directory",
        type=Path,
        metavar="DIR",
        help="write every snippet into DIR as authd-CONTEXT.conf instead (for packages)",
    )
    n.set_defaults(func=_nginx_snippet)

    d = sub.add_parser(
        "dev",
        help="keys and tokens for local testing",
        formatter_class=fmt,
        description=textwrap.dedent("""\
            Keys and tokens for local testing, shaped like those of each provider authd
            serves: Cloudflare Access, Google IAP, an AWS ALB, a generic OIDC provider.
              keygen   write a key pair, the public half as the provider publishes it
              mint     print a token signed with it, shaped as the provider's"""),
    )
    dsub = d.add_subparsers(title="commands", metavar="COMMAND")
    k = dsub.add_parser(
        "keygen",
        help="write a key pair",
        formatter_class=fmt,
        description=textwrap.dedent("""\
            Write a new key pair into DIR (created if missing) for a local stand-in of an
            identity-aware proxy, the public half laid out the way --provider publishes
            it. DIR/private.pem is the private key (PKCS#8 PEM, mode 0600; one that is
            there is replaced): keep it, and sign tokens with it (authd dev mint).

              cloudflare (default)  RSA 2048
                DIR/jwks.json       Cloudflare's /cdn-cgi/access/certs: keys,
                                    public_cert, public_certs
              google-iap            EC P-256
                DIR/jwks.json       IAP's public_key-jwk: keys with kty EC, crv P-256,
                                    alg ES256, use sig, kid, x, y
              aws-alb               EC P-256
                DIR/alb-keys/KID    the public key as PEM, as an ALB's regional key
                                    endpoint serves it per kid (the keys of earlier
                                    runs stay, as a rotated ALB's old kids do)
              oidc                  RSA 2048; needs --iss
                DIR/jwks.json       the key set (kty RSA, alg RS256, use sig, kid)
                DIR/openid-configuration.json
                                    the discovery document: issuer ISS,
                                    jwks_uri ISS/jwks.json

            The kid is the public key's RFC 7638 SHA-256 thumbprint in hex (aws-alb: a
            UUID made from it, as ALB kids are UUIDs); authd dev mint computes the same
            kid from the private key. Prints the files written and the kid."""),
        epilog=textwrap.dedent(f"""\
            point an issuer ([[issuers]] in authd.toml) at the public half:
              cloudflare  jwks_file = "DIR/jwks.json" (or serve the file as jwks_url)
              google-iap  provider = "google-iap", jwks_file = "DIR/jwks.json"
              aws-alb     provider = "aws-alb", issuer = "{dev.DEV_ALB_ISSUER}"
                          (mint's default), alb_keys_url = the URL serving
                          DIR/alb-keys (plain http only on loopback)
              oidc        provider = "oidc", issuer = ISS, and serve DIR at ISS
                          with discovery_url = "ISS/openid-configuration.json";
                          or jwks_file = "DIR/jwks.json"

            examples:
              authd dev keygen dev
              authd dev keygen --provider google-iap dev-iap
              authd dev keygen --provider aws-alb dev-alb
              python3 -m http.server --bind 127.0.0.1 --directory dev-alb/alb-keys 8001
              authd dev keygen --provider oidc --iss http://127.0.0.1:8002 dev-oidc
              python3 -m http.server --bind 127.0.0.1 --directory dev-oidc 8002"""),
    )
    k.add_argument(
        "--provider",
        choices=config.PROVIDERS,
        default="cloudflare",
        help="whose key and layout (default cloudflare)",
    )
    k.add_argument(
        "--iss",
        metavar="URL",
        help="oidc only: the issuer the discovery document names (https, or http on loopback)",
    )
    k.add_argument("directory", type=Path, metavar="DIR")
    k.set_defaults(func=_keygen)
    ttl = ", ".join(f"{name} {seconds}" for name, seconds in dev.DEFAULT_TTL.items())
    m = dsub.add_parser(
        "mint",
        help="print a signed token",
        formatter_class=fmt,
        description=textwrap.dedent("""\
            Print a token shaped like --provider's, signed with --key: the private.pem
            of `authd dev keygen --provider` with the same provider. Its kid is computed
            from the key, as keygen wrote it.

              cloudflare (default)  RS256; arrives as Cf-Access-Jwt-Assertion or the
                  CF_Authorization cookie. aud (the --aud list), iss, iat, nbf, exp,
                  type, email, sub (a UUID derived from the email), identity_nonce,
                  country ("DE"). With --service-token, a service token instead:
                  common_name = CLIENT_ID, sub = "", no email, no nbf.
              google-iap  ES256; arrives as x-goog-iap-jwt-assertion. aud (one --aud),
                  iss, iat, exp, email, sub ("accounts.google.com:" and 21 digits
                  derived from the email), hd (the email's domain),
                  google = {"access_levels": []}.
              aws-alb  ES256; arrives as x-amzn-oidc-data. The header carries alg, kid,
                  signer (--signer: the ALB's ARN), iss, client (--client), exp, typ;
                  the payload sub, email, email_verified, exp, iss. Every segment is
                  base64url WITH '=' padding and signed as padded, as ALBs do. No aud:
                  a policy's audience is the ALB's ARN, compared with signer.
              oidc  RS256; arrives as Authorization: Bearer. iss (--iss, required),
                  aud (--aud: the client id; a list if given more than once), sub,
                  email, email_verified, iat, exp.

            --claim adds to (or replaces in) the payload of any provider. An option
            that the provider's tokens have no place for is an error."""),
        epilog=textwrap.dedent(f"""\
            defaults:
              --iss     cloudflare {dev.DEV_ISSUER}
                        google-iap {config.GOOGLE_IAP_ISSUER}
                        aws-alb    {dev.DEV_ALB_ISSUER}
                        oidc       none: required
              --aud     cloudflare {dev.DEV_AUDIENCE}
                        google-iap {dev.DEV_IAP_AUDIENCE}
                        oidc       {dev.DEV_OIDC_CLIENT_ID}
              --signer  {dev.DEV_ALB_SIGNER}
              --client  {dev.DEV_ALB_CLIENT}
              --ttl     {ttl}

            examples:
              authd dev mint --key dev/private.pem --email bob@example.com \\
                  --claim custom.groups='["sre","ops"]' --claim country=NL
              authd dev mint --key dev/private.pem --ttl -60   # expired a minute ago
              authd dev mint --provider google-iap --key dev-iap/private.pem
              curl -H "x-amzn-oidc-data: $(authd dev mint --provider aws-alb \\
                  --key dev-alb/private.pem)" https://app.example.com/
              authd dev mint --provider oidc --key dev-oidc/private.pem \\
                  --iss http://127.0.0.1:8002 --aud wiki"""),
    )
    m.add_argument("--key", type=Path, required=True, metavar="PEM", help="private key file")
    m.add_argument(
        "--provider",
        choices=config.PROVIDERS,
        default="cloudflare",
        help="whose token shape (default cloudflare)",
    )
    m.add_argument("--iss", metavar="URL", help="issuer (default: the provider's, see below)")
    m.add_argument(
        "--aud",
        action="append",
        default=[],
        metavar="A",
        help="audience: AUD tag, IAP backend service, OIDC client id (repeatable)",
    )
    m.add_argument("--email", default=dev.DEV_EMAIL, metavar="E", help="user email")
    m.add_argument(
        "--ttl",
        type=int,
        metavar="S",
        help="seconds until exp (negative: already expired)",
    )
    m.add_argument("--type", metavar="T", help="cloudflare: token type (default app)")
    m.add_argument(
        "--service-token",
        metavar="CLIENT_ID",
        help="cloudflare: mint a service token",
    )
    m.add_argument("--signer", metavar="ARN", help="aws-alb: the ALB's ARN")
    m.add_argument("--client", metavar="ID", help="aws-alb: the ALB's client id at the IdP")
    m.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="K=V",
        help="extra claim; V is JSON if it parses, else a string; dotted K nests (repeatable)",
    )
    m.set_defaults(func=_mint)
    return p


def _config_path(args: argparse.Namespace, env: Mapping[str, str]) -> Path:
    if args.config is not None:
        return Path(args.config)
    return Path(env.get("AUTHD_CONFIG") or config.DEFAULT_PATH)


def _load(args: argparse.Namespace, env: Mapping[str, str], out: IO[str]) -> Config | None:
    read = _read(args, env, out)
    return None if read is None else read[0]


def _read(
    args: argparse.Namespace, env: Mapping[str, str], out: IO[str]
) -> tuple[Config, bytes] | None:
    """The configuration and the bytes it was parsed from; problems are printed to ``out``."""
    try:
        return config.read(_config_path(args, env))
    except ConfigError as ex:
        for problem in ex.problems:
            print(problem, file=out)
        return None


def _check_config(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    cfg = _load(args, env, sys.stdout)
    if cfg is None:
        return EXIT_CONFIG
    for warning in cfg.warnings():
        print(f"warning: {warning}")
    print(
        f"{_config_path(args, env)}: ok ({len(cfg.issuers)} issuer(s), "
        f"{len(cfg.policies)} policy(ies), listen {cfg.listen})",
    )
    return 0


def _nginx_snippet(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    path = _config_path(args, env)
    explicit = args.config is not None or "AUTHD_CONFIG" in env
    if not explicit and not path.exists():
        cfg: Config | None = config.Config()
        print(f"# {path} does not exist: rendered for the defaults", file=sys.stderr)
    else:
        cfg = _load(args, env, sys.stderr)
    if cfg is None:
        return EXIT_CONFIG
    if args.directory is None:
        sys.stdout.write(snippets.render(args.context, cfg))
        return 0
    for context in snippets.CONTEXTS:
        target = args.directory / snippets.file_name(context)
        try:
            target.write_text(snippets.render(context, cfg))
        except OSError as ex:
            print(f"authd nginx-snippet: cannot write {target}: {ex.strerror}", file=sys.stderr)
            return EXIT_CONFIG
    return 0


def _keygen(args: argparse.Namespace, _env: Mapping[str, str]) -> int:
    try:
        files = dev.write_keys(args.directory, args.provider, issuer=args.iss)
    except (OSError, ValueError) as ex:
        print(f"authd dev keygen: {ex}", file=sys.stderr)
        return EXIT_CONFIG
    public = " and ".join(str(path) for path in files.public)
    print(f"wrote {files.private} (private, keep it) and {public} (public); kid {files.kid}")
    return 0


def _mint(args: argparse.Namespace, _env: Mapping[str, str]) -> int:
    try:
        token = dev.mint_token(
            args.provider,
            args.key,
            now=time.time(),
            iss=args.iss,
            aud=args.aud,
            email=args.email,
            ttl=args.ttl,
            token_type=args.type,
            service_token=args.service_token,
            signer=args.signer,
            client=args.client,
            extra=dict(dev.parse_claim_argument(c) for c in args.claim),
        )
    except (OSError, ValueError, TypeError) as ex:
        print(f"authd dev mint: {ex}", file=sys.stderr)
        return EXIT_CONFIG
    print(token)
    return 0


def _verify(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    cfg = _load(args, env, sys.stderr)
    if cfg is None:
        return EXIT_CONFIG
    token = sys.stdin.read() if args.token == "-" else args.token
    token = token.strip()
    source = None
    if args.source is not None:
        problems: list[str] = []
        source = config.parse_token_source(args.source, "--source", problems)
        if source is None:
            print(f"authd verify: {problems[0]}", file=sys.stderr)
            return EXIT_CONFIG
    # Key fetch problems are worth seeing here, on stderr, away from the explanation.
    audit.configure(stream=sys.stderr, level=logging.WARNING, cache=False)
    decision = asyncio.run(_decide_once(cfg, args.policy, token, source))
    report = _explain(decision, token)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        _print_explanation(report)
    if decision.decision == "allow":
        return EXIT_ALLOW
    return EXIT_DENY if decision.decision == "deny" else EXIT_CANNOT_DECIDE


async def _decide_once(
    cfg: Config,
    policy: str,
    token: str,
    source: TokenSource | None,
) -> Decision:
    async with make_http_client() as client:
        keys = KeyStore.from_config(cfg.issuers, client, SystemClock())
        await asyncio.gather(*(k.refresh() for k in keys.issuers.values()))
        authorizer = Authorizer.from_config(cfg, keys, SystemClock(), client)

        def find(sources: Sequence[TokenSource]) -> Found | str:
            if source is None:
                return token  # where it arrived is unknown: any issuer of the policy
            if not any(s.key == source.key for s in sources):
                raise Denied(Reason.NO_TOKEN, f"no issuer of policy {policy!r} reads {source}")
            return Found(token, (next(s for s in sources if s.key == source.key),))

        return await authorizer.decide(policy, find)


def _explain(d: Decision, token: str) -> dict[str, object]:
    report: dict[str, object] = {
        "decision": d.decision,
        "status": d.status,
        "reason": d.reason.value if d.reason else None,
        "detail": d.detail or None,
        "policy": d.policy,
        "rule": d.rule,
        "token_id": d.token_id,
    }
    if d.claims is not None:
        report["issuer"] = {
            "name": d.claims.issuer_name,
            "iss": d.claims.iss,
            "chosen_because": d.issuer_choice or None,
        }
        report["kid"] = d.claims.kid
        report["claims"] = dict(d.claims.payload)
    if d.enrichment is not None:
        report["enrichment"] = d.enrichment
    if d.identity is not None:
        i = d.identity
        report["get_identity"] = {
            "groups": list(i.group_names()),
            "posture": {p.name or p.id: "passed" if p.success else "failed" for p in i.posture},
            "idp_type": i.idp_type,
            "amr": list(i.amr),
            "document": dict(i.document),
        }
    if d.decision == "allow":
        report["headers"] = dict(d.headers)
    else:
        report["unverified"] = _unverified(token)
    if d.exc_info is not None:
        report["error"] = repr(d.exc_info[1])
    return report


def _unverified(token: str) -> dict[str, object] | None:
    """The token's header and payload as they read, unverified, for a human to look at."""
    with contextlib.suppress(Denied):
        h, p, _ = split(token, padded=True)  # as an ALB's token would be
        return {
            "header": decode_json_segment(h, padded=True),
            "payload": decode_json_segment(p, padded=True),
        }
    return None


def _print_explanation(report: dict[str, object]) -> None:
    for key in ("decision", "status", "reason", "detail", "policy", "rule", "issuer", "kid"):
        value = report.get(key)
        if isinstance(value, dict):
            why = value.get("chosen_because")
            value = f"{value['name']} ({value['iss']})" + (f": {why}" if why else "")
        if value is not None:
            print(f"{key + ':':<10}{value}")
    if "enrichment" in report:
        print(f"{'get-identity:':<10} {report['enrichment']}")
    answer = report.get("get_identity")
    if isinstance(answer, dict):
        print(f"  groups:   {', '.join(answer['groups']) or '(none)'}")
        for check, outcome in answer["posture"].items():
            print(f"  posture:  {check}: {outcome}")
        print(f"  idp.type: {answer['idp_type']}")
        print(f"  amr:      {', '.join(answer['amr']) or '(none)'}")
    if "claims" in report:
        print("claims (verified):")
        print(textwrap.indent(json.dumps(report["claims"], indent=2, ensure_ascii=False), "  "))
    if "headers" in report:
        print("identity headers:")
        for name, value in dict(report["headers"]).items():  # type: ignore[call-overload]
            print(f"  {name}: {value}")
    if report.get("unverified"):
        print("token as it reads (UNVERIFIED, do not trust):")
        text = json.dumps(report["unverified"], indent=2, ensure_ascii=False)
        print(textwrap.indent(text, "  "))
    if report.get("error"):
        print(f"error:    {report['error']}")


def _serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    path = _config_path(args, env)
    read = _read(args, env, sys.stderr)
    if read is None:
        return EXIT_CONFIG
    cfg, source = read
    audit.configure()
    for warning in cfg.warnings():
        log.warning("config_warning", problem=warning)
    try:
        sock = systemd.activated_socket() or bind(cfg.listen)
    except OSError as ex:
        log.error("cannot_listen", listen=str(cfg.listen), error=str(ex))  # noqa: TRY400 -- the message says it all
        return EXIT_CONFIG
    from authd import server  # noqa: PLC0415 -- only `serve` needs the server

    return server.run(cfg, path, source, sock)


def _reload(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    if _load(args, env, sys.stderr) is None:
        print("not reloading: the running authd keeps its configuration", file=sys.stderr)
        return EXIT_CONFIG
    try:
        os.kill(args.pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"no process {args.pid}", file=sys.stderr)
        return 1
    except PermissionError:
        print(
            f"not allowed to signal process {args.pid} (run as root or its user)", file=sys.stderr
        )
        return 1
    return 0


def bind(listen: Listen) -> socket.socket:
    """Bind the listening socket ourselves: a unix socket gets mode 0660, not uvicorn's 0666."""
    if listen.kind == "tcp":
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        return socket.create_server(
            (listen.host, listen.port),
            family=family,
            backlog=LISTEN_BACKLOG,
        )
    path = Path(listen.path)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            if _in_use(path):
                raise OSError(f"{path} is in use by another process")
            path.unlink()  # a stale socket of an earlier run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.listen(LISTEN_BACKLOG)
    return sock


def _in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True
