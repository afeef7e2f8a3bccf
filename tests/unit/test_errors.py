from authd.errors import ConfigError, Denied, Reason

# The closed vocabulary is a public contract (README, X-Authd-Reason, dashboards):
# changing it must be deliberate, so the whole table is spelled out here.
CONTRACT = {
    401: {
        "no_token",
        "ambiguous_token",
        "token_too_large",
        "malformed",
        "bad_header",
        "alg_not_allowed",
        "unknown_kid",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "issued_in_future",
        "bad_issuer",
        "bad_audience",
        "bad_type",
        "bad_claims",
        "unsafe_claim_value",
    },
    403: {"not_allowed", "requirement_failed", "unknown_policy"},
    503: {"keys_unavailable", "enrichment_unavailable"},
    500: {"internal_error"},
}


def test_reason_codes_and_their_statuses_are_the_documented_contract():
    actual: dict[int, set[str]] = {}
    for reason in Reason:
        actual.setdefault(reason.status, set()).add(reason.value)
    assert actual == CONTRACT


def test_denied_carries_reason_and_detail():
    ex = Denied(Reason.EXPIRED, "expired 5s ago")
    assert (ex.reason, ex.detail) == (Reason.EXPIRED, "expired 5s ago")
    assert "expired" in repr(ex)


def test_config_error_keeps_every_problem():
    ex = ConfigError(["a: x", "b: y"])
    assert ex.problems == ["a: x", "b: y"]
    assert str(ex) == "a: x\nb: y"
