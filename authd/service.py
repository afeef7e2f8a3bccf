"""What a running authd serves, and how it changes while running: start, reload, stop.

A :class:`Generation` is one configuration with its key store and compiled policies.
:class:`Service` holds the current one; a reload builds the next generation beside it,
fetches its keys, and only then swaps it in, so requests never see half a configuration.
A configuration that does not validate is logged and changes nothing.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from authd import config as config_mod
from authd import metrics
from authd.decision import Authorizer
from authd.errors import ConfigError
from authd.keys import KeyStore

if TYPE_CHECKING:
    from pathlib import Path

    import httpx

    from authd.audit import AuditFile
    from authd.config import Config
    from authd.keys import Clock, FetchObserver, KeySet

log = structlog.get_logger("authd.service")

# Settings that belong to the process, not to a generation: a reload cannot change them.
_RESTART_ONLY = ("listen", "workers", "audit_file")


@dataclass(frozen=True, slots=True)
class Generation:
    config: Config
    keys: KeyStore
    authorizer: Authorizer


def build_generation(
    cfg: Config,
    client: httpx.AsyncClient,
    clock: Clock,
    on_fetch: FetchObserver | None,
    reuse: KeyStore | None = None,
) -> Generation:
    """Key sets (reusing ``reuse``'s where an issuer is unchanged) and compiled policies."""
    keys = KeyStore.from_config(cfg.issuers, client, clock, on_fetch, reuse=reuse)
    return Generation(cfg, keys, Authorizer.from_config(cfg, keys, clock, client))


class Service:
    """The configuration in force in this process, reloadable from its file."""

    def __init__(  # noqa: PLR0913 -- the collaborators a running daemon is made of
        self,
        current: Generation,
        *,
        path: Path | None,
        client: httpx.AsyncClient,
        clock: Clock,
        on_fetch: FetchObserver | None = None,
        audit_file: AuditFile | None = None,
    ) -> None:
        self.current = current
        self.path = path
        self.client = client
        self.clock = clock
        self.on_fetch = on_fetch
        self.audit_file = audit_file
        self._reloading = asyncio.Lock()

    @classmethod
    def from_config(  # noqa: PLR0913 -- as __init__
        cls,
        cfg: Config,
        *,
        path: Path | None,
        client: httpx.AsyncClient,
        clock: Clock,
        on_fetch: FetchObserver | None = None,
        audit_file: AuditFile | None = None,
    ) -> Service:
        return cls(
            build_generation(cfg, client, clock, on_fetch),
            path=path,
            client=client,
            clock=clock,
            on_fetch=on_fetch,
            audit_file=audit_file,
        )

    async def start(self) -> None:
        """The first fetch of every key set (each bounded by its timeout), then refresh."""
        await self.current.keys.start()

    async def stop(self) -> None:
        await self.current.keys.stop()

    async def reload(self) -> bool:
        """Read the configuration file again and switch to it; False when it is not valid.

        Issuers configured as before keep their keys (and refetch them now); the new
        generation serves only once its first fetches have finished.
        """
        async with self._reloading:
            if self.audit_file is not None:
                self.audit_file.reopen()
            if self.path is None:
                return True
            try:
                cfg = config_mod.load(self.path)
            except ConfigError as ex:
                log.error("reload_failed", path=str(self.path), problems=ex.problems)  # noqa: TRY400 -- the problems are the message
                return False
            old = self.current
            if changed := [k for k in _RESTART_ONLY if getattr(cfg, k) != getattr(old.config, k)]:
                log.warning("reload_needs_restart", settings=changed)
            for warning in cfg.warnings():
                log.warning("config_warning", problem=warning)
            new = build_generation(cfg, self.client, self.clock, self.on_fetch, reuse=old.keys)
            await new.keys.start()
            self.current = new
            await old.keys.stop()
            log.info("reloaded", path=str(self.path), status=self.status())
            return True

    def status(self) -> str:
        """One line for systemd's status and the logs: configured? keys loaded?"""
        gen = self.current
        if not gen.config.configured:
            return "not configured (no issuer or no policy in the configuration): denying all"
        issuers = list(gen.keys.issuers.values())
        missing = [k for k in issuers if not k.usable()]
        if not missing:
            return f"ready: keys loaded for {len(issuers)} issuer(s)"
        waiting = ", ".join(f"{k.name} ({k.last_error or 'no key set yet'})" for k in missing)
        return f"waiting for keys (503 until they arrive): {waiting}"


def record_fetch(keys: KeySet, ok: bool) -> None:
    """The metrics' view of a key fetch."""
    metrics.key_fetch(keys.name, ok=ok, wall_time=time.time())
    metrics.keys_usable(keys.name, keys.usable())
