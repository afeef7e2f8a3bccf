"""tests/leakcheck.py, the plugin that fails the run when a token reaches any output: it can fail.

The matcher is tested on its own; then a small pytest session in a subprocess leaks tokens
on purpose (printed, logged through authd's JSON renderer, answered in a header) and must
fail with exactly those tests named, while the outputs that are allowed by design (the
upstream echo of the client's own headers, `authd dev mint`'s token, decoded claims) pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import b64
from tests.leakcheck import EXCERPT, MIN_DISTINCT, MIN_RUN, Registry, _without_reflection

REPO = Path(__file__).resolve().parents[2]
KEY = ec.generate_private_key(ec.SECP256R1())
KID = hashlib.sha256(b"leakcheck").hexdigest()  # a hex thumbprint, as Cloudflare's


def token(**claims) -> str:
    payload = {"email": "alice@example.com", "aud": ["f" * 64], **claims}
    return jwt.encode(payload, KEY, algorithm="ES256", headers={"kid": KID})


@pytest.fixture
def registry() -> Registry:
    return Registry()


def test_the_whole_token_and_every_piece_of_24_characters_are_found(registry):
    t = token()
    registry.add(t)

    assert registry.find(f"log: {t}")
    header, *rest = t.split(".")
    # The header (alg, kid, typ) counts whole: its first characters are every token's.
    assert registry.find(f"x={header}!")
    assert not registry.find(f"x={header[:-4]}!")
    for segment in rest:
        for start in range(len(segment) - MIN_RUN + 1):
            piece = segment[start : start + MIN_RUN]
            assert registry.find(f"x={piece}!") or len(set(piece)) < MIN_DISTINCT, piece
        assert not registry.find(f"x={segment[: MIN_RUN - 1]}!")  # one short of a leak


def test_a_leak_inside_a_longer_run_is_found(registry):
    t = token()
    registry.add(t)
    signature = t.split(".")[2]

    assert registry.find("A9" * 20 + signature[5:40] + "zZ" * 10)


def test_values_logged_by_design_are_not_leaks(registry):
    t = token(sub="7335d417-61da-459d-899c-0a01c76a8e1f")
    # A hand-made garbage token whose "signature" is the kid itself.
    garbage = f"{b64(json.dumps({'kid': KID}))}.{b64('{}')}.{KID}"
    registry.add(t)
    registry.add(garbage)

    logged = (
        f'{{"kid": "{KID}", "aud": ["{"f" * 64}"], "sub": "7335d417-61da-459d-899c-0a01c76a8e1f",'
        ' "token_id": "350dfb7c84cec0a1", "email": "alice@example.com"}'
    )
    assert registry.find(logged) == []


def test_runs_of_few_distinct_characters_are_not_leaks(registry):
    padded = token(padding="x" * 400)  # its payload holds long runs of "eHh4"
    registry.add(padded)
    registry.add(f"{'A' * 100}.{'A' * 100}.{'A' * 100}")

    assert registry.find("eHh4" * 30 + " " + "A" * 200) == []


def test_tokens_registered_later_are_checked_against_runs_seen_clean_before(registry):
    t = token()
    text = f"line {t}"
    assert registry.find(text) == []  # nothing registered yet

    registry.add(t)

    assert registry.find(text)


def test_the_upstream_echo_drops_only_what_the_client_sent(registry):
    t, other = token(), token(email="bob@example.com")
    registry.add(t)
    registry.add(other)
    echo = json.dumps(
        {
            "method": "GET",
            "path": f"/wiki/x?t={t}",
            "headers": {"cf-access-jwt-assertion": t, "x-authd-user": other},
        }
    )

    kept = _without_reflection(echo, [("cf-access-jwt-assertion", t)], f"/wiki/x?t={t}")

    assert t not in kept
    assert registry.find(kept)  # a token in a header authd set is still a leak


INNER = """
import io, json, subprocess, sys
import httpx
import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric import ec
from authd import audit, cli, dev

KEY = ec.generate_private_key(ec.SECP256R1())

def token():
    return jwt.encode({"email": "alice@example.com"}, KEY, algorithm="ES256", headers={"kid": "k"})

def test_prints_a_token():
    print("debug:", token())

def test_logs_a_token_through_authds_renderer():
    audit.configure(io.StringIO(), cache=False)
    structlog.get_logger("t").info("oops", value=token()[-40:])

def echo(request):
    body = {"method": request.method, "path": request.url.raw_path.decode(),
            "headers": dict(request.headers)}
    user = request.headers.get("x-leak", "")  # a header set by "authd"
    return httpx.Response(200, json=body, headers={"x-authd-user": user})

def test_answers_with_a_token():
    with httpx.Client(transport=httpx.MockTransport(echo)) as client:
        client.get("http://upstream/wiki/", headers={"x-leak": token()})

def test_the_upstream_echoes_the_clients_own_token():
    with httpx.Client(transport=httpx.MockTransport(echo)) as client:
        client.get("http://upstream/wiki/", headers={"cf-access-jwt-assertion": token()})

def test_mint_prints_its_token_by_design(capsys, tmp_path):
    dev.keygen(tmp_path)
    assert cli.main(["dev", "mint", "--key", str(tmp_path / "private.pem")]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.count(".") == 2
    cli.main(["dev", "mint", "--key", str(tmp_path / "private.pem")])  # left in the section

def test_decoded_claims_and_short_pieces_are_fine():
    t = token()
    print(json.dumps(jwt.decode(t, options={"verify_signature": False})))
    print(t[:MIN_RUN - 1], t[-(MIN_RUN - 1):])

MIN_RUN = 24
"""


def test_a_session_that_leaks_fails_and_names_each_leaking_test(tmp_path):
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    plugins = ["-p", "tests.leakcheck", "-p", "no:cacheprovider", "-p", "no:randomly"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *plugins, "-q", "test_inner.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = result.stdout + result.stderr

    assert "6 passed" in out, out
    assert result.returncode == 1, out
    leaks = [line for line in out.splitlines() if line.startswith("test_inner.py::")]
    assert sorted({line.split(":")[2] for line in leaks}) == [
        "test_answers_with_a_token",
        "test_logs_a_token_through_authds_renderer",
        "test_prints_a_token",
    ], out
    assert any("Captured stdout call" in line for line in leaks), out
    assert any("JSONRenderer" in line for line in leaks), out
    assert any("response to GET /wiki/ (httpx)" in line for line in leaks), out
    # The report shows an excerpt, never a token: no base64url run of MIN_RUN in it.
    for line in leaks:
        excerpt = line.rsplit(" then ", 1)[1].removesuffix("...")
        assert len(excerpt) == EXCERPT, line
