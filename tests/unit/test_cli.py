import base64
import json
import socket
import stat
import subprocess
import sys
import time

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from authd import cli, config, dev
from authd.config import Listen
from devtools.standins import (
    DISK_ENCRYPTION_RULE_ID,
    GetIdentityServer,
    IdentityReply,
    documented_identity,
)


@pytest.fixture
def setup(tmp_path):
    pem, jwks = dev.keygen(tmp_path / "keys")
    path = tmp_path / "authd.toml"
    path.write_text(
        f"""
listen = "unix:{tmp_path}/authd.sock"
[[issuers]]
name = "dev"
issuer = "{dev.DEV_ISSUER}"
jwks_file = "{jwks}"
[policies.wiki]
audience = ["{dev.DEV_AUDIENCE}"]
allow_email_domains = ["example.com"]
headers = {{ "X-Authd-Department" = "custom.department" }}
""",
    )
    return path, dev.load_private_key(pem)


def mint(key, **kwargs) -> str:
    return dev.mint(key, dev.claims(now=time.time(), **kwargs))


def run(capsys, *argv, env=None):
    code = cli.main(list(argv), env=env or {})
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_config_ok(capsys, setup):
    path, _ = setup
    code, out, _ = run(capsys, "check-config", "--config", str(path))
    assert code == 0
    assert "ok (1 issuer(s), 1 policy(ies)" in out


def test_check_config_lists_every_problem_and_fails(capsys, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('listen = "x"\nsurprise = 1\n[policies.wiki]\nallow_emails = ["nope"]\n')
    code, out, _ = run(capsys, "check-config", "--config", str(path))
    assert code == 2
    assert out.splitlines() == [
        "listen: expected HOST:PORT or unix:/path/to.sock, got 'x'",
        (
            "policies.wiki.audience: required: the AUD tag(s) of the Access application this "
            "policy protects (Zero Trust dashboard > Access > Applications > Overview); for "
            "Google IAP the backend's /projects/... audience, for OIDC the client id, for an "
            "AWS ALB its ARN"
        ),
        "policies.wiki.allow_emails: 'nope' is not an email address",
        "surprise: unknown key",
    ]


def test_config_path_comes_from_the_environment(capsys, setup):
    path, _ = setup
    code, out, _ = run(capsys, "check-config", env={"AUTHD_CONFIG": str(path)})
    assert code == 0
    assert str(path) in out
    code, out, _ = run(capsys, "check-config", env={"AUTHD_CONFIG": "/nonexistent/authd.toml"})
    assert code == 2
    assert "cannot read" in out


def test_verify_explains_an_allow(capsys, setup):
    path, key = setup
    token = mint(key, extra={"custom.department": "ops"})
    code, out, _ = run(capsys, "verify", "--config", str(path), "--policy", "wiki", token)
    assert code == 0
    assert "decision: allow" in out
    assert "rule:     allow_email_domains" in out
    assert "X-Authd-Department: ops" in out
    assert "X-Authd-Email: alice@example.com" in out


def test_verify_json_and_exit_codes(capsys, setup, monkeypatch):
    path, key = setup
    code, out, _ = run(
        capsys,
        "verify",
        "--config",
        str(path),
        "--policy",
        "wiki",
        "--json",
        mint(key, email="eve@evil.org"),
    )
    report = json.loads(out)
    assert code == 1
    assert (report["decision"], report["status"], report["reason"]) == ("deny", 403, "not_allowed")
    assert report["claims"]["email"] == "eve@evil.org"

    code, out, _ = run(
        capsys, "verify", "--config", str(path), "--policy", "wiki", "--json", mint(key, ttl=-100)
    )
    report = json.loads(out)
    assert (code, report["reason"]) == (1, "expired")
    assert report["unverified"]["payload"]["email"] == "alice@example.com"
    assert "claims" not in report

    code, out, _ = run(
        capsys, "verify", "--config", str(path), "--policy", "nope", "--json", mint(key)
    )
    assert (code, json.loads(out)["reason"]) == (1, "unknown_policy")

    # A token from stdin, with surrounding whitespace as pasted.
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("  " + mint(key) + "\n"))
    code, out, _ = run(capsys, "verify", "--config", str(path), "--policy", "wiki", "-")
    assert code == 0


