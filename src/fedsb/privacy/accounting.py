"""Privacy accounting through Opacus' accountants: solve sigma for a target epsilon, compose, report.

One accountant per privacy unit (a client under DP-SGD, the server under client-level DP) persists over
all rounds; its history of (sigma, sample_rate, steps) is what a checkpoint stores.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedsb.errors import ConfigError

ACCOUNTANTS = ("prv", "rdp")
PRV_RESOLUTION = 0.02  # Opacus' PRV accountant reports epsilon to within ~0.01


@contextlib.contextmanager
def _quiet_accounting() -> Iterator[None]:
    """Silence the accountants' numerical chatter (RDP's 'largest alpha', PRV's log(0) at q = 1)."""
    import numpy as np

    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def make_accountant(name: str) -> IAccountant:
    """A fresh Opacus accountant: 'prv' (PRV, Opacus' default) or 'rdp'."""
    if name not in ACCOUNTANTS:
        raise ConfigError(field="privacy.accountant", value=name, fix=f"use one of: {', '.join(ACCOUNTANTS)}")
    return create_accountant(mechanism=name)


def solve_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    field_name: str = "privacy.target_epsilon",
) -> float:
    """The smallest sigma (to Opacus' 0.01 epsilon tolerance) with epsilon(sigma, q, steps, delta) <= target."""
    if accountant == "prv" and target_epsilon < PRV_RESOLUTION:
        raise ConfigError(
            field=field_name,
            value=target_epsilon,
            what=f"is below the PRV accountant's resolution ({PRV_RESOLUTION})",
            fix="raise the target epsilon, or use privacy.accountant=rdp",
        )
    try:
        with _quiet_accounting():
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise ConfigError(
            field=field_name,
            value=target_epsilon,
            what=f"cannot be met with delta={delta:.3g}, sampling rate {sample_rate:.4g} and {steps} steps ({exc})",
            fix="raise the target epsilon or delta, or train fewer steps (rounds, local steps) or with a "
            "smaller sampling rate",
        ) from None
    if not math.isfinite(sigma):
        raise ConfigError(field=field_name, value=target_epsilon, fix="raise the target epsilon")
    return float(sigma)


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon at `delta` after the composed mechanisms of `history` (0.0 before any step)."""
    if not history:
        return 0.0
    if any(float(sigma) <= 0 for sigma, _, _ in history):
        return math.inf  # a release without noise: no finite guarantee
    acc = make_accountant(accountant)
    acc.history = [tuple(h) for h in history]
    with _quiet_accounting():
        return float(acc.get_epsilon(delta=delta))


@dataclass
class PrivacyAccount:
    """One privacy unit's budget: its mechanism parameters and the steps it has taken so far.

    `history` holds Opacus' compressed (sigma, sample_rate, num_steps) triples; `planned_steps` is what the
    noise multiplier was solved for (every round), so epsilon(now) <= epsilon(planned) <= the target.
    """

    unit: str
    noise_multiplier: float
    sample_rate: float
    delta: float
    accountant: str
    planned_steps: int
    target_epsilon: float | None = None
    history: list[tuple[float, float, int]] = field(default_factory=list)
    _epsilon_cache: tuple[tuple, float] | None = field(default=None, repr=False, compare=False)

    @property
    def steps(self) -> int:
        return sum(int(h[2]) for h in self.history)

    def step(self, count: int = 1) -> None:
        """Record `count` releases of the mechanism (Opacus' history compression)."""
        sigma, q = self.noise_multiplier, self.sample_rate
        if self.history and self.history[-1][0] == sigma and self.history[-1][1] == q:
            self.history[-1] = (sigma, q, self.history[-1][2] + count)
        else:
            self.history.append((sigma, q, count))

    def epsilon(self) -> float:
        """Epsilon at this account's delta so far; computed once per history (PRV takes ~0.1-0.5 s)."""
        key = (tuple(self.history), self.delta, self.accountant)
        if self._epsilon_cache is None or self._epsilon_cache[0] != key:
            self._epsilon_cache = (key, epsilon_of(self.history, self.delta, self.accountant))
        return self._epsilon_cache[1]

    def to_dict(self, *, with_epsilon: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "unit": self.unit,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "accountant": self.accountant,
            "planned_steps": self.planned_steps,
            "target_epsilon": self.target_epsilon,
            "steps": self.steps,
            "history": [list(h) for h in self.history],
        }
        if with_epsilon:
            out["epsilon"] = self.epsilon()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrivacyAccount:
        return cls(
            unit=d["unit"],
            noise_multiplier=float(d["noise_multiplier"]),
            sample_rate=float(d["sample_rate"]),
            delta=float(d["delta"]),
            accountant=d["accountant"],
            planned_steps=int(d["planned_steps"]),
            target_epsilon=d.get("target_epsilon"),
            history=[(float(s), float(q), int(n)) for s, q, n in d.get("history", [])],
        )


def plan_account(
    *,
    unit: str,
    target_epsilon: float | None,
    noise_multiplier: float | None,
    delta: float,
    sample_rate: float,
    planned_steps: int,
    accountant: str,
) -> PrivacyAccount:
    """An account whose sigma is given, or solved so that all `planned_steps` together spend the target."""
    if noise_multiplier is None:
        assert target_epsilon is not None
        noise_multiplier = solve_noise_multiplier(
            target_epsilon=target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=planned_steps,
            accountant=accountant,
        )
    return PrivacyAccount(
        unit=unit,
        noise_multiplier=float(noise_multiplier),
        sample_rate=float(sample_rate),
        delta=float(delta),
        accountant=accountant,
        planned_steps=int(planned_steps),
        target_epsilon=target_epsilon,
    )
