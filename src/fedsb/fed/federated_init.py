"""init.source=federated for the server's setup: pick the init's clients, run the exchanges with them
(`fedsb.init.federated`, in process) and build the basis; the ledger lines and privacy charge follow from
the basis' `info["federated_init"]` (`init_ledger_lines`, `fedsb.privacy.init_charge`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedsb.adapters.inject import resolve_ranks, resolve_targets
from fedsb.fed.sampling import ClientSampler
from fedsb.init.basis import Basis
from fedsb.init.federated import FederatedInit, InitClient, InitPrivacy, federated_basis
from fedsb.seeding import derive_seed

if TYPE_CHECKING:
    from fedsb.config import RunConfig
    from fedsb.fed.base import SetupContext


def init_samples(cfg: RunConfig, num_examples: int) -> int:
    """n_i of a client with N_i examples: init.num_samples, else max(min_samples, fraction x N_i); <= N_i."""
    init = cfg.init
    n = init.num_samples or max(init.min_samples, math.ceil(init.sample_fraction * num_examples))
    return min(n, num_examples)


def init_clients(cfg: RunConfig, clients: Mapping[str, Any]) -> list[InitClient]:
    """The clients of the init: sampled as a round would be (fed.clients_per_round) from their own seed."""
    sampler = ClientSampler(
        list(clients), cfg.fed.clients_per_round, seed=derive_seed(cfg.seed, "init-sampling")
    )
    out = []
    for cid in sampler.sample(0):
        data = clients[cid]
        seed = derive_seed(cfg.seed, "init-data", cid)
        out.append(InitClient(cid, lambda d=data, s=seed: d.loader(s), init_samples(cfg, data.num_examples)))
    return out


def init_spec(cfg: RunConfig, *, eta: float, scaling: float) -> FederatedInit:
    """The protocol's settings from init.* (and privacy.* when DP is on)."""
    privacy = None
    if cfg.privacy.enabled:
        privacy = InitPrivacy(
            clip_norm=cfg.init.clip_norm,
            noise_multiplier=cfg.init.noise_multiplier,
            reproducible=cfg.privacy.reproducible_noise,
            seed=cfg.seed,
        )
    i = cfg.init
    return FederatedInit(
        exchange=i.exchange, eta=eta, scaling=scaling, svd=i.svd, oversample=i.oversample,
        power_iters=i.power_iters, privacy=privacy,
    )  # fmt: skip


def server_federated_basis(
    model: nn.Module, ctx: SetupContext, *, rank: int, eta: float, scaling: float
) -> Basis:
    """The basis of init.source=federated from the clients in `ctx.clients` (the simulator's)."""
    cfg = ctx.cfg
    if ctx.clients is None:
        raise RuntimeError("init.source=federated needs the clients' data in the setup context")
    modules = resolve_targets(model, cfg.adapter.targets)
    ranks = resolve_ranks(modules, rank, rank_overflow=cfg.adapter.rank_overflow)
    assert ctx.loss_fn is not None
    return federated_basis(
        model,
        modules,
        ranks,
        init_clients(cfg, ctx.clients),
        init_spec(cfg, eta=eta, scaling=scaling),
        loss_fn=ctx.loss_fn,
        generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "basis")),
        dropout_seed=derive_seed(cfg.seed, "basis-dropout"),
    )


def init_ledger_lines(ledger: Any, info: Mapping[str, Any]) -> None:
    """The federated init's one-time lines (what each exchange moved) in the communication ledger."""
    for line in info["lines"]:
        ledger.record_one_time(
            item=line["item"],
            direction=line["direction"],
            clients=line["clients"],
            tensors={k: int(v) for k, v in line["sizes"].items()},
            note=f"once, before round 1; init.exchange={info['exchange']}",
        )
