"""The client side of the Flower app, free of Flower types: rebuild the model, the method and one client.

A SuperNode hosts one client: partition `partition-id` of the run's data. Everything it needs besides its
data arrives once from the server (the resolved config and, for Fed-SB and RAVAN, the frozen bases with
their fingerprint); per round it trains with the simulator's own `InProcessExecutor.train_client`, so local
training, seeding and encoding are the simulator's, not a copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from fedsb.config import RunConfig, config_from_dict
from fedsb.errors import ConfigError
from fedsb.fed import registry
from fedsb.fed.base import ClientUpdate, FederatedMethod, Tensors
from fedsb.fed.simulate import InProcessExecutor
from fedsb.job import build_components

if TYPE_CHECKING:
    from fedsb.privacy.accounting import PrivacyAccount


def folds_into_w0(method: str) -> bool:
    """Whether `method` folds every round's update into each party's W0 (its card's `folds`)."""
    return registry.card(method).folds


def check_flower_config(cfg: RunConfig, *, resuming: bool = False) -> None:
    """Refuse settings the Flower path cannot honour, naming field, value and fix.

    Everything the simulator runs also runs over Flower: what a client keeps between rounds (its optimizer
    state, its folded W0 under FedEx-LoRA and FLoRA, its DP-SGD step count) lives in its node's per-run
    state (`fedsb.flower.node_state`). A resumed run is a new Flower run whose nodes start without it, so
    resuming is refused where that state cannot be rebuilt. A method whose card gives a
    `flower_refusal` is refused here with it.
    """
    refusal = registry.card(cfg.fed.method).flower_refusal
    if refusal is not None:
        raise ConfigError(
            field="fed.method",
            value=cfg.fed.method,
            what=f"cannot run over Flower: {refusal}",
            fix="run it with the in-process simulator (fedsb run)",
        )
    if not resuming:
        return
    fix = "resume with the in-process simulator (fedsb run --resume), or start a new Flower run"
    if cfg.train.keep_optimizer_state:
        raise ConfigError(
            field="train.keep_optimizer_state",
            value=True,
            what="cannot be resumed over Flower: each client's optimizer state lives on its SuperNode for "
            "one Flower run (never on the server), and the resumed run's nodes start without it",
            fix=fix,
        )
    if folds_into_w0(cfg.fed.method):
        raise ConfigError(
            field="fed.method",
            value=cfg.fed.method,
            what="cannot be resumed over Flower: each client's folded W0 lives on its SuperNode for one "
            "Flower run, and the folds of the rounds before the checkpoint are gone from the server",
            fix=fix,
        )


@dataclass
class ClientRuntime:
    """One client's model, method and trainer, built from the server's setup.

    What the client keeps between rounds is read and set here so its node can store it between messages
    (`fedsb.flower.node_state`): the folded W0 of the adapted layers, the optimizer state, the DP account.
    """

    cfg: RunConfig
    client_id: str
    method: FederatedMethod
    executor: InProcessExecutor

    @property
    def num_examples(self) -> int:
        return self.executor.clients[self.client_id].num_examples

    def train(self, round: int, download: Tensors) -> ClientUpdate:
        """Train round `round` from the downloaded global state; the update is in the wire dtype."""
        return self.executor.train_client(round, self.client_id, download)

    # ---- the folded W0 (FedEx-LoRA, FLoRA) -------------------------------------------------------------------
    def fold_round(self) -> int:
        """The last round whose fold every adapted layer's W0 holds (0: the pretrained W0)."""
        return min((layer.fold_round for layer in self.method.adapted.layers.values()), default=0)

    def folded_base(self) -> Tensors:
        """path -> the adapted layer's base weight (m, n) as it is now, on the CPU in its own dtype."""
        from fedsb.adapters.layer import weight_in_linear_layout

        return {
            path: weight_in_linear_layout(layer.base_layer).detach().cpu().clone()
            for path, layer in self.method.adapted.layers.items()
        }

    @torch.no_grad()
    def load_folded_base(self, fold_round: int, weights: Mapping[str, torch.Tensor]) -> None:
        """Install a W0 saved by `folded_base` after round `fold_round` (bit for bit)."""
        from fedsb.adapters.layer import weight_in_linear_layout

        layers = self.method.adapted.layers
        if set(weights) != set(layers):
            raise RuntimeError("the node's saved W0 does not match this model's adapted layers")
        for path, layer in layers.items():
            weight_in_linear_layout(layer.base_layer).copy_(weights[path])
            layer.fold_round = fold_round

    # ---- DP-SGD: the account the server's ledger sent --------------------------------------------------------
    def use_account(self, account: PrivacyAccount) -> None:
        """Train the next round under `account` (sigma, q, delta and the steps taken so far); it is
        charged step by step as in the simulator."""
        from fedsb.privacy.ledger import PrivacyLedger

        p = self.cfg.privacy
        self.executor.privacy = PrivacyLedger(
            "sample",
            {self.client_id: account},
            max_grad_norm=p.max_grad_norm,
            clip_update=p.clip_update,
            poisson=p.poisson,
            clients_per_round=1,
            seed=self.cfg.seed,
            client_sizes={self.client_id: self.num_examples},
            reproducible_noise=p.reproducible_noise,
            head_clip_share=p.head_clip_share,
        )

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


def node_config(config_yaml: str, device: str | None = None) -> RunConfig:
    """The run's config on this node (its node config's `device`, else the run's), with torch set up as the
    run sets it: `threads` (default 1 on a node), deterministic algorithms when `deterministic`."""
    cfg = config_from_dict(yaml.safe_load(config_yaml))
    if device is not None:
        cfg.device = device
    torch.set_num_threads(cfg.threads or 1)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return cfg


def build_runtime(
    config_yaml: str,
    partition_id: int,
    setup: Mapping[str, torch.Tensor],
    fingerprint: str | None,
    *,
    device: str | None = None,
    cache_dir: str | None = None,
) -> ClientRuntime:
    """Rebuild everything client-side through the job recipe: the same model seed, data partition and
    method as the server's run, on this node's `device` (its node config's, else the run's `device`), with
    the converted checkpoint and the tokenized shard from the node's `cache_dir` (default the fedsb cache:
    `$FEDSB_CACHE`, else ~/.cache/fedsb), built there once and reused by every later message's process."""
    cfg = node_config(config_yaml, device)
    # the method's frozen basis, when it has one, came with the setup message (checked by fingerprint)
    # only this node's shard is tokenized (ConfigError for a partition id outside the run's)
    parts = build_components(
        cfg,
        role="client",
        setup=(setup, fingerprint) if fingerprint else None,
        partition_id=partition_id,
        cache_dir=Path(cache_dir).expanduser() if cache_dir else None,
    )
    assert parts.data is not None
    cid = parts.data.partition_stats["client_ids"][partition_id]
    return ClientRuntime(cfg=cfg, client_id=cid, method=parts.method, executor=parts.simulator(only=[cid]))
