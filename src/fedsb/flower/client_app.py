"""The Flower ClientApp: translate Messages to `fedsb.flower.client` calls and back; nothing else.

`query.setup` stores the server's config in the node's `context.state` and its one-time payload on the
node's disk (`fedsb.flower.setup_store`: only its digest in the state, which Flower moves with every message);
`query.init` (init.source=federated) answers one exchange of the federated init; `train`
rebuilds the client (cached per process in `fedsb.flower.node`; the basis fingerprint is checked there), installs what it kept
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
from fedsb.flower.node import RUNTIMES, node_cache_dir, partition_id, prepared_client
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

_CACHE = RUNTIMES  # the node's built clients (tests clear it to act as a fresh process)


@app.query("setup")
@timed
def setup(msg: Message, context: Context) -> Message:
    """Keep the config and the basis for later rounds; reply with this node's partition id.

    Cheap on purpose (no torch): the basis fingerprint is checked when the client is built for training.
    """
    keep_setup(msg, context)
    pid = partition_id(context)
    return Message(RecordDict({P.NODE_INFO: ConfigRecord({"partition-id": pid})}), reply_to=msg)


def keep_setup(msg: Message, context: Context) -> None:
    """Store the config in the node's state and the one-time payload `msg` carries on the node's disk
    (its digest in the state: `fedsb.flower.setup_store`)."""
    from fedsb.flower import setup_store

    cfg_rec = msg.content.config_records[P.SETUP_CONFIG]
    context.state[P.SETUP_CONFIG] = ConfigRecord(dict(cfg_rec))
    arrays = msg.content.array_records.get(P.SETUP_ARRAYS, ArrayRecord())
    setup_store.keep(context, arrays, node_cache_dir(context))


@app.query("flush")
def flush(msg: Message, context: Context) -> Message:
    """Nothing: the message only makes a SuperNode that holds back a reply forward it (`fedsb.flower.held`)."""
    return Message(RecordDict(), reply_to=msg)


@app.query("init")
@timed
def init(msg: Message, context: Context) -> Message:
    """init.source=federated: this node's release of one init exchange (`fedsb.flower.init_client`), built
    from the config its setup stored; nothing is kept on the node."""
    from fedsb.flower.init_client import init_release
    from fedsb.flower.node import node_device
    from fedsb.flower.records import from_record, to_record

    if P.SETUP_CONFIG not in context.state:
        raise RuntimeError(f"{P.NO_SETUP} (init message before setup: a restarted SuperNode?)")
    rec = msg.content.config_records[P.INIT_CONFIG]
    release = init_release(
        str(context.state[P.SETUP_CONFIG]["config"]),
        partition_id(context),
        str(rec["client-id"]),
        int(rec["exchange"]),
        from_record(msg.content.array_records[P.INIT_SHARED]),
        device=node_device(context),
    )
    return Message(RecordDict({P.INIT_RELEASE: to_record(release)}), reply_to=msg)


@app.train()
@timed
def train(msg: Message, context: Context) -> Message:
    """One round of local training from the downloaded global state, with the client's state between
    rounds kept in the node's `context.state` (`fedsb.flower.node_state`)."""
    from fedsb.flower import node_state
    from fedsb.flower.records import from_record, to_record
    from fedsb.phases import phase

    had_setup = None  # with the setup in the message: did this node's state already hold it?
    if P.SETUP_CONFIG in msg.content.config_records:  # the setup again, with the train message
        held = context.state.config_records.get(P.SETUP_CONFIG)
        had_setup = held is not None and dict(held) == dict(msg.content.config_records[P.SETUP_CONFIG])
        keep_setup(msg, context)
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
    if had_setup is not None:
        content[P.NODE_INFO] = ConfigRecord({"had-setup": int(had_setup)})
    return Message(content, reply_to=msg)
