"""What one round released, as flat numbers: the source of the per-round log line and of every tracker.

`round_metrics` reads a finished `RoundRecord`, the communication ledger and the privacy mode. Under DP
(`privacy.mode` sample or client) the clients' losses never reach the server (`fedsb.privacy.release`):
`loss` is then None and `loss_withheld` True, and `client_scalars` keeps only what a private client may
send (`ReleaseRules.metrics`) plus its declared (public) example count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedsb.privacy.release import ReleaseRules


@dataclass
class RoundMetrics:
    """One round's released figures (`round` 0 is the untuned model's evaluation)."""

    round: int
    rounds: int
    sampled: int = 0
    accepted: int = 0
    rejected: int = 0
    dropped: int = 0
    loss: float | None = None  # the examples-weighted mean training loss; None: none released
    loss_withheld: bool = False  # under DP: the clients keep their losses
    eval: dict[str, float] = field(default_factory=dict)  # flat numeric evaluation metrics
    bytes_round: int = 0  # up + down this round, at the wire dtype
    bytes_total: int = 0  # up + down of every round so far
    epsilon: float | None = None  # the run's max epsilon after this round (private runs)
    seconds: float = 0.0  # this round's wall time (training, evaluation, checkpoint)
    clients: dict[str, dict[str, float]] = field(default_factory=dict)  # per client, releasable only

    def scalars(self) -> dict[str, float]:
        """Flat `group/name` -> value, what trackers log at step `round` (absent values are left out)."""
        out: dict[str, float] = {}
        if self.round > 0:
            out.update(
                {
                    "clients/sampled": self.sampled,
                    "clients/accepted": self.accepted,
                    "clients/rejected": self.rejected,
                    "clients/dropped": self.dropped,
                }
            )
        if self.loss is not None:
            out["train/loss"] = self.loss
        out.update({f"eval/{k}": v for k, v in self.eval.items()})
        if self.round > 0:
            out.update({"comm/bytes_round": self.bytes_round, "comm/bytes_total": self.bytes_total})
        if self.epsilon is not None:
            out["privacy/epsilon"] = self.epsilon
        if self.round > 0:
            out["time/round_seconds"] = self.seconds
        return out


def flat_eval(result: Mapping[str, Any] | None) -> dict[str, float]:
    """The numeric entries of an evaluation dict, one level of nesting flattened (`per_category/add`)."""
    out: dict[str, float] = {}
    for key, value in (result or {}).items():
        if _number(value):
            out[key] = float(value)
        elif isinstance(value, Mapping):
            out.update({f"{key}/{k}": float(v) for k, v in value.items() if _number(v)})
    return out


def round_metrics(
    record: Any,
    *,
    rounds: int,
    ledger: Any,
    release: ReleaseRules | None = None,
    bytes_before: int | None = None,
) -> RoundMetrics:
    """The released figures of a finished round (`record`: a `fedsb.fed.rounds.RoundRecord`; `release`: the
    privacy mechanism's rules, everything without DP).

    `bytes_before`: the ledger's bytes of the earlier rounds, if the caller keeps that sum (else counted
    here); this round's are the ledger's last entries (it records rounds in order).
    """
    release = release or ReleaseRules()
    private = release.private
    loss = None if private or not _finite(record.train_loss) else float(record.train_loss)
    bytes_round = 0
    for entry in reversed(ledger.entries):
        if entry["round"] != record.round:
            break
        bytes_round += entry["bytes"]
    if bytes_before is None:
        bytes_before = sum(e["bytes"] for e in ledger.entries if e["round"] < record.round)
    bytes_total = bytes_before + bytes_round
    seconds = record.seconds
    return RoundMetrics(
        round=record.round,
        rounds=rounds,
        sampled=len(record.sampled),
        accepted=len(record.accepted),
        rejected=len(record.rejected),
        dropped=len(record.dropped),
        loss=loss,
        loss_withheld=private,
        eval=flat_eval(record.eval),
        bytes_round=bytes_round,
        bytes_total=bytes_total,
        epsilon=(record.privacy or {}).get("max_epsilon") if private else None,
        seconds=sum(seconds.get(k, 0.0) for k in ("total", "eval", "checkpoint")),
        clients=client_scalars(record.client_metrics, release),
    )


def client_scalars(
    client_metrics: Mapping[str, Mapping[str, Any]], release: ReleaseRules
) -> dict[str, dict[str, float]]:
    """Per client: its numeric metrics that the privacy rules let leave it, and its declared size."""
    out: dict[str, dict[str, float]] = {}
    for cid, metrics in client_metrics.items():
        kept = release.metrics(metrics)
        if "num_examples" in metrics:
            kept["num_examples"] = metrics["num_examples"]  # declared: the public plan's size under DP
        out[cid] = {k: float(v) for k, v in kept.items() if _number(v) and _finite(v)}
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _number(value) and math.isfinite(value)
