"""init.source=federated over Flower: the init's exchanges as `query.init` messages (server side).

`FlowerInitParties` is the `fedsb.init.federated.InitParties` of the ServerApp: the basis is computed by
the same `federated_basis` as in the simulator, only its clients' releases come over the Grid. Before the
basis exists every SuperNode gets the setup without arrays (the config: the node needs it to rebuild its
model and shard) so partition ids map to node ids; then each exchange is one message to each init
client's node, answered by `fedsb.flower.init_client.init_release` (Omega is drawn there from the shared
seed, never sent; exchange 2 carries Q). The init needs every sampled client: a node that fails or does
not answer stops the run (the basis, its ledger lines and its privacy charge name exactly these clients).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fedsb.fed.base import Tensors
from fedsb.flower import protocol as P
from fedsb.flower.executor import FlowerExecutor
from fedsb.flower.records import from_record, payload_bytes, to_record
from fedsb.init.federated import PROJECT, InitClient


class FlowerInitParties:
    """The init's clients on their SuperNodes, reached through `executor` (connected without a basis)."""

    def __init__(self, executor: FlowerExecutor, clients: list[InitClient], *, timeout: float) -> None:
        self.executor = executor
        self.client_ids = [c.client_id for c in clients]
        self.timeout = timeout
        #: Flower's own byte count of the init's messages (round 0, `exchange` 0/1/2), for flower_wire.json
        self.wire: list[dict[str, Any]] = []

    def releases(self, exchange: int, shared: Mapping[str, torch.Tensor]) -> list[Tensors]:
        """Every init client's release of `exchange`, in the protocol's client order."""
        ex = self.executor
        record = to_record(dict(shared) if exchange == PROJECT else {})  # Omega stays on the nodes
        messages = {}
        for cid in self.client_ids:
            content = RecordDict(
                {
                    P.INIT_CONFIG: ConfigRecord({"client-id": cid, "exchange": exchange}),
                    P.INIT_SHARED: record,
                }
            )
            messages[ex.nodes[cid]] = Message(
                content, dst_node_id=ex.nodes[cid], message_type=P.INIT_MESSAGE, group_id=f"init-{exchange}"
            )
            self._count(exchange, cid, "down", payload_bytes(record))
        by_node = {node: cid for cid, node in ex.nodes.items()}
        out: dict[str, Tensors] = {}
        for reply in ex.grid.send_and_receive(list(messages.values()), timeout=self.timeout):
            cid = by_node.get(reply.metadata.src_node_id)
            if cid is None or cid not in self.client_ids:
                continue
            if reply.has_error():
                raise RuntimeError(
                    f"federated init exchange {exchange}: {cid} failed ({reply.error.reason}); the init needs "
                    "every sampled client"
                )
            arrays = reply.content.array_records[P.INIT_RELEASE]
            self._count(exchange, cid, "up", payload_bytes(arrays))
            out[cid] = from_record(arrays)
        missing = [cid for cid in self.client_ids if cid not in out]
        if missing:
            raise RuntimeError(
                f"federated init exchange {exchange}: no answer from {missing} within {self.timeout:g} s "
                "(round-timeout); the init needs every sampled client"
            )
        return [out[cid] for cid in self.client_ids]

    def _count(self, exchange: int, cid: str, direction: str, nbytes: int) -> None:
        if nbytes:
            self.wire.append(
                {
                    "round": 0,
                    "init_exchange": exchange,
                    "client": cid,
                    "direction": direction,
                    "bytes": nbytes,
                }
            )


def connect_for_init(grid: Any, client_ids: list[str], config_yaml: str, settings: Any) -> FlowerExecutor:
    """An executor whose nodes hold the config but no basis yet (for the init's messages only)."""
    ex = FlowerExecutor(
        grid,
        client_ids,
        config_yaml=config_yaml,
        setup={},
        fingerprint=None,
        round_timeout=settings.round_timeout,
        connect_timeout=settings.connect_timeout,
    )
    ex.strict_setup = True  # the init's exchanges need every client's node from the start
    ex.connect()
    return ex