def test_verify_cannot_decide_without_keys(capsys, setup, tmp_path):
    path, key = setup
    text = path.read_text().replace(
        str(tmp_path / "keys" / "jwks.json"), str(tmp_path / "missing.json")
    )
    path.write_text(text)
    code, out, err = run(capsys, "verify", "--config", str(path), "--policy", "wiki", mint(key))
    assert code == 2
    assert "reason:   keys_unavailable" in out
    assert "keys_fetch_failed" in err


def test_mint_prints_a_token_that_verifies(capsys, setup, tmp_path):
    path, _ = setup
    code, token, _ = run(
        capsys,
        "dev",
        "mint",
        "--key",
        str(tmp_path / "keys" / "private.pem"),
        "--service-token",
        "abc.access",
    )
    assert code == 0
    code, out, _ = run(
        capsys, "verify", "--config", str(path), "--policy", "wiki", "--json", token.strip()
    )
    report = json.loads(out)
    assert (code, report["reason"]) == (
        1,
        "not_allowed",
    )  # service tokens need allow_service_tokens
    assert report["claims"]["common_name"] == "abc.access"


def test_mint_reports_a_missing_key(capsys, tmp_path):
    code, out, err = run(capsys, "dev", "mint", "--key", str(tmp_path / "none.pem"))
    assert code == 2
    assert out == ""
    assert "No such file" in err


def test_keygen(capsys, tmp_path):
    code, out, _ = run(capsys, "dev", "keygen", str(tmp_path / "k"))
    assert code == 0
    assert (tmp_path / "k" / "jwks.json").exists()
    assert "private.pem" in out


@pytest.mark.parametrize(
    ("argv", "public"),
    [
        (["--provider", "cloudflare"], ["jwks.json"]),
        (["--provider", "google-iap"], ["jwks.json"]),
        (["--provider", "aws-alb"], ["alb-keys/{kid}"]),
        (
            ["--provider", "oidc", "--iss", "http://127.0.0.1:8002"],
            ["jwks.json", "openid-configuration.json"],
        ),
    ],
)
def test_keygen_for_each_provider_says_what_it_wrote(capsys, tmp_path, argv, public):
    code, out, err = run(capsys, "dev", "keygen", *argv, str(tmp_path))
    assert (code, err) == (0, "")
    kid = out.split("; kid ")[1].strip()
    written = [str(tmp_path / name.format(kid=kid)) for name in public]
    assert out == (
        f"wrote {tmp_path / 'private.pem'} (private, keep it) and {' and '.join(written)} "
        f"(public); kid {kid}\n"
    )
    assert sorted(str(p) for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        [str(tmp_path / "private.pem"), *written],
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--provider", "oidc"], "needs its issuer URL (--iss)"),
        (["--provider", "oidc", "--iss", "http://idp.example.com"], "would not fetch"),
        (["--iss", "https://idp.example.com"], "only an OIDC provider"),
    ],
)
def test_keygen_refuses_a_missing_or_misplaced_issuer(capsys, tmp_path, argv, message):
    code, out, err = run(capsys, "dev", "keygen", *argv, str(tmp_path / "k"))
    assert (code, out) == (2, "")
    assert err.startswith("authd dev keygen: ")
    assert message in err
    assert not (tmp_path / "k").exists()


def test_keygen_refuses_an_unknown_provider(capsys, tmp_path):
    with pytest.raises(SystemExit) as ex:
        cli.main(["dev", "keygen", "--provider", "pomerium", str(tmp_path)])
    assert ex.value.code == 2
    assert "invalid choice: 'pomerium'" in capsys.readouterr().err


def _public_jwk(directory):
    (key,) = json.loads((directory / "jwks.json").read_text())["keys"]
    return key


