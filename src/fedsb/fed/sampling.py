"""Seeded client sampling: round t's clients depend only on (seed, t), so a resumed run samples the same."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedsb.errors import FedsbError


def clients_per_round(num_clients: int, per_round: float) -> int:
    """A fraction in (0, 1] of the clients (at least one), or a count (> 1, at most all)."""
    if per_round <= 0:
        raise FedsbError(
            field="fed.clients_per_round", value=per_round, fix="use a fraction in (0, 1] or a count"
        )
    if per_round <= 1:
        return max(1, round(per_round * num_clients))
    return min(num_clients, int(per_round))


class ClientSampler:
    """Samples clients without replacement with numpy's PCG64 seeded by (seed, round)."""

    def __init__(self, client_ids: Sequence[str], per_round: float, seed: int) -> None:
        if not client_ids:
            raise FedsbError(field="partition.num_clients", value=0, fix="use at least one client")
        self.client_ids = list(client_ids)
        self.per_round = per_round
        self.seed = seed
        self.k = clients_per_round(len(self.client_ids), per_round)

    def sample(self, round: int) -> list[str]:
        """The clients of round `round`, in id order."""
        if self.k == len(self.client_ids):
            return list(self.client_ids)
        rng = np.random.default_rng([self.seed, round, 0x5A17])
        idx = np.sort(rng.choice(len(self.client_ids), size=self.k, replace=False))
        return [self.client_ids[i] for i in idx]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "per_round": self.per_round, "num_clients": len(self.client_ids)}
