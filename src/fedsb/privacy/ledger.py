"""The run's privacy ledger: every account (one per client for DP-SGD, one for client-level DP), planned
for the whole training, charged step by step, persisted in checkpoints, and summarized in the results.

Sample level (privacy.mode=sample): client i has q_i = b / N_i, delta_i = privacy.delta or
min(1e-5, 1 / (10 N_i)), and sigma_i solved so that ALL planned steps (rounds x local steps, as if sampled
every round) spend at most the target epsilon. Client datasets are disjoint, so the run's record-level
epsilon is max_i epsilon_i. Client level (privacy.mode=client): one account with q = 1 (no sampling
amplification is claimed) and one release per round; delta = privacy.delta or min(1e-5, 1 / (10 n)), n
the number of clients. A configured delta >= 1 / N (a mechanism that publishes one whole record with
probability delta satisfies it) is refused unless privacy.allow_large_delta=true.

The client sizes N_i are public parameters of the plan (q_i and delta_i are computed from them and written
to the manifest, as Opacus treats the dataset size): the count a client declares with its update is this
planned size, and the server rejects any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedsb.config import PrivacyConfig, RunConfig
from fedsb.errors import CheckpointError, ConfigError
from fedsb.fed.sampling import clients_per_round
from fedsb.privacy.accounting import PrivacyAccount, plan_account
from fedsb.privacy.client_level import ClippedNoisyMean
from fedsb.privacy.dpsgd import DPSGD
from fedsb.privacy.noise import noise_source, noise_statement
from fedsb.privacy.release import released_statement

SERVER_UNIT = "server"
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


def delta_rule(p: PrivacyConfig, mode: str) -> str:
    """The rule that chose every account's delta (recorded in the manifest)."""
    if p.delta is not None:
        return f"privacy.delta={p.delta:g} (configured" + (
            ", privacy.allow_large_delta=true)" if p.allow_large_delta else ", < 1/N)"
        )
    n = "N_i = the client's examples" if mode == "sample" else "N = the number of clients"
    return f"min(1e-5, 1/(10 N)), {n}"


def init_coverage(init_info: Mapping[str, Any]) -> str:
    """How the adapter initialization relates to the guarantee (stated in the results and the manifest)."""
    if init_info.get("federated", True):
        return "covered: the initialization touches no client data (server proxy data or data-free)"
    return (
        "NOT COVERED: the basis was computed from raw examples of the clients' pooled training data "
        "(init.source=pooled); the stated (epsilon, delta) does not cover the initialization"
    )


