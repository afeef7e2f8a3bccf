"""Service: the configuration in force, and reloading it from its file while serving."""

import asyncio
import json
import textwrap

import httpx
import pytest
from structlog.testing import capture_logs

from authd import config
from authd.audit import AuditFile, Auditor
from authd.decision import Authorizer
from authd.errors import Reason
from authd.headers import RequestFacts
from authd.keys import KeyStore
from authd.service import Generation, Service
from tests.conftest import AUD, ISSUER

JWKS_URL = f"{ISSUER}/cdn-cgi/access/certs"


def write_config(path, *, policies: str, listen: str = "127.0.0.1:9180", issuer: bool = True):
    issuer_table = f"""
        [[issuers]]
        name = "team"
        issuer = "{ISSUER}"
        jwks_url = "{JWKS_URL}"
    """
    path.write_text(
        textwrap.dedent(f'listen = "{listen}"\n')
        + (textwrap.dedent(issuer_table) if issuer else "")
        + textwrap.dedent(policies)
    )
    return path


WIKI_FOR_EXAMPLE_COM = f"""
    [policies.wiki]
    audience = ["{AUD}"]
    allow_email_domains = ["example.com"]
"""
WIKI_FOR_BOB = f"""
    [policies.wiki]
    audience = ["{AUD}"]
    allow_emails = ["bob@example.com"]
"""


@pytest.fixture
def path(tmp_path):
    return write_config(tmp_path / "authd.toml", policies=WIKI_FOR_EXAMPLE_COM)


@pytest.fixture
async def service(path, store, clock):
    cfg = config.load(path)
    async with httpx.AsyncClient() as client:
        yield Service(
            Generation(cfg, store, Authorizer.from_config(cfg, store, clock)),
            path=path,
            client=client,
            clock=clock,
        )


async def decide(service: Service, token: str, policy: str = "wiki"):
    return await service.current.authorizer.decide(policy, lambda _: token)


async def test_a_valid_file_changes_the_policy_and_keeps_and_refreshes_the_keys(
    service, path, forge, source, issuer_keys
):
    assert (await decide(service, forge.valid())).status == 200
    calls = source.calls
    write_config(path, policies=WIKI_FOR_BOB)

    with capture_logs() as logs:
        assert await service.reload() is True

    assert (await decide(service, forge.valid())).reason is Reason.NOT_ALLOWED
    assert (await decide(service, forge.valid(email="bob@example.com"))).status == 200
    assert service.current.keys.get("team") is issuer_keys  # unchanged issuer: same keys
    assert source.calls == calls + 1  # ... refetched now
    assert [e["event"] for e in logs if e["event"] == "reloaded"] == ["reloaded"]


async def test_keys_survive_a_reload_while_the_key_endpoint_is_down(service, path, forge, source):
    source.error = "connection refused"
    write_config(path, policies=WIKI_FOR_BOB)
    assert await service.reload() is True
    assert service.current.keys.ready()
    assert (await decide(service, forge.valid(email="bob@example.com"))).status == 200


async def test_an_invalid_file_changes_nothing_and_says_why(service, path, forge):
    before = service.current
    path.write_text(path.read_text() + "\nsurprise = 1\n[policies.x]\n")

    with capture_logs() as logs:
        assert await service.reload() is False

    assert service.current is before
    assert (await decide(service, forge.valid())).status == 200
    (failed,) = [e for e in logs if e["event"] == "reload_failed"]
    assert failed["log_level"] == "error"
    surprise, audience = failed["problems"]
    assert surprise == "policies.wiki.surprise: unknown key"
    assert audience.startswith("policies.x.audience: required: the AUD tag(s)")


async def test_an_unreadable_file_changes_nothing(service, path):
    before = service.current
    path.unlink()
    assert await service.reload() is False
    assert service.current is before


async def test_settings_of_the_process_need_a_restart_and_say_so(service, path, forge):
    write_config(path, policies=WIKI_FOR_BOB, listen="unix:/run/authd/authd.sock")
    with capture_logs() as logs:
        assert await service.reload() is True
    (warning,) = [e for e in logs if e["event"] == "reload_needs_restart"]
    assert warning["settings"] == ["listen"]
    assert (await decide(service, forge.valid())).reason is Reason.NOT_ALLOWED  # the rest applied