def test_mint_for_google_iap_verifies_with_the_keygen_jwks(capsys, tmp_path):
    run(capsys, "dev", "keygen", "--provider", "google-iap", str(tmp_path))
    aud = "/projects/42/global/backendServices/7"
    code, out, _ = run(
        capsys,
        "dev",
        "mint",
        "--provider=google-iap",
        f"--key={tmp_path / 'private.pem'}",
        f"--aud={aud}",
        "--email=bob@corp.example",
        '--claim=google.access_levels=["accessPolicies/1/accessLevels/corp"]',
    )
    assert code == 0
    key = _public_jwk(tmp_path)
    token = out.strip()
    assert jwt.get_unverified_header(token)["kid"] == key["kid"]
    claims = jwt.decode(
        token,
        ECAlgorithm.from_jwk(key),
        algorithms=["ES256"],
        audience=aud,
        issuer=config.GOOGLE_IAP_ISSUER,
    )
    assert claims["google"] == {"access_levels": ["accessPolicies/1/accessLevels/corp"]}
    assert claims["sub"].startswith("accounts.google.com:")
    assert claims["exp"] - claims["iat"] == dev.DEFAULT_TTL["google-iap"]


def test_mint_for_aws_alb_verifies_with_the_keygen_pem(capsys, tmp_path):
    _, out, _ = run(capsys, "dev", "keygen", "--provider", "aws-alb", str(tmp_path))
    kid = out.split("; kid ")[1].strip()
    signer = "arn:aws:elasticloadbalancing:us-east-1:111122223333:loadbalancer/app/wiki/1"
    code, out, _ = run(
        capsys,
        "dev",
        "mint",
        "--provider=aws-alb",
        f"--key={tmp_path / 'private.pem'}",
        f"--signer={signer}",
        "--client=wiki",
        "--iss=https://login.example.com",
        "--ttl=-60",
    )
    assert code == 0
    token = out.strip()
    header, payload, signature = token.split(".")
    assert all(len(segment) % 4 == 0 for segment in (header, payload, signature))  # padded
    raw = base64.urlsafe_b64decode(signature)
    public = serialization.load_pem_public_key((tmp_path / "alb-keys" / kid).read_bytes())
    public.verify(
        encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")),
        f"{header}.{payload}".encode(),
        ec.ECDSA(hashes.SHA256()),
    )
    members = json.loads(base64.urlsafe_b64decode(header))
    claims = json.loads(base64.urlsafe_b64decode(payload))
    assert (members["kid"], members["signer"], members["client"]) == (kid, signer, "wiki")
    assert members["iss"] == claims["iss"] == "https://login.example.com"
    assert members["exp"] == claims["exp"] < time.time()  # --ttl=-60: already expired


def test_mint_for_oidc_verifies_with_the_keygen_jwks(capsys, tmp_path):
    iss = "http://127.0.0.1:8002"
    run(capsys, "dev", "keygen", "--provider", "oidc", "--iss", iss, str(tmp_path))
    discovery = json.loads((tmp_path / "openid-configuration.json").read_text())
    code, out, _ = run(
        capsys,
        "dev",
        "mint",
        "--provider=oidc",
        f"--key={tmp_path / 'private.pem'}",
        f"--iss={discovery['issuer']}",
        "--aud=wiki",
    )
    assert code == 0
    claims = jwt.decode(
        out.strip(),
        RSAAlgorithm.from_jwk(_public_jwk(tmp_path)),
        algorithms=["RS256"],
        audience="wiki",
        issuer=iss,
    )
    assert claims["email"] == dev.DEV_EMAIL


@pytest.mark.parametrize(
    ("keygen", "mint", "message"),
    [
        ([], ["--provider", "google-iap"], "not an EC P-256 private key"),
        (["--provider", "aws-alb"], [], "not an RSA private key"),
        ([], ["--provider", "aws-alb", "--aud", "x"], "no aud"),
        ([], ["--signer", "arn:x"], "--signer is only for --provider aws-alb"),
        ([], ["--provider", "oidc"], "--provider oidc needs --iss"),
        ([], ["--claim", "novalue"], "expected KEY=VALUE"),
    ],
)
def test_mint_refuses_a_wrong_key_or_option(capsys, tmp_path, keygen, mint, message):
    run(capsys, "dev", "keygen", *keygen, str(tmp_path))
    code, out, err = run(capsys, "dev", "mint", "--key", str(tmp_path / "private.pem"), *mint)
    assert (code, out) == (2, "")
    assert err.startswith("authd dev mint: ")
    assert message in err


@pytest.mark.parametrize("command", ["keygen", "mint"])
def test_dev_help_describes_every_provider(capsys, command):
    with pytest.raises(SystemExit):
        cli.main(["dev", command, "--help"])
    out = capsys.readouterr().out
    for provider in config.PROVIDERS:
        assert f"\n  {provider} " in out
    assert "examples:" in out