class PrivacyLedger:
    """All privacy accounts of a run and the per-round maximum epsilon."""

    def __init__(
        self,
        mode: str,
        accounts: dict[str, PrivacyAccount],
        *,
        max_grad_norm: float,
        clip_update: float,
        poisson: bool,
        clients_per_round: int,
        seed: int,
        client_sizes: Mapping[str, int],
        init_note: str = "",
        reproducible_noise: bool = False,
        delta_rule: str = "",
    ) -> None:
        self.mode = mode
        self.accounts = accounts
        self.max_grad_norm = max_grad_norm
        self.clip_update = clip_update
        self.poisson = poisson
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.client_sizes = dict(client_sizes)
        self.init_note = init_note
        self.reproducible_noise = reproducible_noise
        self.delta_rule = delta_rule
        self.rounds: list[dict[str, Any]] = []

    @classmethod
    def plan(
        cls,
        cfg: RunConfig,
        client_sizes: Mapping[str, int],
        steps_per_round: Mapping[str, int],
        *,
        init_info: Mapping[str, Any],
    ) -> PrivacyLedger:
        """Solve (or take) every account's noise multiplier for the whole planned training."""
        p = cfg.privacy
        accounts: dict[str, PrivacyAccount] = {}
        if p.mode == "sample":
            for cid, n in client_sizes.items():
                accounts[cid] = plan_account(
                    unit=cid,
                    target_epsilon=p.target_epsilon,
                    noise_multiplier=p.noise_multiplier,
                    delta=resolve_delta(p, n, of=f"client {cid} holds {n} examples"),
                    sample_rate=min(1.0, cfg.train.batch_size / n),
                    planned_steps=cfg.fed.rounds * steps_per_round[cid],
                    accountant=p.accountant,
                )
        elif p.mode == "client":
            accounts[SERVER_UNIT] = plan_account(
                unit=SERVER_UNIT,
                target_epsilon=p.target_epsilon,
                noise_multiplier=p.noise_multiplier,
                delta=resolve_delta(p, len(client_sizes), of=f"{len(client_sizes)} clients"),
                sample_rate=1.0,
                planned_steps=cfg.fed.rounds,
                accountant=p.accountant,
            )
        per_round = clients_per_round(len(client_sizes), cfg.fed.clients_per_round)
        return cls(
            p.mode,
            accounts,
            max_grad_norm=p.max_grad_norm,
            clip_update=p.clip_update,
            poisson=p.poisson,
            clients_per_round=per_round,
            seed=cfg.seed,
            client_sizes=client_sizes,
            init_note=init_coverage(init_info),
            reproducible_noise=p.reproducible_noise,
            delta_rule=delta_rule(p, p.mode),
        )

    # ---- sample level: the client's DP-SGD settings ----------------------------------------------------------
    def dpsgd_for(self, client_id: str) -> DPSGD | None:
        if self.mode != "sample":
            return None
        return DPSGD(
            self.accounts[client_id],
            max_grad_norm=self.max_grad_norm,
            num_examples=self.client_sizes[client_id],
            poisson=self.poisson,
            reproducible_noise=self.reproducible_noise,
        )

    # ---- client level: the round's aggregator ----------------------------------------------------------------
    def client_level_aggregator(self, reference: Mapping[str, torch.Tensor], round: int) -> ClippedNoisyMean:
        account = self.accounts[SERVER_UNIT]
        return ClippedNoisyMean(
            reference,
            clip=self.clip_update,
            noise_multiplier=account.noise_multiplier,
            denominator=self.clients_per_round,
            noise=noise_source(
                reproducible=self.reproducible_noise, seed=self.seed, purpose=["client-dp-noise", round]
            ),
            on_release=account.step,
        )

    # ---- reporting and persistence ---------------------------------------------------------------------------
    def end_round(self, round: int) -> dict[str, Any]:
        """Snapshot after round `round`: every account's epsilon so far and the maximum."""
        eps = {unit: acc.epsilon() for unit, acc in self.accounts.items()}
        entry = {"round": round, "max_epsilon": max(eps.values(), default=0.0), "epsilon": eps}
        self.rounds.append(entry)
        return entry

    def summary(self) -> dict[str, Any]:
        accounts = {unit: acc.to_dict() for unit, acc in self.accounts.items()}
        eps = [a["epsilon"] for a in accounts.values()]
        sigmas = [a["noise_multiplier"] for a in accounts.values()]
        return {
            "mode": self.mode,
            "unit": "one training example" if self.mode == "sample" else "one client's whole data",
            "accountant": next(iter(self.accounts.values())).accountant if self.accounts else None,
            "max_epsilon": max(eps, default=0.0),
            "delta": max((a["delta"] for a in accounts.values()), default=None),
            "delta_rule": self.delta_rule,
            "reproducible_noise": self.reproducible_noise,
            "noise": noise_statement(self.reproducible_noise),
            "noise_multiplier_range": [min(sigmas), max(sigmas)] if sigmas else None,
            "max_grad_norm": self.max_grad_norm if self.mode == "sample" else None,
            "clip_update": self.clip_update if self.mode == "client" else None,
            "poisson_sampling": self.poisson if self.mode == "sample" else None,
            "caveat": "privacy.poisson=false: shuffled batches are accounted as if Poisson-sampled, so the "
            "stated epsilon is not a proven bound"
            if self.mode == "sample" and not self.poisson
            else None,
            "init": self.init_note,
            "released": released_statement(self.mode, self.reproducible_noise),
            "client_sizes": dict(self.client_sizes),
            "accounts": accounts,
            "rounds": self.rounds,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "accounts": {u: a.to_dict(with_epsilon=False) for u, a in self.accounts.items()},
            "rounds": self.rounds,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = {u: PrivacyAccount.from_dict(d) for u, d in state["accounts"].items()}
        for unit, acc in saved.items():
            mine = self.accounts.get(unit)
            if mine is None or abs(mine.noise_multiplier - acc.noise_multiplier) > 1e-12:
                raise CheckpointError(
                    f"the checkpoint's privacy account {unit!r} (sigma {acc.noise_multiplier:.6g}) does not match "
                    "this run's plan; resume with the run's saved privacy settings and fed.rounds"
                )
        self.accounts = saved
        self.rounds = list(state["rounds"])
