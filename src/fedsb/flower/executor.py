"""`FlowerExecutor`: the round loop's `ClientExecutor` over a Flower Grid.

`Server.run_round` samples, broadcasts, validates and aggregates exactly as in the simulator; this class
only carries the download to the sampled clients' SuperNodes and turns their replies into `ClientUpdate`s
as they arrive. A node that errors, or does not answer within `round_timeout` (or within
`straggler_timeout` of the first reply, when set), is left out: the round loop counts it as dropped and
goes on if `fed.min_clients` updates remain. A reply that cannot be decoded becomes an update the
validator rejects, as in the simulator.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedsb.fed.base import ClientUpdate, Tensors
from fedsb.flower import protocol as P
from fedsb.flower.dp import account_message
from fedsb.flower.held import HeldReplies
from fedsb.flower.records import from_record, payload_bytes, to_record

if TYPE_CHECKING:
    from fedsb.privacy.ledger import PrivacyLedger

log = logging.getLogger("fedsb.flower.server")

POLL_SECONDS = 0.1


class FlowerExecutor:
    """Sends each round's download through `grid` and yields the replies as client updates."""

    #: a node that fails the first setup fails the run (SecAgg+, the federated init) instead of being sent
    #: the setup again before the next round
    strict_setup = False

    def __init__(
        self,
        grid: Grid,
        client_ids: Sequence[str],
        *,
        config_yaml: str,
        setup: Tensors,
        fingerprint: str | None,
        round_timeout: float = 600.0,
        straggler_timeout: float = 0.0,
        connect_timeout: float = 120.0,
        privacy: PrivacyLedger | None = None,
        dp_steps: Mapping[str, int] | None = None,
    ) -> None:
        self.grid = grid
        self.client_ids = list(client_ids)
        self.config_yaml = config_yaml
        self.setup = setup
        self.fingerprint = fingerprint
        self.round_timeout = round_timeout
        self.straggler_timeout = straggler_timeout
        self.connect_timeout = connect_timeout
        self.nodes: dict[str, int] = {}  # client id -> node id
        #: privacy.mode=sample: the server's ledger is every client's accountant (`fedsb.flower.dp`); a
        #: train message carries the client's account and the round's steps are charged when it is sent
        self.privacy = privacy if privacy is not None and privacy.mechanism.accounts_per_client else None
        self.dp_steps = dict(dp_steps or {})
        self.lost_setup: set[int] = set()  # nodes that answered a train message without holding the setup
        self.held = HeldReplies(grid)  # nodes whose SuperNode holds back a reply (`fedsb.flower.held`)
        #: lagging nodes whose train messages carry the setup until a reply says their state held it (the
        #: late ClientApp of a message Flower answered as crashed may still push its stale context)
        self.riding: set[int] = set()
        self.setup_bytes = 0
        self.sent_before: dict[str, int] = {}  # client id -> train messages sent to it so far
        #: Flower's own count of every ArrayRecord sent or received: round (0 = setup), client, direction
        self.wire: list[dict[str, Any]] = []

    # ---- once: find the nodes, send every node the config and the basis ----------------------------------
    def connect(self) -> dict[str, int]:
        """Wait for one SuperNode per client, send the setup, map client ids to node ids by partition id.

        A node that fails the setup (an error reply, or none within `connect_timeout`) is sent it again
        before every round (`rejoin`) until it answers; its partition's client is dropped until then. With
        `strict_setup` (SecAgg+, the federated init) such a node fails the run instead."""
        want = len(self.client_ids)
        deadline = time.monotonic() + self.connect_timeout
        node_ids = sorted(self.grid.get_node_ids())
        while len(node_ids) < want and time.monotonic() < deadline:
            time.sleep(0.5)
            node_ids = sorted(self.grid.get_node_ids())
        if len(node_ids) < want:
            raise RuntimeError(
                f"{len(node_ids)} SuperNode(s) connected within {self.connect_timeout:g} s, the run has {want} "
                "clients (one SuperNode per partition): start more SuperNodes or raise connect-timeout"
            )
        answered, failed = self._send_setup(node_ids, strict=self.strict_setup)
        by_partition: dict[int, int] = {}
        for node, pid in answered:
            if pid in by_partition:
                raise RuntimeError(
                    f"SuperNodes {by_partition[pid]} and {node} both hold partition-id={pid}: "
                    "give each SuperNode its own --node-config 'partition-id=<i>'"
                )
            by_partition[pid] = node
        missing = [i for i in range(want) if i not in by_partition]
        if missing and (self.strict_setup or not failed or not by_partition):
            raise RuntimeError(
                f"no SuperNode answered the setup for partition-id {missing} "
                f"(the run has {want} partitions, 0..{want - 1})"
            )
        if missing:
            log.warning(
                "SuperNode(s) %s failed the setup: the clients of partition-id %s are dropped until one "
                "answers it (sent again before every round)",
                ", ".join(map(str, failed)),
                missing,
            )
        self.lost_setup |= set(failed)
        self.nodes = {cid: by_partition[i] for i, cid in enumerate(self.client_ids) if i in by_partition}
        for cid in self.nodes:  # round 0: the setup
            self.wire.append({"round": 0, "client": cid, "direction": "down", "bytes": self.setup_bytes})
        return self.nodes

    def _send_setup(
        self, node_ids: Sequence[int], *, strict: bool, round: int = 0
    ) -> tuple[list[tuple[int, int]], list[int]]:
        """Send the setup (config, basis) to `node_ids`: ((node id, its partition id) of every node that
        answered, the nodes that did not: an error reply, or none within `connect_timeout`). An error reply
        raises with `strict`, else it is logged (as is a node that did not answer)."""
        arrays = to_record(self.setup)
        setup_config = {"config": self.config_yaml, "fingerprint": self.fingerprint or ""}
        messages = [
            Message(
                RecordDict({P.SETUP_CONFIG: ConfigRecord(setup_config), P.SETUP_ARRAYS: arrays}),
                dst_node_id=node,
                message_type=P.SETUP_MESSAGE,
                group_id="setup",
            )
            for node in node_ids
        ]
        answered: list[tuple[int, int]] = []
        failed: set[int] = set()
        for reply in self.grid.send_and_receive(messages, timeout=self.connect_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                if strict:
                    raise RuntimeError(f"SuperNode {node} failed the setup: {reply.error.reason}")
                log.warning("round %d: SuperNode %s failed the setup: %s", round, node, reply.error.reason)
                failed.add(node)
                continue
            answered.append((node, int(reply.content.config_records[P.NODE_INFO]["partition-id"])))
        silent = [n for n in node_ids if n not in failed and n not in {a for a, _ in answered}]
        if silent:
            log.warning(
                "round %d: SuperNode(s) %s did not answer the setup within %g s (connect-timeout)",
                round,
                ", ".join(map(str, silent)),
                self.connect_timeout,
            )
        self.setup_bytes = payload_bytes(arrays)
        return answered, sorted(failed | set(silent))

    def rejoin(self, round: int) -> None:
        """Send the setup again to the nodes that lost it (a SuperNode that restarted answers a train
        message with `protocol.NO_SETUP`), to nodes the SuperLink reported unavailable (a dead SuperNode may
        come back with its key: tried every round until one answers) and to nodes that connected since:
        each takes over the client of its partition id from the next message on. What the client kept on
        its old node is gone: its DP account is the server's anyway, a FedEx-LoRA/FLoRA client refuses its
        stale W0, an optimizer state starts afresh (the ClientApp warns)."""
        known = set(self.nodes.values())
        riding = known & self.held.lagging  # their setup goes with their next train message instead
        todo = sorted((self.lost_setup - riding) | {n for n in self.grid.get_node_ids() if n not in known})
        if not todo:
            return
        answered, _ = self._send_setup(todo, strict=False, round=round)
        self.lost_setup -= {node for node, _ in answered}  # the others failed again: tried next round
        for node, pid in answered:
            if not 0 <= pid < len(self.client_ids):
                log.warning(
                    "round %d: SuperNode %s holds partition-id=%d, outside 0..%d: ignored",
                    round,
                    node,
                    pid,
                    len(self.client_ids) - 1,
                )
                continue
            cid = self.client_ids[pid]
            log.warning("round %d: %s (re)joined on SuperNode %s: setup sent again", round, cid, node)
            self.nodes[cid] = node
            line = {"round": 0, "client": cid, "direction": "down", "bytes": self.setup_bytes}
            self.wire.append({**line, "before_round": round})  # a setup sent again mid-run

    # ---- per round --------------------------------------------------------------------------------------
    def _train_message(self, round: int, cid: str, record: ArrayRecord) -> Message:
        """Client `cid`'s train message: the download, {round, client-id, sent-before} and, under DP-SGD, its
        account on the server's ledger (counted on the wire list as sent)."""
        round_config = {"round": round, "client-id": cid, "sent-before": self.sent_before.get(cid, 0)}
        content = RecordDict({P.DOWNLOAD: record, P.ROUND_CONFIG: ConfigRecord(round_config)})
        node = self.nodes[cid]
        if node in self.held.lagging and (node in self.lost_setup or node in self.riding):
            self.lost_setup.discard(node)  # a separate setup's reply would be held back too
            self.riding.add(node)
            setup_config = {"config": self.config_yaml, "fingerprint": self.fingerprint or ""}
            content[P.SETUP_CONFIG] = ConfigRecord(setup_config)
            content[P.SETUP_ARRAYS] = to_record(self.setup)
            log.warning(
                "round %d: %s: setup sent again with its train message (SuperNode %s)", round, cid, node
            )
            line = {"round": 0, "client": cid, "direction": "down", "bytes": self.setup_bytes}
            self.wire.append({**line, "before_round": round})
        if self.privacy is not None:
            content[P.PRIVACY] = ConfigRecord(account_message(self.privacy.accounts[cid]))
        self.sent_before[cid] = self.sent_before.get(cid, 0) + 1
        self.wire.append({"round": round, "client": cid, "direction": "down", "bytes": payload_bytes(record)})
        return Message(
            content, dst_node_id=self.nodes[cid], message_type=P.TRAIN_MESSAGE, group_id=str(round)
        )

    def train_round(self, round: int, client_ids: Sequence[str], download: Tensors) -> Iterator[ClientUpdate]:
        """Push the download to the sampled clients' nodes; yield each reply as it arrives."""
        if not self.nodes:
            self.connect()
        self.rejoin(round)
        record = to_record(download)
        unplaced = [cid for cid in client_ids if cid not in self.nodes]
        if unplaced:  # their partition's SuperNode has not answered a setup yet: dropped, retried next round
            log.warning("round %d: no SuperNode holds the setup of %s yet", round, ", ".join(unplaced))
        placed = [cid for cid in client_ids if cid in self.nodes]
        sent = {self.nodes[cid]: cid for cid in placed}  # node id -> client id
        ids = list(self.grid.push_messages([self._train_message(round, cid, record) for cid in placed]))
        pending, asked = set(ids), dict(zip(ids, placed, strict=True))  # message id -> client id
        if self.privacy is not None:  # sent: a client that trains spends them, whether or not its reply comes
            for cid in placed:
                self.privacy.accounts[cid].step(self.dp_steps[cid])
        deadline = time.monotonic() + self.round_timeout
        self.held.flush([self.nodes[asked[m]] for m in pending], round)
        while pending and time.monotonic() < deadline:
            replies = list(self.grid.pull_messages([*pending, *self.held.ids()]))
            for reply in replies:
                if self.held.take(reply):
                    continue
                pending.discard(reply.metadata.reply_to_message_id)
                cid = sent.get(reply.metadata.src_node_id)
                if cid is None and reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                    # the SuperLink answers for a node it holds offline
                    cid = asked.get(reply.metadata.reply_to_message_id)
                if cid is None:
                    log.warning(
                        "round %d: reply from unknown node %s ignored", round, reply.metadata.src_node_id
                    )
                    continue
                if reply.has_error():
                    log.warning("round %d: %s failed: %s", round, cid, reply.error.reason)
                    if may_have_lost_setup(reply.error.code, reply.error.reason):
                        self.lost_setup.add(self.nodes[cid])  # setup sent again before the next round
                    if reply.error.code == ErrorCode.NODE_UNAVAILABLE:  # down: a restarted one lags no more
                        self.held.lagging.discard(self.nodes[cid])
                    if reply.error.code == ErrorCode.CLIENT_APP_CRASHED:  # its ClientApp may answer later
                        self.held.suspect(self.nodes[cid], round, "its SuperNode answered for a stopped task")
                    continue
                info = reply.content.config_records.get(P.NODE_INFO)
                if info is not None and info.get("had-setup") == 1:  # its state kept the setup sent before
                    self.riding.discard(self.nodes[cid])
                update = decode_reply(reply.content, cid, round)
                if P.UPDATE in reply.content.array_records:
                    self.wire.append(
                        {
                            "round": round,
                            "client": cid,
                            "direction": "up",
                            "bytes": payload_bytes(reply.content.array_records[P.UPDATE]),
                        }
                    )
                yield update
            if replies and self.straggler_timeout > 0:
                deadline = min(deadline, time.monotonic() + self.straggler_timeout)
            self.held.flush([self.nodes[asked[m]] for m in pending], round)
            if pending and not replies:
                time.sleep(POLL_SECONDS)
        for m in pending:  # its reply may be held back by its SuperNode: flushed in later rounds
            self.held.suspect(self.nodes[asked[m]], round, "no reply in time")
        if pending:
            log.warning(
                "round %d: %d node(s) did not answer in time (round-timeout=%g s, straggler-timeout=%g s)",
                round,
                len(pending),
                self.round_timeout,
                self.straggler_timeout,
            )

    # ---- checkpoints: nothing client-side lives on the server ----------------------------------------------
    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        return {}, {}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        return None


def may_have_lost_setup(code: int, reason: str) -> bool:
    """Whether a node whose train message was answered with this error may no longer hold the setup (so
    the server sends it again before the node's next train message).

    Only a ClientApp that raised something other than `protocol.NO_SETUP` is known to hold it (its first
    step is to load the setup from its node's state). Any other error leaves the node's state unknown: the
    SuperLink answering for an offline node (`NODE_UNAVAILABLE`), a SuperNode answering for a ClientApp
    task whose heartbeat stopped (`CLIENT_APP_CRASHED`, "ClientApp stopped responding": Flower 1.42 sends
    this when a ClientApp process failed to push its context back, e.g. after its setup, which then never
    reached the node's state), or a ClientApp that could not load.
    """
    return P.NO_SETUP in reason or code != ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def decode_reply(content: RecordDict, client_id: str, round: int) -> ClientUpdate:
    """A reply as a `ClientUpdate`, best effort: whatever is missing or wrong is left for the validator.

    The client id is the one the server sent to that node (not what the reply claims); a missing round or
    example count stays invalid (-1 / None) so `validate_update` rejects the update with its reason.
    """
    meta: Mapping[str, Any] = content.config_records.get(P.UPDATE_META, ConfigRecord())
    arrays = content.array_records.get(P.UPDATE)
    try:
        tensors = from_record(arrays) if arrays is not None else {}
    except (TypeError, ValueError, RuntimeError) as exc:
        log.warning("round %d: %s sent undecodable arrays (%s)", round, client_id, exc)
        tensors = {}
    metrics = content.metric_records.get(P.METRICS)
    num = meta.get("num-examples")
    return ClientUpdate(
        client_id=client_id,
        round=int(meta["round"]) if isinstance(meta.get("round"), int) else -1,
        num_examples=num if isinstance(num, int) else None,  # type: ignore[arg-type]
        tensors=tensors,
        basis_fingerprint=str(meta["fingerprint"]) or None if "fingerprint" in meta else None,
        metrics={k: float(v) for k, v in (metrics or {}).items() if isinstance(v, int | float)},
    )
