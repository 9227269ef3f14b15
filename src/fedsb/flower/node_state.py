"""What a client keeps between rounds, in its SuperNode's per-run `context.state` (a `RecordDict`).

A deployed ClientApp process lives for one message; its node's `Context` lives as long as the SuperNode
serves the run (Flower hands it to each ClientApp process and takes it back with the reply). So a client's
state between rounds is stored here after each round and installed into the (rebuilt or cached) client
before the next:

* `fedsb.node.w0` (ArrayRecord): the adapted layers' folded base weights, for FedEx-LoRA and FLoRA, and
  `fold-round` in `fedsb.node.record`: every node applies every round's fold in order, the folds it
  missed arriving with its next download (`FoldingMethod.download(since=...)`);
* `fedsb.node.optimizer` (ArrayRecord) and its JSON metadata, with `train.keep_optimizer_state`;
* `dp-steps` in `fedsb.node.record`: the DP-SGD steps this node took, checked against the server's ledger
  (`fedsb.flower.dp`).

None of it ever leaves the node. A SuperNode that restarts loses it; its next train message is then
answered as the simulator's client would be (a stale W0 is refused, a lost DP count is the server's).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context

from fedsb.flower.client import ClientRuntime
from fedsb.flower.records import from_record, to_record

log = logging.getLogger("fedsb.flower.client")

W0 = "fedsb.node.w0"
OPTIMIZER = "fedsb.node.optimizer"
OPTIMIZER_META = "fedsb.node.optimizer-meta"
RECORD = "fedsb.node.record"  # ConfigRecord: fold-round, dp-steps


def node_record(context: Context) -> dict[str, Any]:
    """This node's counters (fold-round, dp-steps; zeros before its first round)."""
    saved = context.state.config_records.get(RECORD)
    return {"fold-round": 0, "dp-steps": 0, **(dict(saved) if saved is not None else {})}


def restore(rt: ClientRuntime, context: Context, *, sent_before: int = 0) -> bool:
    """Install the node's saved state into `rt` (a fresh or a cached client of this run); False if `rt`
    holds folds its node does not (a cached client the node's state does not describe: rebuild it).

    `sent_before`: the train messages the server sent this client before; with none kept here, a
    kept optimizer state was lost (a restarted SuperNode) and starts afresh, with a warning."""
    record = node_record(context)
    fold_round = int(record["fold-round"])
    if rt.fold_round() != fold_round:
        if W0 not in context.state.array_records:
            return False
        rt.load_folded_base(fold_round, from_record(context.state.array_records[W0]))
    if rt.cfg.train.keep_optimizer_state:
        rt.executor.optimizer_states = {}
        if sent_before and OPTIMIZER_META not in context.state.config_records:
            log.warning(
                "%s: no optimizer state on this node after %d earlier round(s) (a restarted SuperNode?): "
                "train.keep_optimizer_state starts afresh",
                rt.client_id,
                sent_before,
            )
        if OPTIMIZER_META in context.state.config_records:
            meta = {rt.client_id: json.loads(str(context.state.config_records[OPTIMIZER_META]["json"]))}
            rt.executor.load_state_dict(from_record(context.state.array_records[OPTIMIZER]), meta)
    return True


def keep(rt: ClientRuntime, context: Context, *, fold_round_before: int) -> None:
    """Save what `rt` holds after a round into the node's state (the W0 only when a fold changed it)."""
    record = node_record(context)
    fold_round = rt.fold_round()
    if fold_round != fold_round_before:
        context.state[W0] = to_record(rt.folded_base())
    record["fold-round"] = fold_round
    privacy = rt.executor.privacy
    if privacy is not None:
        record["dp-steps"] = int(privacy.accounts[rt.client_id].steps)
    context.state[RECORD] = ConfigRecord(record)
    if rt.cfg.train.keep_optimizer_state:
        tensors, meta = rt.executor.state_dict()
        context.state[OPTIMIZER] = to_record(tensors) if tensors else ArrayRecord()
        context.state[OPTIMIZER_META] = ConfigRecord({"json": json.dumps(meta.get(rt.client_id, {}))})
