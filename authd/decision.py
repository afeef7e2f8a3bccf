"""One decision: policy, token, verification, rules, identity headers -> a :class:`Decision`.

Everything a request can end in is a ``Decision`` value; the HTTP resource and the
``verify`` command render the same value, so they cannot disagree.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Literal, TypeAlias

from authd.cache import DecisionCache
from authd.config import enriches
from authd.enrich import EnrichmentFailed, IdentityCache
from authd.errors import Denied, KeysUnavailable, Reason
from authd.headers import Found, HeaderPlan, token_digest, token_id
from authd.policy import Policy
from authd.verify import Verifier

if TYPE_CHECKING:
    import httpx

    from authd.claims import Claims
    from authd.config import Config, IssuerConfig, TokenSource
    from authd.enrich import Identity
    from authd.keys import Clock, KeyStore

ExcInfo: TypeAlias = tuple[type[BaseException], BaseException, TracebackType | None]
# Finds the request's token in the policy's sources: a Found, or the bare token when where
# it arrived is not known (``authd verify``): then every issuer the policy accepts may apply.
TokenFinder: TypeAlias = "Callable[[Sequence[TokenSource]], Found | str]"


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
    # get-identity: None when not asked; "fresh", "cached", "skipped: ..." or "failed: RESULT"
    enrichment: str | None = None
    identity: Identity | None = field(default=None, repr=False)  # for `authd verify`
    issuer_choice: str = ""  # why the token's issuer was the one chosen (`authd verify`)
    detail: str = ""  # for the log only, never the wire
    exc_info: ExcInfo | None = field(default=None, repr=False)

    @property
    def decision(self) -> Literal["allow", "deny", "error"]:
        if self.status == 200:
            return "allow"
        return "deny" if self.status < 500 else "error"


@dataclass(frozen=True, slots=True)
class PolicyPlan:
    """One policy compiled at startup: its rules and headers, the issuers it accepts, where
    their tokens arrive, and which of them get-identity is asked about."""

    headers: HeaderPlan
    issuers: tuple[IssuerConfig, ...]
    sources: tuple[TokenSource, ...]
    readers: Mapping[TokenSource, frozenset[str]]  # source -> names of the issuers reading it
    by_name: Mapping[str, IssuerConfig]  # the accepted issuers
    enriched: Mapping[str, IssuerConfig]  # issuer name -> issuer, for those enriched

    @property
    def policy(self) -> Policy:
        return self.headers.policy

    @classmethod
    def compile(cls, config: Config, policy: Policy) -> PolicyPlan:
        issuers = config.accepted_issuers(policy.config)
        sources = tuple({s.key: s for i in issuers for s in i.token_sources}.values())
        return cls(
            headers=HeaderPlan.for_policy(policy),
            issuers=issuers,
            sources=sources or config.token_sources,
            readers={s: frozenset(i.name for i in issuers if i.reads(s)) for s in sources},
            by_name={i.name: i for i in issuers},
            enriched={i.name: i for i in issuers if enriches(policy.config, i)},
        )

    def chooses(self, issuer_name: str, sources: Sequence[TokenSource] | None) -> bool:
        """Whether a token verified by ``issuer_name`` and arriving in ``sources`` would be
        given to that issuer again (:func:`authd.verify.choose_issuer`'s rule): it reads one
        of those places, and no other issuer reading them has the same ``iss``."""
        if sources is not None and len(sources) == 1:
            # The usual case, and a short one: two issuers reading one place never share
            # an iss (the configuration refuses that).
            return issuer_name in self.readers.get(sources[0], ())
        chosen = self.by_name.get(issuer_name)
        if chosen is None:
            return False
        if sources is None:
            readers: Iterable[str] = self.by_name
        else:
            readers = (name for s in sources for name in self.readers.get(s, ()))
        return {n for n in readers if self.by_name[n].issuer == chosen.issuer} == {issuer_name}


class Authorizer:
    """Decides requests for the configured policies, remembering allows in ``cache``."""

    def __init__(
        self,
        verifier: Verifier,
        plans: Mapping[str, PolicyPlan],
        cache: DecisionCache | None = None,
        identities: IdentityCache | None = None,
    ) -> None:
        self.verifier = verifier
        self.plans = dict(plans)
        self.cache = cache
        self.identities = identities

    @classmethod
    def from_config(
        cls,
        config: Config,
        keys: KeyStore,
        clock: Clock,
        client: httpx.AsyncClient | None = None,
    ) -> Authorizer:
        """Compile the policies and header plans once, at startup.

        ``client`` makes the get-identity calls of policies that enrich (none without it).
        """
        groups = {i.name: i.groups_claim for i in config.issuers}
        verifier = Verifier(
            issuers=config.issuers,
            keys=keys,
            clock=clock,
            leeway=config.leeway_seconds,
        )
        plans = {
            name: PolicyPlan.compile(config, Policy(p, groups))
            for name, p in config.policies.items()
        }
        cache = DecisionCache(config.cache, clock) if config.cache.enabled else None
        identities = None
        if any(p.enriched for p in plans.values()):
            # Imported here, not at the top: prometheus_client picks its multiprocess mode
            # when first imported, after the supervisor has set it up (see authd.metrics);
            # the command line imports this module long before.
            from authd import metrics  # noqa: PLC0415

            identities = IdentityCache(
                client,
                clock,
                max_seconds=config.cache.max_seconds,
                on_fetch=metrics.enrichment_fetch,
                on_hit=metrics.enrichment_cache_hit,
            )
        return cls(verifier, plans, cache, identities)

    async def decide(self, policy: str, find: TokenFinder, client: str = "") -> Decision:
        """Decide one request. Never raises: a failure is an ``error`` decision (500).

        ``client`` is the address nginx saw (X-Real-IP), for per-client limits.
        """
        tid: str | None = None
        claims: Claims | None = None  # kept for the audit line of a 403
        choice = ""
        enrichment: str | None = None
        try:
            plan = self.plans.get(policy)
            if plan is None:
                return Decision(
                    status=Reason.UNKNOWN_POLICY.status,
                    policy=policy,
                    reason=Reason.UNKNOWN_POLICY,
                    detail="nginx asked for a policy that is not configured",
                )
            found = find(plan.sources)
            token, sources = (found, None) if isinstance(found, str) else found
            digest = token_digest(token)
            tid = token_id(digest)
            if (
                self.cache is not None
                and (hit := self.cache.get(digest, policy)) is not None
                and hit.claims is not None
                # The same token where it would not go to that issuer is not that allow.
                and plan.chooses(hit.claims.issuer_name, sources)
            ):
                return hit
            verified = await self.verifier.verify_with_keys(
                token,
                plan.policy.config.audience,
                sources=sources,
                accepted=plan.issuers,
                client=client,
            )
            claims, choice = verified.claims, verified.chosen_because
            identity: Identity | None = None
            until = float("inf")  # how long get-identity's answer may be reused
            enriching = plan.enriched.get(claims.issuer_name)
            if enriching is not None:
                identity, enrichment, until = await self._enrich(
                    plan,
                    enriching,
                    token,
                    claims,
                    digest,
                )
            rule = plan.policy.evaluate(claims, identity)
            if identity is None:
                headers, note = plan.headers.render(claims), ""
            else:
                headers, note = plan.headers.render_enriched(claims, identity)
        except Denied as ex:
            return Decision(
                status=ex.reason.status,
                policy=policy,
                reason=ex.reason,
                claims=claims,
                token_id=tid,
                enrichment=enrichment,
                issuer_choice=choice,
                detail=ex.detail,
            )
        except KeysUnavailable as ex:
            return Decision(
                status=ex.reason.status,
                policy=policy,
                reason=ex.reason,
                token_id=tid,
                issuer_choice=choice,
                detail=str(ex),
            )
        except EnrichmentFailed as ex:  # and the policy fails closed: authd cannot decide
            return Decision(
                status=Reason.ENRICHMENT_UNAVAILABLE.status,
                policy=policy,
                reason=Reason.ENRICHMENT_UNAVAILABLE,
                claims=claims,
                token_id=tid,
                enrichment=f"failed: {ex.result}",
                issuer_choice=choice,
                detail=ex.detail,
            )
        except Exception:  # noqa: BLE001 -- fail closed: any bug is a 500, never a 200
            return Decision(
                status=Reason.INTERNAL_ERROR.status,
                policy=policy,
                reason=Reason.INTERNAL_ERROR,
                token_id=tid,
                exc_info=sys.exc_info(),  # type: ignore[arg-type]  # inside except: never None
            )
        # An allow without the enriched data it should have had is not worth keeping:
        # the next request asks get-identity again.
        if self.cache is not None and not enrichment_failed(enrichment):
            # What a hit needs, and no more: the payload (up to a few KiB) stays behind.
            hit = Decision(
                status=200,
                policy=policy,
                headers=headers,
                claims=claims.without_payload(),
                token_id=tid,
                rule=rule,
                cached=True,
                # A hit reuses get-identity's answer from the cache; a skip stays a skip.
                enrichment="cached" if enrichment == "fresh" else enrichment,
                detail=note,
            )
            self.cache.put(digest, policy, hit, verified, until=until)
        return Decision(
            status=200,
            policy=policy,
            headers=headers,
            claims=claims,
            token_id=tid,
            rule=rule,
            enrichment=enrichment,
            identity=identity,
            issuer_choice=choice,
            detail=note,
        )

    async def _enrich(
        self,
        plan: PolicyPlan,
        issuer: IssuerConfig,
        token: str,
        claims: Claims,
        digest: bytes,
    ) -> tuple[Identity | None, str, float]:
        """get-identity's answer for this token, what happened (for the audit line), and
        until when the answer may be reused.

        Raises :class:`EnrichmentFailed` when it failed and the policy fails closed.
        """
        if claims.service_token:
            return None, "skipped: service token", float("inf")
        if self.identities is None or issuer.get_identity_url is None:  # compiled together
            raise LookupError(f"no get-identity client for issuer {issuer.name}")
        try:
            enriched = await self.identities.identity(
                issuer.get_identity_url,
                issuer.get_identity_timeout_seconds,
                token,
                claims,
                digest,
            )
        except EnrichmentFailed as ex:
            if plan.policy.config.on_enrichment_failure == "deny":
                raise
            return None, f"failed: {ex.result}", float("inf")
        return enriched.identity, "cached" if enriched.cached else "fresh", enriched.until


def enrichment_failed(enrichment: str | None) -> bool:
    """An allow made without get-identity's answer, which it should have had."""
    return enrichment is not None and enrichment.startswith("failed")
