"""Names shared by the ServerApp and the ClientApp: message types, record keys, run-config keys."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: server -> every node once: the resolved config and the one-time setup (Fed-SB's B and A)
SETUP_MESSAGE = "query.setup"
#: server -> each init client (init.source=federated), once per exchange before the basis exists: the
#: exchange and, for exchange 2, Q; the reply carries the client's (noised, under DP) release
INIT_MESSAGE = "query.init"
#: server -> a sampled node each round: the download; the reply carries the update (and, for a node that
#: lost its setup while its SuperNode holds back a reply, the setup's records too: stored before training)
TRAIN_MESSAGE = "train"
#: server -> a node whose SuperNode holds back a reply (`fedsb.flower.held`): nothing; answered at once
FLUSH_MESSAGE = "query.flush"

SETUP_CONFIG = "fedsb.setup"  # ConfigRecord: config (YAML), fingerprint ("" if none)
SETUP_ARRAYS = "fedsb.basis"  # ArrayRecord: the setup payload (fp32)
SETUP_STORED = "fedsb.basis-stored"  # node state, ConfigRecord: digest, bytes of the payload on its disk
#: ConfigRecord in the setup reply: partition-id; in the reply to a train message that carried the setup:
#: had-setup (1 if the node's state held it already)
NODE_INFO = "fedsb.node"
INIT_CONFIG = "fedsb.init"  # ConfigRecord: client-id, exchange (0 dense, 1 sketch, 2 project)
INIT_SHARED = "fedsb.init.shared"  # ArrayRecord: Q (m, k) per layer for exchange 2, else empty
INIT_RELEASE = "fedsb.init.release"  # ArrayRecord in the reply: the client's release (fp32)
ROUND_CONFIG = "fedsb.round"  # ConfigRecord: round, client-id, sent-before (earlier train messages to it)
PRIVACY = "fedsb.privacy"  # ConfigRecord (privacy.mode=sample): the client's account on the server's ledger
DOWNLOAD = "fedsb.download"  # ArrayRecord: the round's download in the wire dtype
UPDATE = "fedsb.update"  # ArrayRecord: the client's upload in the wire dtype
UPDATE_META = "fedsb.meta"  # ConfigRecord: round, client-id, num-examples, fingerprint
#: what a ClientApp raises on a train message its node holds no setup for (a restarted SuperNode): the
#: server sends the setup again before the next round (`FlowerExecutor.rejoin`)
NO_SETUP = "this node holds no setup for the run"
WIRE_STATE = "fedsb.wire"  # ArrayRecord in a node's context.state: int8 wire held/<name>, residual/<name>
WIRE_META = "fedsb.wire.meta"  # ConfigRecord in a node's context.state: index (the last entry it holds)
METRICS = "metrics"  # MetricRecord: loss, first_loss, steps, seconds (under DP: fedsb.privacy.release)


@dataclass(frozen=True)
class AppSettings:
    """The app's `[tool.flwr.app.config]`, hyphenated there and snake_case here (mapped only here)."""

    config: str = ""  # YAML preset path ("" = defaults)
    overrides: str = ""  # `section.key=value` items separated by spaces
    output_dir: str = ""  # results directory ("" = runs/<timestamp>)
    round_timeout: float = 600.0  # seconds to wait for a round's replies before going on without them
    straggler_timeout: float = 0.0  # once one reply arrived, wait at most this long for the rest (0: off)
    connect_timeout: float = 120.0  # seconds to wait for enough SuperNodes to connect
    secagg: bool = False  # SecAgg+ rounds (Fed-SB-style linear aggregates only)
    resume: str = ""  # a run directory to continue from its latest checkpoint ("" = a new run)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppSettings:
        known = {
            "config",
            "overrides",
            "output-dir",
            "round-timeout",
            "straggler-timeout",
            "connect-timeout",
            "secagg",
            "resume",
        }
        unknown = sorted(set(run_config) - known)
        if unknown:
            from fedsb.errors import ConfigError

            raise ConfigError(
                field="run config", value=unknown, fix=f"use only the app's keys: {', '.join(sorted(known))}"
            )
        return cls(
            config=str(run_config.get("config", "")),
            overrides=str(run_config.get("overrides", "")),
            output_dir=str(run_config.get("output-dir", "")),
            round_timeout=float(run_config.get("round-timeout", 600.0)),
            straggler_timeout=float(run_config.get("straggler-timeout", 0.0)),
            connect_timeout=float(run_config.get("connect-timeout", 120.0)),
            secagg=bool(run_config.get("secagg", False)),
            resume=str(run_config.get("resume", "")),
        )

    def override_list(self) -> list[str]:
        return self.overrides.split()