def test_nginx_snippet_for_a_configuration(capsys, setup, tmp_path):
    path, _ = setup
    code, out, _ = run(capsys, "nginx-snippet", "--config", str(path))
    assert code == 0
    assert "proxy_set_header X-Authd-Department $authd_department;" in out
    code, out, _ = run(capsys, "nginx-snippet", "--config", str(path), "--context", "http")
    assert f"server unix:{tmp_path}/authd.sock;" in out


def test_nginx_snippet_without_a_configuration_renders_the_defaults(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("authd.config.DEFAULT_PATH", tmp_path / "absent.toml")
    code, out, err = run(capsys, "nginx-snippet", "--context", "http")
    assert code == 0
    assert "server 127.0.0.1:9180;" in out
    assert "does not exist" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["serve"],
        ["reload"],
        ["logs"],
        ["check-config"],
        ["verify"],
        ["nginx-snippet"],
        ["dev"],
        ["dev", "keygen"],
        ["dev", "mint"],
    ],
)
def test_every_command_has_help(capsys, argv):
    with pytest.raises(SystemExit) as ex:
        cli.main([*argv, "--help"])
    assert ex.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: authd")
    assert len(out.splitlines()) > 5


def test_no_command_prints_usage_and_fails(capsys):
    assert cli.main([], env={}) == 2
    assert "commands:" in capsys.readouterr().err


def test_unix_socket_is_created_0660_and_a_stale_one_replaced(tmp_path):
    path = tmp_path / "authd.sock"
    first = cli.bind(Listen(kind="unix", path=str(path)))
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    # While it is in use, a second authd must not steal it.
    with pytest.raises(OSError, match="in use"):
        cli.bind(Listen(kind="unix", path=str(path)))
    first.close()  # the file stays behind, as after a crash
    second = cli.bind(Listen(kind="unix", path=str(path)))
    assert second.family == socket.AF_UNIX
    second.close()


def test_tcp_listen():
    sock = cli.bind(Listen(kind="tcp", host="127.0.0.1", port=0))
    assert sock.getsockname()[0] == "127.0.0.1"
    sock.close()


@pytest.fixture
def hangup_catcher():
    """A process that records a SIGHUP in a file, as a running authd would act on it."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import signal, sys, time\n"
                "signal.signal(signal.SIGHUP, lambda *_: (print('HUP', flush=True), sys.exit(0)))\n"
                "print('ready', flush=True)\n"
                "time.sleep(30)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "ready\n"
    yield proc
    proc.kill()
    proc.wait()


def test_reload_signals_a_valid_configuration(capsys, setup, hangup_catcher):
    path, _ = setup
    code, _, err = run(capsys, "reload", "--config", str(path), "--pid", str(hangup_catcher.pid))
    assert (code, err) == (0, "")
    assert hangup_catcher.stdout.readline() == "HUP\n"
    assert hangup_catcher.wait(5) == 0


def test_reload_refuses_a_broken_configuration_without_signalling(capsys, setup, hangup_catcher):
    path, _ = setup
    path.write_text(path.read_text() + "workers = 0\n")
    code, _, err = run(capsys, "reload", "--config", str(path), "--pid", str(hangup_catcher.pid))
    assert code == 2
    assert err.splitlines() == [
        "policies.wiki.workers: unknown key",
        "not reloading: the running authd keeps its configuration",
    ]
    time.sleep(0.2)
    assert hangup_catcher.poll() is None  # never signalled


def test_reload_of_a_process_that_is_gone(capsys, setup):
    path, _ = setup
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    code, _, err = run(capsys, "reload", "--config", str(path), "--pid", str(gone.pid))
    assert (code, err) == (1, f"no process {gone.pid}\n")


# --- verify explains multi-issuer and enrichment decisions (issue 6) --------------------------


@pytest.fixture
def two_issuers(tmp_path):
    cf = dev.write_keys(tmp_path / "cf")
    iap = dev.write_keys(tmp_path / "iap", "google-iap")
    path = tmp_path / "authd.toml"
    path.write_text(
        f"""
