"""What may leave a private client, and the statement of what a DP run released under which guarantee.

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

from fedsb.privacy.noise import noise_statement

#: per privacy mode, the client metrics covered by the accounting (None: everything, no DP)
ACCOUNTED_METRICS: dict[str, tuple[str, ...] | None] = {
    "none": None,
    "sample": ("epsilon", "noise_multiplier", "dp_steps"),
    "client": (),
}

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
    the declared count and the metrics the accountant covers."""

    accounted: tuple[str, ...] | None = None

    @classmethod
    def for_mode(cls, mode: str) -> ReleaseRules:
        return cls(ACCOUNTED_METRICS[mode])

    @property
    def private(self) -> bool:
        return self.accounted is not None

    def metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """A client's metrics as the server may record them."""
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


def releasable_metrics(mode: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics a client may send under privacy mode `mode` (all of them without DP)."""
    return ReleaseRules.for_mode(mode).metrics(metrics)


def released_statement(mode: str, reproducible_noise: bool) -> dict[str, Any]:
    """results.json's account of what a DP run released, to whom, and under which guarantee."""
    against = (
        "NOT against a reader of config.yaml or manifest.json: the noise is derived from the published seed "
        "(privacy.reproducible_noise=true)"
        if reproducible_noise
        else "a reader of everything the run writes (config, manifest, results, checkpoints, exports)"
    )
    if mode == "sample":
        return {
            "guarantee": "record-level (epsilon, delta)-DP for each client's training examples, composed over "
            "all of its DP-SGD steps; the run's epsilon is the maximum over clients (disjoint data)",
            "from_each_client": [
                "its trained tensors after DP-SGD (per-example clipping at privacy.max_grad_norm in fp32, "
                "Gaussian noise)",
                "its declared example count: the planned size N_i (public: the plan's q_i = b/N_i)",
                "its accountant's state (epsilon, noise multiplier, DP steps): functions of the public plan",
            ],
            "kept_on_clients": KEPT_ON_CLIENTS,
            "not_written": NOT_WRITTEN,
            "published": "the global state after every round and the final model (post-processing of the "
            "privatized updates), the per-round epsilons",
            "noise": noise_statement(reproducible_noise),
            "holds_against": against,
        }
    return {
        "guarantee": "client-level (epsilon, delta)-DP (one client's whole data) for everything the server "
        "publishes; the server is trusted with the unnoised updates it clips and noises",
        "from_each_client": [
            "its trained tensors, unnoised, to the trusted server, which clips each update to "
            "privacy.clip_update and adds Gaussian noise to their sum (uniform weights)",
            "its declared example count (public: the planned partition), not used for weighting",
        ],
        "kept_on_clients": KEPT_ON_CLIENTS,
        "not_written": NOT_WRITTEN,
        "published": "the noisy global state after every round and the final model, the per-round epsilons",
        "noise": noise_statement(reproducible_noise),
        "holds_against": against,
    }
