"""The federated init's privacy cost, composed into each participating client's account.

Under privacy.mode=sample, client i's init releases (1 for init.exchange=dense, 2 for sketch) are Gaussian
mechanisms of L2 sensitivity C = init.clip_norm per example with noise multiplier sigma_0 =
init.noise_multiplier, on a fixed subset of its examples (sampling rate 1: no amplification claimed;
`fedsb.init.federated` states the sensitivity). They come first in its account's history:

    history_i = [(sigma_0, 1, releases), (sigma_i, q_i, steps), ...]

so every epsilon the run reports includes the init. With privacy.target_epsilon, sigma_i is solved again so
that the init AND all planned training steps together spend at most the target (bisection on the
accountant's epsilon, to 1e-3 relative in sigma); with privacy.noise_multiplier it stays as given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedsb.errors import ConfigError
from fedsb.privacy.accounting import PrivacyAccount, epsilon_of


def charge_federated_init(ledger: Any, info: Mapping[str, Any]) -> None:
    """Prepend the init's releases to each participating client's account (a `PrivacyLedger`)."""
    priv = info.get("privacy")
    if priv is None:
        return
    entry = (float(priv["noise_multiplier"]), float(priv["sample_rate"]), int(info["releases"]))
    for cid in info["clients"]:
        acc = ledger.accounts[cid]
        acc.history.insert(0, entry)
        if acc.target_epsilon is not None:
            acc.noise_multiplier = solve_after_init(acc, entry)
    ledger.init_note = (
        f"covered: federated init ({info['exchange']}, {entry[2]} Gaussian release(s) per client with "
        f"noise multiplier {entry[0]:g}, per-example clip {priv['clip_norm']:g}), composed into each "
        "participating client's account"
    )


def planned_epsilon(acc: PrivacyAccount, init: tuple[float, float, int], sigma: float) -> float:
    """Epsilon of the init followed by all planned training steps at noise multiplier `sigma`."""
    return epsilon_of([init, (sigma, acc.sample_rate, acc.planned_steps)], acc.delta, acc.accountant)


def solve_after_init(acc: PrivacyAccount, init: tuple[float, float, int]) -> float:
    """The smallest training sigma (to 1e-3 relative) with epsilon(init + planned steps) <= the target."""
    target = float(acc.target_epsilon)  # type: ignore[arg-type]
    if epsilon_of([init], acc.delta, acc.accountant) >= target:
        raise ConfigError(
            field="init.noise_multiplier",
            value=init[0],
            what=f"makes the federated init alone spend privacy.target_epsilon={target:g} of {acc.unit}",
            fix="raise init.noise_multiplier or privacy.target_epsilon",
        )
    lo, hi = acc.noise_multiplier, acc.noise_multiplier * 1.25  # the training-only sigma is a lower bound
    while planned_epsilon(acc, init, hi) > target:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ConfigError(field="privacy.target_epsilon", value=target, fix="raise the target epsilon")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if planned_epsilon(acc, init, mid) > target else (lo, mid)
    return hi