[[issuers]]
name = "cf"
issuer = "{dev.DEV_ISSUER}"
jwks_file = "{cf.public[0]}"
[[issuers]]
name = "iap"
provider = "google-iap"
jwks_file = "{iap.public[0]}"
[policies.wiki]
audience = ["{dev.DEV_AUDIENCE}", "{dev.DEV_IAP_AUDIENCE}"]
[policies.cf-only]
audience = ["{dev.DEV_AUDIENCE}", "{dev.DEV_IAP_AUDIENCE}"]
issuers = ["cf"]
""",
    )
    token = dev.mint_token("google-iap", iap.private, now=time.time())
    return path, token


def test_verify_says_which_issuer_was_chosen_and_why(capsys, two_issuers):
    path, token = two_issuers
    argv = ["verify", "--config", str(path), "--policy", "wiki"]
    code, out, _ = run(capsys, *argv, "--source", "header:X-Goog-IAP-JWT-Assertion", token)
    assert code == 0, out
    assert (
        "issuer:   iap (https://cloud.google.com/iap): iap (google-iap) reads "
        "header:x-goog-iap-jwt-assertion and its issuer is the token's iss"
    ) in out
    assert "X-Authd-Issuer: iap" in out
    # Without --source: any place the policy's issuers read.
    code, out, _ = run(capsys, *argv, "--json", token)
    report = json.loads(out)
    assert (code, report["issuer"]["name"]) == (0, "iap")
    assert report["issuer"]["chosen_because"] == (
        "iap (google-iap) is the policy's issuer the iss names"
    )
    # In Cloudflare's header, an IAP token is no Cloudflare token.
    code, out, _ = run(capsys, *argv, "--json", "--source", "header:Cf-Access-Jwt-Assertion", token)
    report = json.loads(out)
    assert (code, report["reason"]) == (1, "bad_issuer")
    assert "is not the issuer of any of cf" in report["detail"]


def test_verify_under_a_policy_restricted_to_other_issuers(capsys, two_issuers):
    path, token = two_issuers
    code, out, _ = run(
        capsys, "verify", "--config", str(path), "--policy", "cf-only", "--json", token
    )
    report = json.loads(out)
    assert (code, report["reason"]) == (1, "bad_issuer")
    code, _, err = run(
        capsys, "verify", "--config", str(path), "--policy", "cf-only", "--source", "query:t", token
    )
    assert code == 2
    assert "expected header:NAME, cookie:NAME or bearer" in err


def test_verify_shows_what_get_identity_answered(capsys, setup):
    path, key = setup
    with GetIdentityServer() as server:
        path.write_text(
            path.read_text().replace(
                'jwks_file = "',
                f'get_identity = true\nget_identity_url = "{server.url}"\njwks_file = "',
            )
            + f'posture_headers = {{ "X-Authd-Disk-Encrypted" = "{DISK_ENCRYPTION_RULE_ID}" }}\n'
        )
        token = mint(key)
        sub = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))["sub"]
        server.answer(token, documented_identity(user_uuid=sub))
        code, out, _ = run(capsys, "verify", "--config", str(path), "--policy", "wiki", token)
        assert code == 0, out
        assert "get-identity: fresh" in out
        assert "X-Authd-Disk-Encrypted: true" in out
        assert "  posture:  " in out
        code, out, _ = run(
            capsys, "verify", "--config", str(path), "--policy", "wiki", "--json", token
        )
        report = json.loads(out)
        assert report["enrichment"] == "fresh"
        assert report["get_identity"]["document"]["email"] == "alice@example.com"
        assert report["headers"]["X-Authd-Posture"]
        server.answer_all(None)
        server.answer(token, IdentityReply.error(500))
        code, out, _ = run(capsys, "verify", "--config", str(path), "--policy", "wiki", token)
    # The policy's allow_email_domains does not depend on get-identity: allowed without it.
    assert code == 0
    assert "get-identity: failed: http_error" in out
    assert "X-Authd-Disk-Encrypted" not in out


def test_nginx_snippet_into_a_missing_directory_says_so(capsys, setup, tmp_path):
    path, _ = setup
    missing = tmp_path / "no" / "such"
    code, _, err = run(capsys, "nginx-snippet", "--config", str(path), "--directory", str(missing))
    assert code == 2
    assert f"cannot write {missing}/authd-http.conf: No such file or directory" in err
