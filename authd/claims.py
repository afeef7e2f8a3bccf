"""Verified claims: what a token says once every check has passed."""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass

_MISSING = object()
_NO_PAYLOAD: Mapping[str, object] = types.MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Claims:
    """The payload of a fully verified token, and the facts authd derived from it.

    Only :mod:`authd.verify` builds these, after the signature and every claim check
    passed; holding a ``Claims`` means "this token is valid for this issuer".
    """

    payload: Mapping[str, object]
    issuer_name: str
    iss: str
    kid: str
    alg: str
    exp: float
    valid_from: float  # the wall-clock window in which the time claims hold (leeway included)
    valid_until: float
    email: str  # "" for service tokens
    sub: str  # "" for service tokens
    service_token: str  # the service token's client id (common_name); "" for users

    def without_payload(self) -> Claims:
        """The same verified facts without the token's payload (for the decision cache)."""
        return Claims(
            _NO_PAYLOAD,
            self.issuer_name,
            self.iss,
            self.kid,
            self.alg,
            self.exp,
            self.valid_from,
            self.valid_until,
            self.email,
            self.sub,
            self.service_token,
        )

    @property
    def user(self) -> str:
        """Who is asking: the email of a user, the client id of a service token, or (an
        IAP, ALB or OIDC token without an email) the subject."""
        return self.email or self.service_token or self.sub

    def get(self, name: str) -> object | None:
        """Look a claim up by name; a dotted name walks nested objects.

        An exact claim name that contains dots (``https://example.com/roles``) wins
        over the walk when it exists.
        """
        return lookup(self.payload, name)


def lookup(payload: Mapping[str, object], name: str) -> object | None:
    """The claim ``name`` of ``payload`` (see :meth:`Claims.get`), or None."""
    value = payload.get(name, _MISSING)
    if value is not _MISSING:
        return value
    node: object = payload
    for part in name.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part, _MISSING)
        if node is _MISSING:
            return None
    return node


def string_list(value: object) -> tuple[str, ...]:
    """A claim read as a list of strings: a string is a one-element list; others are skipped."""
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str) and v)
    return ()
