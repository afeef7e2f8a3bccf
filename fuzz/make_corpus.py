# ruff: noqa: INP001 -- a script directory, not a package
"""Write the seed corpus of fuzz/fuzz_auth.py: valid and near-valid inputs of every mode.

    .venv/bin/python fuzz/make_corpus.py fuzz/corpus

The tokens are signed with the fuzz target's public test keys (derived from fixed seeds),
so they verify in the target; they are valid at its fixed clock only, and secret nowhere.
A file's first byte is the target's mode: 0 raw (then the policy), 1 structured, 2 headers.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from fuzz_auth import (
    NOW,
    OTHER_AUD,
    POLICY_NAMES,
    SERVICE_TOKEN,
    Target,
    claims,
    quiet_logging,
    sign,
)


def seeds(target: Target) -> list[bytes]:
    rs256, es256, eddsa, foreign, foreign_kid, *_ = target.keys.signers
    wiki, open_, de = (bytes([POLICY_NAMES.index(p)]) for p in ("wiki", "open", "de"))
    service = claims(common_name=SERVICE_TOKEN, sub="")
    del service["email"]
    raw = {
        wiki: [
            sign(rs256, claims()),
            sign(es256, claims()),
            sign(eddsa, claims()),
            sign(rs256, service),
            sign(rs256, claims(email="mallory@evil.org")),
            sign(rs256, claims(exp=int(NOW) - 31)),
            sign(rs256, claims(nbf=int(NOW) + 31)),
            sign(rs256, claims(type="org")),
            sign(rs256, claims(aud=[OTHER_AUD])),
            sign(foreign, claims()),
            sign(foreign_kid, claims()),
            sign(rs256, claims(), header={"alg": "RS256", "kid": target.keys.rsa_kid}),
        ],
        open_: [sign(eddsa, claims(aud=OTHER_AUD))],
        de: [sign(es256, claims(country=["NL", "DE"])), sign(es256, claims(country="NL"))],
    }
    out = [b"\x00" + policy + t.encode() for policy, tokens in raw.items() for t in tokens]
    # Structured and header modes: a few starting points; the fuzzer finds the rest.
    out += [b"\x01" + bytes(range(n, n + 64)) for n in (0, 64, 128)]
    out += [b"\x02" + bytes([n] * 48) for n in (1, 3, 7)]
    return out


def main() -> None:
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "corpus")
    directory.mkdir(parents=True, exist_ok=True)
    quiet_logging()
    for seed in seeds(Target()):
        (directory / hashlib.sha1(seed).hexdigest()).write_bytes(seed)  # noqa: S324 -- a name


if __name__ == "__main__":
    main()
