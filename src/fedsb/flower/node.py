"""A Flower node's client runtime: its partition id and device, and the client built from the stored setup.

The ClientApp (`fedsb.flower.client_app`) and the SecAgg+ client stage (`fedsb.flower.secagg`) both train
through `restored_client` / `prepared_client`; this module imports neither, so they do not import each
other. Cheap to import (no torch): the client is built lazily on the first train message.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message

from fedsb.flower import protocol as P

__all__ = [
    "CACHE_SIZE",
    "RUNTIMES",
    "node_cache_dir",
    "node_device",
    "partition_id",
    "prepared_client",
    "restored_client",
    "runtime",
]

#: (config, partition, fingerprint, device, run id) -> ClientRuntime, most recent last; a simulation process may host
#: several nodes, a deployment ClientApp process lives for one message
RUNTIMES: dict[tuple[str, int, str, str, int], Any] = {}
CACHE_SIZE = 2


def partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        from fedsb.errors import ConfigError

        raise ConfigError(
            field="node_config.partition-id",
            value=None,
            what="is missing",
            fix="start the SuperNode with --node-config 'partition-id=<i> num-partitions=<n>'",
        )
    return int(context.node_config["partition-id"])


def node_device(context: Context) -> str | None:
    """This node's own device (`--node-config 'device="cuda:1"'`), else None: the run's `device` setting,
    which `auto` resolves on the node itself (in simulation: the GPU share Ray gave its actor)."""
    value = context.node_config.get("device")
    return str(value) if value else None


def node_cache_dir(context: Context) -> str | None:
    """This node's cache folder (`--node-config 'cache-dir="/path"'`) for the converted checkpoint and its
    tokenized shard, else None: the fedsb cache (`$FEDSB_CACHE`, else ~/.cache/fedsb) of the node's user."""
    value = context.node_config.get("cache-dir")
    return str(value) if value else None


def runtime(context: Context, *, rebuild: bool = False) -> Any:
    """This node's client, built from the stored setup (once per process and run, or again if `rebuild`)."""
    from fedsb.flower import setup_store
    from fedsb.flower.client import build_runtime
    from fedsb.flower.records import from_record

    if P.SETUP_CONFIG not in context.state:
        raise RuntimeError(f"{P.NO_SETUP} (train message before setup: a restarted SuperNode?)")
    cfg_rec = context.state[P.SETUP_CONFIG]
    device = node_device(context)
    key = (
        str(cfg_rec["config"]),
        partition_id(context),
        str(cfg_rec["fingerprint"]),
        device or "",
        context.run_id,
    )
    if rebuild or key not in RUNTIMES:
        cache_dir = node_cache_dir(context)
        setup_tensors = from_record(setup_store.load(context, cache_dir))
        RUNTIMES[key] = build_runtime(
            key[0], key[1], setup_tensors, key[2] or None, device=device, cache_dir=cache_dir
        )
    RUNTIMES[key] = RUNTIMES.pop(key)
    while len(RUNTIMES) > CACHE_SIZE:
        RUNTIMES.pop(next(iter(RUNTIMES)))
    return RUNTIMES[key]


def restored_client(context: Context, *, sent_before: int = 0) -> Any:
    """This node's client (cached or rebuilt) with what it kept from earlier rounds installed."""
    from fedsb.flower import node_state

    rt = runtime(context)
    if not node_state.restore(rt, context, sent_before=sent_before):
        rt = runtime(context, rebuild=True)
        node_state.restore(rt, context, sent_before=sent_before)
    return rt


def prepared_client(msg: Message, context: Context) -> Any:
    """This node's client with what it kept from earlier rounds installed and, under DP-SGD, the account
    the server's ledger sent (checked against the client's own plan and budget: `fedsb.flower.dp`)."""
    from fedsb.flower import node_state

    rnd = msg.content.config_records[P.ROUND_CONFIG]
    rt = restored_client(context, sent_before=int(rnd.get("sent-before", 0)))
    if str(rnd["client-id"]) != rt.client_id:
        raise RuntimeError(f"asked to train {rnd['client-id']}, but this node holds {rt.client_id}")
    if rt.cfg.privacy.mechanism.accounts_per_client:
        from fedsb.flower.dp import client_account

        sent = msg.content.config_records.get(P.PRIVACY)
        steps = int(node_state.node_record(context)["dp-steps"])
        rt.use_account(client_account(rt.cfg, rt.client_id, rt.num_examples, sent, node_steps=steps))
    return rt
