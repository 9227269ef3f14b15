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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedsb.privacy.noise import noise_statement

#: per privacy mode, the client metrics covered by the accounting (None: everything, no DP)
ACCOUNTED_METRICS: dict[str, tuple[str, ...] | None] = {
    "none": None,
    "sample": ("epsilon", "noise_multiplier", "dp_steps"),
    "client": (),
}

KEPT_ON_CLIENTS = ["training losses (loss, first_loss)", "timings (seconds)", "optimizer state"]


def releasable_metrics(mode: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics a client may send under privacy mode `mode` (all of them without DP)."""
    keep = ACCOUNTED_METRICS[mode]
    return dict(metrics) if keep is None else {k: v for k, v in metrics.items() if k in keep}


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
        "published": "the noisy global state after every round and the final model, the per-round epsilons",
        "noise": noise_statement(reproducible_noise),
        "holds_against": against,
    }
