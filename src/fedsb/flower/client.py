"""The client side of the Flower app, free of Flower types: rebuild the model, the method and one client.

A SuperNode hosts one client: partition `partition-id` of the run's data. Everything it needs besides its
data arrives once from the server (the resolved config and, for Fed-SB and RAVAN, the frozen bases with
their fingerprint); per round it trains with the simulator's own `InProcessExecutor.train_client`, so local
training, seeding and encoding are the simulator's, not a copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import yaml

from fedsb.config import RunConfig, config_from_dict
from fedsb.errors import ConfigError
from fedsb.fed.base import ClientUpdate, FederatedMethod, Tensors
from fedsb.fed.simulate import InProcessExecutor
from fedsb.job import build_components

#: methods whose server state every client can rebuild from one round's download
SUPPORTED_METHODS = ("fedsb", "ravan", "fedit", "ffa", "fedsvd", "full")
#: why the others are refused (a SuperNode keeps its own W0, and these fold updates into it every round)
UNSUPPORTED_REASON = (
    "folds every round's stacked factors into each client's own W0; the server sends the folds a client "
    "missed, but a deployed ClientApp process lives for one message and would rebuild W0 without them "
    "(the client then refuses the round rather than train on a stale W0)"
)


def check_flower_config(cfg: RunConfig) -> None:
    """Refuse settings the Flower path cannot honour, naming field, value and fix."""
    if cfg.fed.method not in SUPPORTED_METHODS:
        raise ConfigError(
            field="fed.method",
            value=cfg.fed.method,
            what=f"is not supported by the Flower app ({UNSUPPORTED_REASON})",
            fix=f"use one of {', '.join(SUPPORTED_METHODS)}, or the in-process simulator (fedsb run)",
        )
    if cfg.privacy.mode == "sample":
        raise ConfigError(
            field="privacy.mode",
            value="sample",
            what="is not supported by the Flower app yet (each client's DP-SGD accountant must persist on its "
            "SuperNode across rounds; without it the stated epsilon would not hold)",
            fix="use privacy.mode=client (server-side DP-FedAvg) with Flower, or the in-process simulator",
        )
    if cfg.train.keep_optimizer_state:
        raise ConfigError(
            field="train.keep_optimizer_state",
            value=True,
            what="is not supported by the Flower app (a ClientApp process lives for one message)",
            fix="set train.keep_optimizer_state=false",
        )


@dataclass
class ClientRuntime:
    """One client's model, method and trainer, built from the server's setup."""

    cfg: RunConfig
    client_id: str
    method: FederatedMethod
    executor: InProcessExecutor

    def train(self, round: int, download: Tensors) -> ClientUpdate:
        """Train round `round` from the downloaded global state; the update is in the wire dtype."""
        return self.executor.train_client(round, self.client_id, download)

    def wire_state(self) -> tuple[Tensors, dict[str, int]] | None:
        """The int8 wire's client side to keep on the node between rounds (None: nothing to keep)."""
        client = self.executor.wire_clients.get(self.client_id)
        return client.state_dict() if client is not None else None

    def load_wire_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, int]) -> None:
        """Restore what `wire_state` kept (the node's process may not be the one that trained before)."""
        from fedsb.fed.wire import ClientInt8

        client = ClientInt8(self.cfg.fed.wire_scale, self.cfg.fed.error_feedback)
        client.load_state_dict(tensors, meta)
        self.executor.wire_clients[self.client_id] = client


def build_runtime(
    config_yaml: str,
    partition_id: int,
    setup: Mapping[str, torch.Tensor],
    fingerprint: str | None,
    *,
    device: str | None = None,
) -> ClientRuntime:
    """Rebuild everything client-side through the job recipe: the same model seed, data partition and
    method as the server's run, on this node's `device` (its node config's, else the run's `device`)."""
    cfg = config_from_dict(yaml.safe_load(config_yaml))
    check_flower_config(cfg)
    if device is not None:
        cfg.device = device
    torch.set_num_threads(cfg.threads or 1)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    # the method's frozen basis, when it has one, came with the setup message (checked by fingerprint)
    parts = build_components(cfg, role="client", setup=(setup, fingerprint) if fingerprint else None)
    assert parts.data is not None
    ids = list(parts.data.clients)
    if not 0 <= partition_id < len(ids):
        raise ConfigError(
            field="partition-id",
            value=partition_id,
            what=f"is outside the run's {len(ids)} partitions",
            fix=f"start SuperNodes with --node-config 'partition-id=<0..{len(ids) - 1}>'",
        )
    cid = ids[partition_id]
    return ClientRuntime(cfg=cfg, client_id=cid, method=parts.method, executor=parts.simulator(only=[cid]))
