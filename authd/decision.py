"""One decision: policy, token, verification, rules, identity headers -> a :class:`Decision`.

Everything a request can end in is a ``Decision`` value; the HTTP resource and the
``verify`` command render the same value, so they cannot disagree.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Literal, TypeAlias

from authd.cache import DecisionCache
from authd.errors import Denied, KeysUnavailable, Reason
from authd.headers import HeaderPlan, token_digest, token_id
from authd.policy import Policy
from authd.verify import Verifier

if TYPE_CHECKING:
    from authd.claims import Claims
    from authd.config import Config
    from authd.keys import Clock, KeyStore

ExcInfo: TypeAlias = tuple[type[BaseException], BaseException, TracebackType | None]


@dataclass(frozen=True, slots=True)
class Decision:
    status: int
    policy: str
    reason: Reason | None = None
    headers: tuple[tuple[str, str], ...] = ()  # identity headers, on allow only
    claims: Claims | None = None
    token_id: str | None = None
    rule: str | None = None  # which rule admitted the token
    cached: bool = False  # an allow served from the decision cache
    detail: str = ""  # for the log only, never the wire
    exc_info: ExcInfo | None = field(default=None, repr=False)

    @property
    def decision(self) -> Literal["allow", "deny", "error"]:
        if self.status == 200:
            return "allow"
        return "deny" if self.status < 500 else "error"


class Authorizer:
    """Decides requests for the configured policies, remembering allows in ``cache``."""

    def __init__(
        self,
        verifier: Verifier,
        plans: Mapping[str, HeaderPlan],
        cache: DecisionCache | None = None,
    ) -> None:
        self.verifier = verifier
        self.plans = dict(plans)
        self.cache = cache

    @classmethod
    def from_config(cls, config: Config, keys: KeyStore, clock: Clock) -> Authorizer:
        """Compile the policies and header plans once, at startup."""
        groups = {i.name: i.groups_claim for i in config.issuers}
        verifier = Verifier(
            issuers={i.issuer: i for i in config.issuers},
            keys=keys,
            clock=clock,
            leeway=config.leeway_seconds,
        )
        plans = {
            name: HeaderPlan.for_policy(Policy(p, groups)) for name, p in config.policies.items()
        }
        cache = DecisionCache(config.cache, clock) if config.cache.enabled else None
        return cls(verifier, plans, cache)

    async def decide(self, policy: str, get_token: Callable[[], str]) -> Decision:
        """Decide one request. Never raises: a failure is an ``error`` decision (500)."""
        tid: str | None = None
        claims: Claims | None = None  # kept for the audit line of a 403
        try:
            plan = self.plans.get(policy)
            if plan is None:
                return Decision(
                    status=Reason.UNKNOWN_POLICY.status,
                    policy=policy,
                    reason=Reason.UNKNOWN_POLICY,
                    detail="nginx asked for a policy that is not configured",
                )
            token = get_token()
            digest = token_digest(token)
            tid = token_id(digest)
            if self.cache is not None and (hit := self.cache.get(digest, policy)) is not None:
                return hit
            verified = await self.verifier.verify_with_keys(token, plan.policy.config.audience)
            claims = verified.claims
            rule = plan.policy.evaluate(claims)
            headers = plan.render(claims)
        except Denied as ex:
            return Decision(
                status=ex.reason.status,
                policy=policy,
                reason=ex.reason,
                claims=claims,
                token_id=tid,
                detail=ex.detail,
            )
        except KeysUnavailable as ex:
            return Decision(
                status=ex.reason.status,
                policy=policy,
                reason=ex.reason,
                token_id=tid,
                detail=str(ex),
            )
        except Exception:  # noqa: BLE001 -- fail closed: any bug is a 500, never a 200
            return Decision(
                status=Reason.INTERNAL_ERROR.status,
                policy=policy,
                reason=Reason.INTERNAL_ERROR,
                token_id=tid,
                exc_info=sys.exc_info(),  # type: ignore[arg-type]  # inside except: never None
            )
        if self.cache is not None:
            # What a hit needs, and no more: the payload (up to a few KiB) stays behind.
            hit = Decision(
                status=200,
                policy=policy,
                headers=headers,
                claims=claims.without_payload(),
                token_id=tid,
                rule=rule,
                cached=True,
            )
            self.cache.put(digest, policy, hit, verified)
        return Decision(
            status=200,
            policy=policy,
            headers=headers,
            claims=claims,
            token_id=tid,
            rule=rule,
        )
