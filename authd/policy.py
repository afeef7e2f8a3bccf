"""Policy rules: pure functions of verified claims, compiled once from the configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from authd.claims import string_list
from authd.config import ascii_lower
from authd.errors import Denied, Reason

if TYPE_CHECKING:
    from authd.claims import Claims
    from authd.config import PolicyConfig, Scalar
    from authd.enrich import Identity


@dataclass(frozen=True, slots=True)
class Policy:
    """One ``[policies.NAME]`` table, ready to evaluate."""

    config: PolicyConfig
    groups_claims: dict[str, str]  # issuer name -> where that issuer puts groups

    @property
    def name(self) -> str:
        return self.config.name

    def groups(self, claims: Claims, identity: Identity | None = None) -> tuple[str, ...]:
        """The user's groups: get-identity's full list when there is one, else the token's
        (from where its issuer puts them, ``groups_claim``; Cloudflare trims that one)."""
        if identity is not None:
            return identity.group_names()
        where = self.groups_claims.get(claims.issuer_name)
        return string_list(claims.get(where)) if where else ()

    def evaluate(self, claims: Claims, identity: Identity | None = None) -> str:
        """Return which rule admitted the token, or raise ``Denied`` (403).

        ``require_claims`` must all hold, and the requirements over get-identity's answer
        (``identity``); then any one ``allow_*`` list admits (a policy without any admits
        every valid token for its audience).
        """
        for name, allowed in self.config.require_claims:
            if not _satisfies(claims.get(name), allowed):
                raise Denied(Reason.REQUIREMENT_FAILED, f"require_claims.{name} not satisfied")
        if self.config.needs_identity:
            _check_identity(self.config, claims, identity)
        if self.config.admits_any:
            return "any_valid_token"
        rule = self._admitting_rule(claims, identity)
        if rule is None:
            raise Denied(Reason.NOT_ALLOWED, f"no allow_* list admits {claims.user!r}")
        return rule

    def _admitting_rule(self, claims: Claims, identity: Identity | None) -> str | None:
        c = self.config
        if claims.service_token:
            admitted = claims.service_token in c.allow_service_tokens
            return "allow_service_tokens" if admitted else None
        email = ascii_lower(claims.email)
        if email in c.allow_emails:
            return "allow_emails"
        # An address has exactly one "@" with something on both sides; anything else
        # ("example.com", "@example.com", "a@evil.org@example.com") is in no domain.
        local, at, domain = email.partition("@")
        if (
            at
            and local
            and domain
            and "@" not in domain
            and any(_domain_matches(domain, d) for d in c.allow_email_domains)
        ):
            return "allow_email_domains"
        if c.allow_groups:
            # get-identity's groups match by name or id; the token's by what it lists.
            held = identity.group_refs() if identity is not None else self.groups(claims)
            if not c.allow_groups.isdisjoint(held):
                return "allow_groups"
        return None


def _check_identity(c: PolicyConfig, claims: Claims, identity: Identity | None) -> None:
    """``require_posture``, ``require_idp_types`` and ``require_amr``: only get-identity's
    answer can satisfy them, so a token without one (a service token, another issuer's)
    is refused."""
    if identity is None:
        why = "a service token" if claims.service_token else f"issuer {claims.issuer_name}"
        raise Denied(
            Reason.REQUIREMENT_FAILED,
            f"the policy requires get-identity's answer, which {why} does not have",
        )
    for rule in c.require_posture:
        if not identity.posture_passed(rule):
            raise Denied(Reason.REQUIREMENT_FAILED, f"require_posture: {rule!r} did not pass")
    if c.require_idp_types and identity.idp_type not in c.require_idp_types:
        raise Denied(
            Reason.REQUIREMENT_FAILED,
            f"require_idp_types: idp.type is {identity.idp_type!r}",
        )
    if c.require_amr and c.require_amr.isdisjoint(identity.amr):
        raise Denied(Reason.REQUIREMENT_FAILED, f"require_amr: amr is {list(identity.amr)!r}")


def _domain_matches(domain: str, allowed: str) -> bool:
    """``example.com`` admits exactly that domain; ``.example.com`` admits it and its subdomains."""
    if allowed.startswith("."):
        return domain == allowed[1:] or domain.endswith(allowed)
    return domain == allowed


def _satisfies(value: object, allowed: tuple[Scalar, ...]) -> bool:
    """A claim satisfies a requirement when it, or any element of it, is an allowed value."""
    candidates = value if isinstance(value, list) else [value]
    return any(_same(c, a) for c in candidates for a in allowed)


def _same(claim: object, allowed: Scalar) -> bool:
    # Compare type and value: in Python True == 1, but a claim of true is not the number 1.
    return type(claim) is type(allowed) and claim == allowed
