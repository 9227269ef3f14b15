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
from fedsb.adapters.layer import linear_dims
from fedsb.fed.sampling import ClientSampler
from fedsb.init.basis import Basis
from fedsb.init.federated import (
    FederatedInit,
    GradientClient,
    InitClient,
    InitPrivacy,
    federated_basis,
    sketch_matrices,
)
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
    return [init_client(cfg, cid, clients[cid]) for cid in sampler.sample(0)]


def init_client(cfg: RunConfig, cid: str, data: Any) -> InitClient:
    """Client `cid`'s init data (`ClientData`): its first n_i examples in the order of its own seed."""
    seed = derive_seed(cfg.seed, "init-data", cid)
    return InitClient(cid, lambda: data.loader(seed), init_samples(cfg, data.num_examples))


def init_targets(cfg: RunConfig, model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, int]]:
    """The adapted modules of `model` and their (capped) ranks, as the basis has them."""
    modules = resolve_targets(model, cfg.adapter.targets)
    return modules, resolve_ranks(modules, cfg.adapter.rank, rank_overflow=cfg.adapter.rank_overflow)


def client_party(cfg: RunConfig, model: nn.Module, client: InitClient, loss_fn: Any) -> GradientClient:
    """A client's side of the protocol on `model`, as the simulator's (a Flower node's)."""
    modules, _ = init_targets(cfg, model)
    return GradientClient(
        model, modules, client, loss_fn=loss_fn, privacy=init_privacy(cfg),
        dropout_seed=derive_seed(cfg.seed, "basis-dropout"),
    )  # fmt: skip


def basis_generator(cfg: RunConfig) -> torch.Generator:
    """The basis' shared generator: the sketch's Omega is its first draw (every party draws the same)."""
    return torch.Generator().manual_seed(derive_seed(cfg.seed, "basis"))


def shared_omega(cfg: RunConfig, model: nn.Module) -> dict[str, torch.Tensor]:
    """Omega per module (n, k), drawn by a client from the shared seed exactly as the server draws it."""
    modules, ranks = init_targets(cfg, model)
    shapes = {p: linear_dims(m) for p, m in modules.items()}
    return sketch_matrices(shapes, ranks, cfg.init.oversample, basis_generator(cfg))


def init_privacy(cfg: RunConfig) -> InitPrivacy | None:
    """The releases' clip norm and noise (init.clip_norm, init.noise_multiplier) when DP is on, else None."""
    if not cfg.privacy.enabled:
        return None
    return InitPrivacy(
        clip_norm=cfg.init.clip_norm,
        noise_multiplier=cfg.init.noise_multiplier,
        reproducible=cfg.privacy.reproducible_noise,
        seed=cfg.seed,
    )


def init_spec(cfg: RunConfig, *, eta: float, scaling: float) -> FederatedInit:
    """The protocol's settings from init.* (and privacy.* when DP is on)."""
    privacy = init_privacy(cfg)
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
    clients = init_clients(cfg, ctx.clients)
    return federated_basis(
        model,
        modules,
        ranks,
        clients,
        init_spec(cfg, eta=eta, scaling=scaling),
        loss_fn=ctx.loss_fn,
        generator=basis_generator(cfg),
        dropout_seed=derive_seed(cfg.seed, "basis-dropout"),
        parties=ctx.init_parties(list(ctx.clients), clients) if ctx.init_parties is not None else None,
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
