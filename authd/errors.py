"""The closed vocabulary of outcomes: reason codes, denials and failures.

Two branches, as in PyJWT: :class:`Denied` means the *request* is bad (an expected
outcome with a stable reason code), :class:`AuthdError` means authd itself cannot
decide (a 5xx that nginx turns into a 500, failing closed).
"""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """Why a request was denied or could not be decided.

    The values go on the wire (``X-Authd-Reason``) and into the audit log, so they
    are a public contract: add one only with a changelog entry.
    """

    # 401: no valid token
    NO_TOKEN = "no_token"
    AMBIGUOUS_TOKEN = "ambiguous_token"
    TOKEN_TOO_LARGE = "token_too_large"
    MALFORMED = "malformed"
    BAD_HEADER = "bad_header"
    ALG_NOT_ALLOWED = "alg_not_allowed"
    UNKNOWN_KID = "unknown_kid"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    ISSUED_IN_FUTURE = "issued_in_future"
    BAD_ISSUER = "bad_issuer"
    BAD_AUDIENCE = "bad_audience"
    BAD_TYPE = "bad_type"
    BAD_CLAIMS = "bad_claims"
    UNSAFE_CLAIM_VALUE = "unsafe_claim_value"
    # 403: a valid token that the policy refuses
    NOT_ALLOWED = "not_allowed"
    REQUIREMENT_FAILED = "requirement_failed"
    UNKNOWN_POLICY = "unknown_policy"
    # 5xx: authd cannot decide
    KEYS_UNAVAILABLE = "keys_unavailable"
    ENRICHMENT_UNAVAILABLE = "enrichment_unavailable"
    INTERNAL_ERROR = "internal_error"

    @property
    def status(self) -> int:
        """The HTTP status this reason is answered with: decided here and nowhere else."""
        return _STATUS[self]


_STATUS: dict[Reason, int] = {
    **dict.fromkeys(Reason, 401),
    Reason.NOT_ALLOWED: 403,
    Reason.REQUIREMENT_FAILED: 403,
    Reason.UNKNOWN_POLICY: 403,
    Reason.KEYS_UNAVAILABLE: 503,
    Reason.ENRICHMENT_UNAVAILABLE: 503,
    Reason.INTERNAL_ERROR: 500,
}


class Denied(Exception):  # noqa: N818 -- an outcome, not an error: "DeniedError" would lie
    """The request is refused: ``reason`` goes on the wire, ``detail`` only to the log.

    ``detail`` must never contain the token or any part of it.
    """

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(reason.value, detail)
        self.reason = reason
        self.detail = detail

    def __repr__(self) -> str:
        return f"Denied({self.reason.value!r}, {self.detail!r})"


class AuthdError(Exception):
    """authd cannot do its job (as opposed to: the request is bad)."""


class KeysUnavailable(AuthdError):  # noqa: N818 -- named after the reason code it carries
    """The token names an issuer for which no usable key set is held (cold start, too stale)."""

    reason = Reason.KEYS_UNAVAILABLE

    def __init__(self, issuer: str, detail: str) -> None:
        super().__init__(f"{issuer}: {detail}")
        self.issuer = issuer
        self.detail = detail


class FetchError(AuthdError):
    """Fetching or parsing a key set failed; the last good set stays in use."""


class BodyTooLarge(FetchError):  # noqa: N818 -- a FetchError: the name says which one
    """An answer was larger than its cap (declared, or as it arrived)."""


class ConfigError(AuthdError):
    """The configuration is invalid; ``problems`` lists every problem, each with its TOML path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
