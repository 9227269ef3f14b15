"""The run's privacy ledger: every account (one per client for DP-SGD, one for client-level DP), planned
for the whole training, charged step by step, persisted in checkpoints, and summarized in the results.

Sample level (privacy.mode=sample): client i has q_i = b / N_i, delta_i = privacy.delta or 1 / N_i, and
sigma_i solved so that ALL planned steps (rounds x local steps, as if sampled every round) spend at most
the target epsilon. Client datasets are disjoint, so the run's record-level epsilon is max_i epsilon_i.
Client level (privacy.mode=client): one account with q = 1 (no sampling amplification is claimed) and
one release per round; delta = privacy.delta or 1 / number of clients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedsb.config import RunConfig
from fedsb.fed.sampling import clients_per_round
from fedsb.privacy.accounting import PrivacyAccount, plan_account
from fedsb.privacy.client_level import ClippedNoisyMean
from fedsb.privacy.dpsgd import DPSGD
from fedsb.seeding import derive_seed

SERVER_UNIT = "server"


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
                    delta=p.delta if p.delta is not None else 1.0 / n,
                    sample_rate=min(1.0, cfg.train.batch_size / n),
                    planned_steps=cfg.fed.rounds * steps_per_round[cid],
                    accountant=p.accountant,
                )
        elif p.mode == "client":
            accounts[SERVER_UNIT] = plan_account(
                unit=SERVER_UNIT,
                target_epsilon=p.target_epsilon,
                noise_multiplier=p.noise_multiplier,
                delta=p.delta if p.delta is not None else 1.0 / len(client_sizes),
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
        )

    # ---- client level: the round's aggregator ----------------------------------------------------------------
    def client_level_aggregator(self, reference: Mapping[str, torch.Tensor], round: int) -> ClippedNoisyMean:
        account = self.accounts[SERVER_UNIT]
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "client-dp-noise", round) % (2**63))
        return ClippedNoisyMean(
            reference,
            clip=self.clip_update,
            noise_multiplier=account.noise_multiplier,
            denominator=self.clients_per_round,
            generator=gen,
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
            "noise_multiplier_range": [min(sigmas), max(sigmas)] if sigmas else None,
            "max_grad_norm": self.max_grad_norm if self.mode == "sample" else None,
            "clip_update": self.clip_update if self.mode == "client" else None,
            "poisson_sampling": self.poisson if self.mode == "sample" else None,
            "caveat": "privacy.poisson=false: shuffled batches are accounted as if Poisson-sampled, so the "
            "stated epsilon is not a proven bound"
            if self.mode == "sample" and not self.poisson
            else None,
            "init": self.init_note,
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
                raise ValueError(f"checkpoint's privacy account {unit!r} does not match this run's plan")
        self.accounts = saved
        self.rounds = list(state["rounds"])
