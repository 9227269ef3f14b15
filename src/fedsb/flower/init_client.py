"""init.source=federated on a Flower node: the client's release of one init exchange, free of Flower types.

The node rebuilds what the simulator's client has (the run's model from the same seed, before any adapter;
its own shard; its first n_i examples in the order of its own seed; the same dropout seeds, clip and noise)
and answers with `GradientClient.answer`, the simulator's own code. Nothing is kept between exchanges: each
recomputes G_i (deterministic), as in the simulator.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedsb.fed.base import Tensors
from fedsb.init.federated import SKETCH


def init_release(
    config_yaml: str,
    partition_id: int,
    client_id: str,
    exchange: int,
    shared: Mapping[str, torch.Tensor],
    *,
    device: str | None = None,
) -> Tensors:
    """Client `client_id`'s release of `exchange` (Omega drawn here from the shared seed; `shared` = Q
    for exchange 2), on the CPU in fp32."""
    from fedsb.data.prepare import prepare_client, task_from_config
    from fedsb.fed.federated_init import client_party, init_client, shared_omega
    from fedsb.flower.client import node_config
    from fedsb.job import load_base, placement_of
    from fedsb.train.local import loss_for

    cfg = node_config(config_yaml, device)
    task = task_from_config(cfg)
    loaded = load_base(cfg, task, placement_of(cfg))
    data = prepare_client(cfg, task, loaded.tokenizer, partition_id)
    cid = data.partition_stats["client_ids"][partition_id]
    if cid != client_id:
        raise RuntimeError(f"asked for the init release of {client_id}, but this node holds {cid}")
    party = client_party(cfg, loaded.model, init_client(cfg, cid, data.clients[cid]), loss_for(task))
    if exchange == SKETCH:
        shared = shared_omega(cfg, loaded.model)
    return {k: v.detach().cpu().float() for k, v in party.answer(exchange, shared).items()}