async def test_a_removed_issuer_no_longer_verifies(service, path, forge):
    write_config(path, policies=WIKI_FOR_EXAMPLE_COM, issuer=False)
    assert await service.reload() is True
    assert service.current.keys.issuers == {}
    assert (await decide(service, forge.valid())).status == 401


async def test_a_request_keeps_the_generation_it_started_with(service, path, forge, source):
    """A reload waits for its keys before switching: requests meanwhile use the old policies."""
    write_config(path, policies=WIKI_FOR_BOB)
    source.gate = asyncio.Event()
    reload = asyncio.create_task(service.reload())
    await asyncio.sleep(0)
    assert (await decide(service, forge.valid())).status == 200  # still the old policy
    source.gate.set()
    assert await reload is True
    assert (await decide(service, forge.valid())).reason is Reason.NOT_ALLOWED


def test_status_lines(path, store, clock, source):
    def service_for(cfg: config.Config, keys: KeyStore) -> Service:
        generation = Generation(cfg, keys, Authorizer.from_config(cfg, keys, clock))
        return Service(generation, path=None, client=httpx.AsyncClient(), clock=clock)

    empty = config.parse({})
    assert service_for(empty, KeyStore([])).status().startswith("not configured")
    cfg = config.load(path)
    assert service_for(cfg, store).status() == "ready: keys loaded for 1 issuer(s)"
    source.error = "connection refused"
    fresh = KeyStore.from_config(cfg.issuers, httpx.AsyncClient(), clock)
    assert service_for(cfg, fresh).status() == (
        "waiting for keys (503 until they arrive): team (no key set yet)"
    )


async def test_the_audit_file_is_reopened_on_reload(tmp_path, store, clock, forge):
    log_path = tmp_path / "audit.log"
    audit_file = AuditFile(log_path)
    cfg = config.parse({})
    auditor = Auditor(audit_file)
    service = Service(
        Generation(cfg, store, Authorizer.from_config(cfg, store, clock)),
        path=None,
        client=httpx.AsyncClient(),
        clock=clock,
        audit_file=audit_file,
    )
    facts = RequestFacts(method="GET", uri="/a", host="h", client_ip="1.2.3.4", request_id="r")
    auditor.decision(await decide(service, forge.valid(), "nope"), facts, 1.0)
    log_path.rename(tmp_path / "audit.log.1")  # logrotate

    assert await service.reload() is True
    auditor.decision(await decide(service, forge.valid(), "nope"), facts, 1.0)
    audit_file.close()

    (old,) = (tmp_path / "audit.log.1").read_text().splitlines()
    (new,) = log_path.read_text().splitlines()
    assert json.loads(old)["reason"] == json.loads(new)["reason"] == "unknown_policy"


async def test_a_reload_keeps_the_keys_when_only_other_issuer_settings_change(
    service, path, forge, source, issuer_keys
):
    source.error = "connection refused"  # the endpoint is down: the keys must not be lost
    text = path.read_text().replace(
        f'jwks_url = "{JWKS_URL}"', f'jwks_url = "{JWKS_URL}"\nrefresh_seconds = 600'
    )
    path.write_text(text)

    assert await service.reload() is True

    keys = service.current.keys.get("team")
    assert keys is issuer_keys
    assert keys.config.refresh_seconds == 600
    assert (await decide(service, forge.valid())).status == 200


async def test_another_key_source_is_a_new_key_set(service, path, issuer_keys):
    # Loopback, where nothing listens: the new key set's first fetch fails at once.
    path.write_text(path.read_text().replace(JWKS_URL, "http://127.0.0.1:9/certs"))
    assert await service.reload() is True
    assert service.current.keys.get("team") is not issuer_keys


def test_an_audit_file_that_cannot_be_reopened_keeps_the_open_one(tmp_path):
    directory = tmp_path / "log"
    directory.mkdir()
    audit_file = AuditFile(directory / "audit.log")
    (directory / "audit.log").rename(tmp_path / "audit.log.1")
    directory.rmdir()  # logrotate's olddir mistake, a full disk, ...

    with capture_logs() as logs:
        audit_file.reopen()

    audit_file.write("still written\n")
    audit_file.close()
    assert (tmp_path / "audit.log.1").read_text() == "still written\n"
    (failed,) = logs
    assert failed["event"] == "audit_file_reopen_failed"
