"""delta of a privacy account: min(1e-5, 1 / (10 N)) by default, a configured delta >= 1 / N refused.

N is the number of units one account protects one of: a client's examples (record level), the clients
(client level). A mechanism that publishes one whole record with probability delta meets any delta >= 1/N,
so such a delta is refused unless privacy.allow_large_delta=true.
"""

from __future__ import annotations

from typing import Any

from fedsb.errors import ConfigError

PrivacyConfig = Any  # a fedsb.config.PrivacyConfig (not imported: fedsb.config imports the mechanisms)

DEFAULT_DELTA_CAP = 1e-5


def default_delta(n: int) -> float:
    """min(1e-5, 1 / (10 n)) for a unit protecting one of n records (or clients)."""
    return min(DEFAULT_DELTA_CAP, 1.0 / (10 * n))


def resolve_delta(p: PrivacyConfig, n: int, *, of: str) -> float:
    """privacy.delta, or the default rule; a delta >= 1/n is refused unless privacy.allow_large_delta."""
    if p.delta is None:
        return default_delta(n)
    if p.delta >= 1.0 / n and not p.allow_large_delta:
        raise ConfigError(
            field="privacy.delta",
            value=p.delta,
            what=f"is >= 1/N = 1/{n} ({of}): a mechanism that publishes a whole record with probability "
            "delta would meet it",
            fix=f"use privacy.delta <= {default_delta(n):.3g} (or null for min(1e-5, 1/(10 N))), or set "
            "privacy.allow_large_delta=true to accept it knowingly",
        )
    return float(p.delta)


def delta_rule(p: PrivacyConfig, population: str) -> str:
    """The rule that chose every account's delta (recorded in the manifest); `population` names N."""
    if p.delta is not None:
        return f"privacy.delta={p.delta:g} (configured" + (
            ", privacy.allow_large_delta=true)" if p.allow_large_delta else ", < 1/N)"
        )
    return f"min(1e-5, 1/(10 N)), {population}"
