"""The Flower ClientApp: translate Messages to `fedsb.flower.client` calls and back; nothing else.

`query.setup` stores the server's config and one-time payload in the node's `context.state`; `train`
rebuilds the client (cached per process; the basis fingerprint is checked there), installs what it kept
from earlier rounds (`fedsb.flower.node_state`: folded W0, optimizer state, DP step count), checks the DP
account the server sent (`fedsb.flower.dp`) and runs one round of the simulator's local trainer; SecAgg+ train messages go through `secaggplus_mod` (`secagg_router`). Start
SuperNodes with `--node-config 'partition-id=<i>'` (and optionally `device="cuda:1"`); in simulation
Flower sets the partition id.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsb.flower import protocol as P
from fedsb.flower.faults import fault_mod
from fedsb.flower.timing import timed

log = logging.getLogger("fedsb.flower.client")


def secagg_router(msg: Message, context: Context, call_next: Any) -> Message:
    """Route SecAgg+ train messages (they carry the protocol's config record) through Flower's
    `secaggplus_mod` around `fedsb.flower.secagg.secagg_train`; everything else goes on unchanged."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.metadata.message_type == P.TRAIN_MESSAGE and RECORD_KEY_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        from fedsb.flower.secagg import secagg_train

        return secaggplus_mod(msg, context, secagg_train)
    return call_next(msg, context)


app = ClientApp(mods=[secagg_router, fault_mod])  # fault_mod: a no-op unless a test sets FEDSB_TEST_FAULTS

#: (config, partition, fingerprint, device, run id) -> ClientRuntime, most recent last; a simulation process may host
#: several nodes, a deployment ClientApp process lives for one message
_CACHE: dict[tuple[str, int, str, str, int], Any] = {}
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


@app.query("setup")
@timed
def setup(msg: Message, context: Context) -> Message:
    """Keep the config and the basis for later rounds; reply with this node's partition id.

    Cheap on purpose (no torch): the basis fingerprint is checked when the client is built for training.
    """
    cfg_rec = msg.content.config_records[P.SETUP_CONFIG]
    context.state[P.SETUP_CONFIG] = ConfigRecord(dict(cfg_rec))
    context.state[P.SETUP_ARRAYS] = msg.content.array_records.get(P.SETUP_ARRAYS, ArrayRecord())
    pid = partition_id(context)
    return Message(RecordDict({P.NODE_INFO: ConfigRecord({"partition-id": pid})}), reply_to=msg)


def runtime(context: Context, *, rebuild: bool = False) -> Any:
    """This node's client, built from the stored setup (once per process and run, or again if `rebuild`)."""
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
    if rebuild or key not in _CACHE:
        setup_tensors = from_record(context.state.array_records.get(P.SETUP_ARRAYS, ArrayRecord()))
        _CACHE[key] = build_runtime(key[0], key[1], setup_tensors, key[2] or None, device=device)
    _CACHE[key] = _CACHE.pop(key)
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    return _CACHE[key]


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


@app.train()
@timed
def train(msg: Message, context: Context) -> Message:
    """One round of local training from the downloaded global state, with the client's state between
    rounds kept in the node's `context.state` (`fedsb.flower.node_state`)."""
    from fedsb.flower import node_state
    from fedsb.flower.records import from_record, to_record
    from fedsb.phases import phase

    rt = prepared_client(msg, context)
    rnd = msg.content.config_records[P.ROUND_CONFIG]
    folds_before = rt.fold_round()
    if P.WIRE_META in context.state.config_records:  # the int8 wire's client side, kept on the node
        meta = context.state.config_records[P.WIRE_META]
        rt.load_wire_state(
            from_record(context.state.array_records[P.WIRE_STATE]), {"index": int(meta["index"])}
        )
    with phase("serialization"):
        download = from_record(msg.content.array_records[P.DOWNLOAD])
    with phase("local training"):
        update = rt.train(int(rnd["round"]), download)
    with phase("node state"):
        node_state.keep(rt, context, fold_round_before=folds_before)
    kept = rt.wire_state()
    if kept is not None:
        context.state[P.WIRE_STATE] = to_record(kept[0])
        context.state[P.WIRE_META] = ConfigRecord({"index": int(kept[1]["index"])})
    meta = {
        "round": update.round,
        "client-id": update.client_id,
        "num-examples": update.num_examples,
        "fingerprint": update.basis_fingerprint or "",
    }
    with phase("serialization"):
        upload = to_record(update.tensors)
    content = RecordDict(
        {
            P.UPDATE: upload,
            P.UPDATE_META: ConfigRecord(meta),
            P.METRICS: MetricRecord({k: float(v) for k, v in update.metrics.items()}),
        }
    )
    return Message(content, reply_to=msg)
