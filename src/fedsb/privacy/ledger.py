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

from collections.abc import Callable, Mapping
from typing import Any

from fedsb.config import RunConfig
from fedsb.errors import CheckpointError
from fedsb.fed.sampling import clients_per_round
from fedsb.privacy.accounting import PrivacyAccount
from fedsb.privacy.delta import DEFAULT_DELTA_CAP, default_delta, delta_rule, resolve_delta
from fedsb.privacy.dpsgd import DPSGD
from fedsb.privacy.mechanism import ClientLevel, PrivacyMechanism, mechanism_named
from fedsb.privacy.noise import noise_statement

__all__ = [
    "DEFAULT_DELTA_CAP",
    "SERVER_UNIT",
    "PrivacyLedger",
    "default_delta",
    "init_coverage",
    "resolve_delta",
]

SERVER_UNIT = ClientLevel.SERVER_UNIT


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
        mechanism: PrivacyMechanism | str,
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
        head_clip_share: float | None = None,
    ) -> None:
        self.mechanism = mechanism_named(mechanism) if isinstance(mechanism, str) else mechanism
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
        self.head_clip_share = head_clip_share
        self.rounds: list[dict[str, Any]] = []

    @property
    def mode(self) -> str:
        """The mechanism's `privacy.mode` name."""
        return self.mechanism.name

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
        mechanism = p.mechanism
        return cls(
            mechanism,
            mechanism.plan_accounts(cfg, client_sizes, steps_per_round),
            max_grad_norm=p.max_grad_norm,
            clip_update=p.clip_update,
            poisson=p.poisson,
            clients_per_round=clients_per_round(len(client_sizes), cfg.fed.clients_per_round),
            seed=cfg.seed,
            client_sizes=client_sizes,
            init_note=init_coverage(init_info),
            reproducible_noise=p.reproducible_noise,
            delta_rule=delta_rule(p, mechanism.delta_population),
            head_clip_share=p.head_clip_share,
        )

    # ---- what the mechanism changes: the client's step, the server's aggregator ---------------------------
    def dpsgd_for(self, client_id: str) -> DPSGD | None:
        """The client step wrapping `client_id`'s optimizer (DP-SGD under record-level DP, else None)."""
        return self.mechanism.client_step(self, client_id)

    @property
    def aggregator(self) -> Callable[[Mapping[str, Any], int], Any] | None:
        """(global state, round) -> the round's aggregator where the mechanism replaces the method's."""
        return self.mechanism.aggregator(self)

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
            "unit": self.mechanism.unit,
            "accountant": next(iter(self.accounts.values())).accountant if self.accounts else None,
            "max_epsilon": max(eps, default=0.0),
            "delta": max((a["delta"] for a in accounts.values()), default=None),
            "delta_rule": self.delta_rule,
            "reproducible_noise": self.reproducible_noise,
            "noise": noise_statement(self.reproducible_noise),
            "noise_multiplier_range": [min(sigmas), max(sigmas)] if sigmas else None,
            **self.mechanism.summary_fields(self),
            "init": self.init_note,
            "released": self.mechanism.released(self.reproducible_noise),
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
