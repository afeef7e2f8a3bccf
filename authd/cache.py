"""The decision cache: allows already decided, by (the token's SHA-256, policy).

A verified allow is a pure function of the token, the policy and the issuer's key set,
valid for a window of wall-clock time the token's own time claims define. So the
answer of a token seen before is kept, and served again while all of these hold:

- the wall clock is inside the token's validity window (``exp``, ``nbf``, ``iat`` and
  the leeway, exactly as :func:`authd.verify.check_times` judges them), checked on
  every hit;
- the entry is younger than ``max_seconds``;
- the issuer's key set is still usable and is the one that verified the token (any
  change of the set, a key added, rotated or removed, drops the entry).

Only allows are kept: a denial is cheap to repeat and must never outlive its cause.
The key is the full SHA-256 digest of the token, never the short audit fingerprint,
whose collisions would hand one user's allow to another token. A reload builds a new
:class:`~authd.decision.Authorizer` with an empty cache: a changed policy never meets
an old answer.

Written by hand rather than taken from ``cachetools``: every hit needs checks of its
own (time window, key set generation) and size accounting per entry, and this sits on
the hot path, where an ``OrderedDict`` (C) does the LRU bookkeeping in well under a
microsecond.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from authd.config import CacheSettings
    from authd.decision import Decision
    from authd.keys import Clock, KeySet
    from authd.verify import Verified

# What one entry costs beyond the length of its identity headers, in bytes: the key (a
# 32-byte digest and the policy), the entry, decision and claims objects, their tuples,
# strings and floats, the OrderedDict's node, and the allocator's share. tracemalloc counts
# about 1 KiB of live objects per entry (tests/unit/test_cache.py holds this count to be no
# underestimate of that); the process's resident memory grows by about 1.8 KiB per entry
# (make bench, 100k entries), which is what max_megabytes should bound.
ENTRY_OVERHEAD_BYTES = 1700


@dataclass(frozen=True, slots=True)
class _Entry:
    decision: Decision  # the hit's decision, ready to render and audit
    valid_from: float  # wall clock: the token's window, leeway included
    valid_until: float
    deadline: float  # monotonic: max_seconds after it was stored
    keys: KeySet
    key_generation: int
    size: int


class DecisionCache:
    """A bounded LRU of allows (see the module docstring)."""

    def __init__(self, settings: CacheSettings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.max_bytes = int(settings.max_megabytes * 1024 * 1024)
        self._entries: OrderedDict[tuple[bytes, str], _Entry] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes, policy: str) -> Decision | None:
        """The stored allow for this token and policy, if it still holds; else None."""
        key = (digest, policy)
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self.clock.time()
        if (
            entry.valid_from <= now < entry.valid_until
            and self.clock.monotonic() < entry.deadline
            and entry.keys.generation == entry.key_generation
            and entry.keys.usable()
        ):
            self._entries.move_to_end(key)
            return entry.decision
        self._drop(key)
        return None

    def put(
        self,
        digest: bytes,
        policy: str,
        decision: Decision,
        verified: Verified,
        *,
        until: float = float("inf"),
    ) -> None:
        """Keep ``decision`` (an allow, made ready for hits) while the token's window lasts,
        and not past ``until`` (wall clock: when get-identity's answer it used goes stale).

        ``verified`` names the key set and its generation as read *before* the signature
        was checked: a set replaced while that ran leaves an entry that never hits.
        """
        size = ENTRY_OVERHEAD_BYTES + sum(len(n) + len(v) for n, v in decision.headers)
        key = (digest, policy)
        if key in self._entries:
            self._drop(key)
        self._entries[key] = _Entry(
            decision=decision,
            valid_from=verified.claims.valid_from,
            valid_until=min(verified.claims.valid_until, until),
            deadline=self.clock.monotonic() + self.settings.max_seconds,
            keys=verified.keys,
            key_generation=verified.generation,
            size=size,
        )
        self.bytes += size
        while len(self._entries) > self.settings.max_entries or self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.size

    def _drop(self, key: tuple[bytes, str]) -> None:
        self.bytes -= self._entries.pop(key).size
