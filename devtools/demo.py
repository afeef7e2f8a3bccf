"""`make demo`: authd behind a private nginx on loopback, and what a few requests do.

It makes dev keys with `authd dev keygen`, tokens with `authd dev mint`, a config that reads the
keys from a file, then starts authd, an echo upstream and nginx (its own config, on a free port
of 127.0.0.1; the system's nginx service is never touched), sends a handful of requests, prints
what the client and the upstream saw and the audit lines authd wrote, and cleans everything up.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.stack import (
    DEFAULT_ISSUER,
    WIKI_AUD,
    DevKey,
    Stack,
    StackError,
    make_config,
    running_stack,
    temporary_workdir,
)

POLICIES = {"wiki": {"audience": [WIKI_AUD], "allow_email_domains": ["example.com"]}}
RULE = "=" * 78


def main() -> int:
    try:
        with temporary_workdir("authd-demo-") as workdir:
            run(workdir)
    except StackError as ex:
        print(f"demo failed: {ex}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print("\nEverything stopped and cleaned up.")
    return 0


def run(workdir: Path) -> None:
    say("Setting up")
    key = DevKey.create(workdir / "keys")
    print(f"  authd dev keygen {key.directory}   -> kid {key.kid[:16]}...")
    config = make_config(workdir, jwks_file=key.jwks_path, policies=POLICIES)
    print(f"  config {config}: policy 'wiki' lets in anyone @example.com")
    alice = key.mint(iss=DEFAULT_ISSUER, aud=WIKI_AUD, email="alice@example.com")
    mallory = key.mint(iss=DEFAULT_ISSUER, aud=WIKI_AUD, email="mallory@evil.example")
    print("  authd dev mint ... --email alice@example.com     -> a token for Alice")
    print("  authd dev mint ... --email mallory@evil.example  -> a token for Mallory")

    with running_stack(workdir, config) as stack, httpx.Client(base_url=stack.url) as http:
        print(f"  authd listens on {stack.authd.listen.unix_path}")
        print(f"  nginx listens on {stack.url}, /wiki/ protected by the shipped snippets")

        scenes = [
            ("No token at all", {}),
            ("Alice, with her token", {"Cf-Access-Jwt-Assertion": alice}),
            ("Mallory, whose domain the policy refuses", {"Cf-Access-Jwt-Assertion": mallory}),
            (
                "Alice, claiming to be the CEO with a forged X-Authd-Email",
                {"Cf-Access-Jwt-Assertion": alice, "X-Authd-Email": "ceo@example.com"},
            ),
            ("No token, only a forged X-Authd-Email", {"X-Authd-Email": "ceo@example.com"}),
        ]
        paths = [visit(stack, http, title, headers) for title, headers in scenes]
        show_audit(stack, paths)


def visit(stack: Stack, http: httpx.Client, title: str, headers: dict[str, str]) -> str:
    path = f"/wiki/page-{uuid.uuid4().hex[:8]}"
    say(title)
    options = [f"-H '{name}: {abbreviate(value)}'" for name, value in headers.items()]
    print("  $ " + " ".join(["curl", *options, f"{stack.url}{path}"]))
    response = http.get(path, headers=headers)
    print(f"  -> {response.status_code} {response.reason_phrase}")
    received = stack.upstream.requests_for(path)
    if not received:
        print("  The upstream was never called.")
        return path
    print("  The upstream received these identity headers:")
    for name, value in received[0].headers:
        if name.startswith(("x-authd-", "cf-access-authenticated")):
            print(f"    {name}: {value}")
    for name, value in headers.items():
        if name.lower().startswith("x-authd-"):
            arrived = value in received[0].values(name)
            print(f"  The forged {name}: {value} {'REACHED' if arrived else 'never reached'} it.")
    return path


def show_audit(stack: Stack, paths: list[str]) -> None:
    say("authd's audit lines for these requests (JSON on its stdout, one per request)")
    # stdout is written in order: once the last request's line is there, all of them are.
    stack.authd.wait_for_audit(lambda line: line.get("uri") == paths[-1])
    lines = [line for line in stack.authd.audit_lines() if line.get("uri") in paths]
    for line in lines:
        shown: dict[str, Any] = {k: v for k, v in line.items() if v is not None}
        print(json.dumps(shown, indent=2))


def abbreviate(value: str) -> str:
    """Tokens are long and secret-shaped: show their start only."""
    return value if len(value) < 40 else f"{value[:20]}...({len(value)} chars)"


def say(title: str) -> None:
    print(f"\n{RULE}\n{title}\n{RULE}")


if __name__ == "__main__":
    sys.exit(main())
