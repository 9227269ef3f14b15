"""What may leave a private client and what the server may write about it (each mechanism's statement of
what it released, under which guarantee, is `PrivacyMechanism.released`).

Under any DP mode a client's reply (the simulator's `ClientUpdate` and the Flower ClientApp's reply, which
is built from it) carries its uploaded tensors, its declared example count and, under DP-SGD, its
accountant's state -- nothing else:

* mode=sample: the tensors are privatized inside the client (DP-SGD). The example count is the planned
  size N_i, a public parameter of the privacy plan (q_i = b / N_i and delta_i come from it; the manifest
  lists it); the server rejects any other count. epsilon, sigma and the step count are functions of that
  public plan.
* mode=client: the server is trusted: it receives each client's unnoised tensors, clips them and noises
  their sum (DP-FedAvg). What it publishes (global state, results, checkpoints) is covered; it writes no
  per-client value but the declared (public) size, and aggregates with uniform weights.

A client's losses, first loss and timings stay on the client (logged there at debug level): they are
functions of its data that no mechanism privatizes. Without DP every metric is sent as before.

The server applies the same rules to what it writes (`ReleaseRules`: results.json, checkpoints, logs),
whatever a client sent: a private client's record holds its declared count and the accounted metrics; a
rejection names the failed check, not a value computed from the update; the round's timings keep only the
server's own phases (the time spent waiting for a private client is its training time); the manifest's
partition keeps the clients' sizes (the plan's public N_i) but not their label histograms.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KEPT_ON_CLIENTS = ["training losses (loss, first_loss)", "timings (seconds)", "optimizer state"]
#: what the server does not write about a private client, whatever the client sent
NOT_WRITTEN = [
    "any client metric the accountant does not cover (losses, timings), even if a client sends it",
    "values computed from a rejected update (a rejection names the failed check only)",
    "per-round client and total times (the run's total wall time is written)",
    "the clients' label histograms (their sizes are the plan's public N_i)",
]

#: the phases of a round the server times itself, with no client's training in them
SERVER_PHASES = ("aggregate", "eval", "checkpoint")

WITHHELD_TIMING = (
    "withheld under DP: a round's client and total times are the private clients' training times "
    "(only the server's own phases and the run's total wall time are written)"
)


@dataclass(frozen=True)
class ReleaseRules:
    """What the server may write about its clients: everything without DP (`accounted=None`), else only
    the declared count and the metrics the accountant covers (`PrivacyMechanism.release`)."""

    accounted: tuple[str, ...] | None = None

    @property
    def private(self) -> bool:
        return self.accounted is not None

    def metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """A client's metrics as it may send them and the server may record them."""
        keep = self.accounted
        return dict(metrics) if keep is None else {k: v for k, v in metrics.items() if k in keep}

    def round_seconds(self, seconds: Mapping[str, float]) -> dict[str, float]:
        """A round's timings as the server may record them (under DP its own phases only)."""
        return dict(seconds) if not self.private else {k: v for k, v in seconds.items() if k in SERVER_PHASES}

    def partition(self, stats: Mapping[str, Any]) -> dict[str, Any]:
        """The partition statistics for the manifest (under DP the sizes, not the label histograms)."""
        if not self.private or "histograms" not in stats:
            return dict(stats)
        out = {k: v for k, v in stats.items() if k != "histograms"}
        out["histograms"] = "withheld under DP (each is a function of a client's labels)"
        return out


def holds_against(reproducible_noise: bool) -> str:
    """Whom the stated guarantee holds against (not a reader of the config when the noise is seeded)."""
    if reproducible_noise:
        return (
            "NOT against a reader of config.yaml or manifest.json: the noise is derived from the published seed "
            "(privacy.reproducible_noise=true)"
        )
    return "a reader of everything the run writes (config, manifest, results, checkpoints, exports)"
